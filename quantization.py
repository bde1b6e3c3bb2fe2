"""Quantizing a Hugging Face GPT-2 with NVIDIA ModelOpt.

ModelOpt inserts quantizers into the model and calibrates them on sample text: it runs the model and records each
quantized tensor's largest magnitude (amax). weight_loader.py turns those into the scales the Tripy model uses.
"""

import copy
import fnmatch
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from datasets import load_dataset
from datasets.exceptions import DatasetGenerationError
from tqdm import tqdm
from transformers.pytorch_utils import Conv1D

from config import (
    AUTO_QUANT_MODE,
    EFFECTIVE_BITS_RANGE,
    INT4_BLOCK_SIZE,
    QUANT_MODES,
    check_quant_mode,
    quant_mode_of,
)
from hub import hub_reachable
from tokenizer import gpt2_tokenizer

with warnings.catch_warnings():
    # ModelOpt warns on import that it was not tested with this transformers version; this project's tests are.
    warnings.filterwarnings("ignore", message=r"transformers .* is not tested with current version of modelopt")
    import modelopt.torch.opt as mto
    import modelopt.torch.quantization as mtq

SHIPPED_CALIBRATION_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "calibration.txt")
# The layers the deployed model quantizes, as ModelOpt names their quantizers. Embeddings, LayerNorms and the
# attention matmuls stay in high precision.
BLOCK_LINEARS = ("*attn.c_attn", "*attn.c_proj", "*mlp.c_fc", "*mlp.c_proj")
# The bits per weight AutoQuantize counts for each format (it leaves scales out); None: left unquantized.
# EFFECTIVE_BITS_RANGE (config.py) is the least and the most of these.
FORMAT_BITS = {"int4-weight-only": 4.0, "int8-weight-only": 8.0, "float8": 8.0, None: 16.0}
# AutoQuantize scores a layer by the squared product of the loss's gradient and the change quantizing makes to the
# layer's output: on small models that is 1e-9 to 1e-6, below the tolerances of the solver it then runs (CBC through
# PuLP), which then returns any mix within the budget. Scaling the loss by 1000 scales every score by a million and
# changes no ranking.
SCORE_SCALE = 1000.0
# The significant digits of AutoQuantize's layer scores that the choice of formats sees. Runs on other thread counts
# give scores that differ in the 7th digit (2e-7 apart on the bundled model): without rounding, two mixes whose total
# scores are that close would be chosen between by float noise, and a page's figures would change from run to run.
SCORE_DIGITS = 4
UNQUANTIZED = "unquantized"  # a layer's format in a recipe file and the table when it stays in high precision
# Calibration algorithms a caller may pick instead of the mode's own (see quant_config).
CALIBRATION_ALGORITHMS = ("max",)


def quant_config(quant_mode: str, algorithm: str | None = None) -> dict:
    """ModelOpt's config for a mode: every quantizer off, then on for exactly the layers Tripy quantizes.

    algorithm: how to calibrate, instead of the mode's own ("max" for int8 and float8, AWQ for int4); "max" for int4
    takes each block's largest weight as its amax, without AWQ's search.
    """
    if algorithm is not None and algorithm not in CALIBRATION_ALGORITHMS:
        raise ValueError(f"Unknown calibration algorithm {algorithm!r}; supported: {', '.join(CALIBRATION_ALGORITHMS)}")
    weight, inputs, default_algorithm = _layer_format(quant_mode)
    layers = (*BLOCK_LINEARS, "lm_head") if quant_mode == "float8" else BLOCK_LINEARS
    quant_cfg = [{"quantizer_name": "*", "enable": False}]
    for layer in layers:
        quant_cfg.append({"quantizer_name": f"{layer}.weight_quantizer", "cfg": weight})
        if inputs is not None:
            quant_cfg.append({"quantizer_name": f"{layer}.input_quantizer", "cfg": inputs})
    return {"quant_cfg": quant_cfg, "algorithm": algorithm or default_algorithm}


def auto_quantize_format(quant_mode: str) -> dict:
    """The same mode as `quant_config`, as a candidate format for `mtq.auto_quantize`.

    AutoQuantize applies a format to one layer at a time, matching its patterns against the names of the layer's own
    quantizers ("weight_quantizer"), not against the model's ("transformer.h.0.mlp.c_fc.weight_quantizer"): the
    patterns of `quant_config` would match nothing there. Which layers are searched is `auto_quantize`'s business.

    The order of the entries matters for float8. AutoQuantize sorts a layer's formats by bits, ties by their config's
    JSON, and never lets a larger format score worse than a smaller one before it (it lowers the score to match). int8
    and float8 both count 8 bits: whichever comes second can be tied with the first and then chosen even where it
    does worse. float8's input_quantizer entry first ("*input" < "*weight") puts float8 first, so float8 keeps its
    own score, and int8, which quantizes the weights only, is the one that may be raised to a tie.
    """
    weight, inputs, algorithm = _layer_format(quant_mode)
    quant_cfg = [{"quantizer_name": "*", "enable": False}]
    if inputs is not None:
        quant_cfg.append({"quantizer_name": "*input_quantizer", "cfg": inputs})
    quant_cfg.append({"quantizer_name": "*weight_quantizer", "cfg": weight})
    return {"quant_cfg": quant_cfg, "algorithm": algorithm}


def _layer_format(quant_mode: str) -> tuple[dict, dict | None, str | dict]:
    """One quantized linear layer in a mode: its weight quantizer, input quantizer (None: off), and calibration."""
    check_quant_mode(quant_mode)
    fp8 = {"num_bits": (4, 3), "axis": None}  # E4M3, one scale per tensor
    if quant_mode == "int8-weight-only":
        return {"num_bits": 8, "axis": 0}, None, "max"
    if quant_mode == "int4-weight-only":
        # AWQ scales each input feature to protect the weights that meet large activations; the scale lives on the
        # (disabled) input quantizer as pre_quant_scale.
        weight = {"num_bits": 4, "block_sizes": {-1: INT4_BLOCK_SIZE, "type": "static"}}
        return weight, None, {"method": "awq_lite", "alpha_step": 0.1}
    return fp8, fp8, "max"


def modelopt_quantize(
    model_hf: torch.nn.Module,
    quant_mode: str,
    dataset_name: str | None = None,
    batch_size: int = 4,
    num_samples: int = 64,
    algorithm: str | None = None,
) -> torch.nn.Module:
    """Quantizes a Hugging Face GPT-2 in place with ModelOpt and returns it.

    Calibrates on `dataset_name` (see `create_forward_loop`); by default on CNN/DailyMail articles, or, when the
    Hugging Face Hub cannot be reached, on the English text shipped in data/calibration.txt. `algorithm` overrides
    the mode's calibration algorithm (see `quant_config`).
    """
    config = quant_config(quant_mode, algorithm)
    dataset_name = _default_dataset(dataset_name)
    device = next(model_hf.parameters()).device
    forward_loop = create_forward_loop(model_hf, dataset_name, gpt2_tokenizer(), device, batch_size, num_samples)

    start = time.perf_counter()
    mtq.quantize(model_hf, config, forward_loop)
    seconds = time.perf_counter() - start
    print(f"Calibrated {quant_mode} on {forward_loop.num_samples} samples in {seconds:.1f} s")
    return model_hf


@dataclass
class Recipe:
    """AutoQuantize's choice: each block linear's format, by its name in the Hugging Face model."""

    layers: dict[str, str | None]  # "transformer.h.0.attn.c_attn" -> one of QUANT_MODES, or None (unquantized)
    effective_bits: float  # bits per block-linear weight, counted as AutoQuantize does (FORMAT_BITS)


def auto_quantize(
    model_hf: torch.nn.Module,
    effective_bits: float,
    dataset_name: str | None = None,
    batch_size: int = 4,
    num_samples: int = 64,
) -> Recipe:
    """Searches each block linear's format with ModelOpt's AutoQuantize and quantizes `model_hf` in place with it.

    The candidates are this example's own modes (`auto_quantize_format`) and leaving a layer unquantized; lm_head
    stays unquantized and out of the count. AutoQuantize calibrates the whole model in each format, as
    `modelopt_quantize` would (AWQ on a quarter of the batches), then scores every layer in every format by how
    much it moves the loss (gradients times output change) and picks, per layer, the formats with the least total
    score whose weights average at most `effective_bits` bits.
    """
    _check_effective_bits([effective_bits])
    start = time.perf_counter()
    model_hf, state, samples_used = _run_auto_quantize(model_hf, effective_bits, dataset_name, batch_size, num_samples)
    if not state["best"]["is_satisfied"]:
        raise ValueError(f"AutoQuantize found no mix of formats within {effective_bits} effective bits")
    recipe = recipe_from_model(model_hf)
    print(
        f"AutoQuantize searched {len(recipe.layers)} layers on {samples_used} samples for {effective_bits:g} effective "
        f"bits in {time.perf_counter() - start:.1f} s: {recipe.effective_bits:.2f} effective bits"
    )
    return recipe


def _check_effective_bits(budgets: list[float]) -> None:
    low, high = EFFECTIVE_BITS_RANGE
    if not budgets or not all(low <= bits <= high for bits in budgets):
        raise ValueError(f"effective_bits must be between {low:g} (all int4) and {high:g} (none quantized)")


def search_recipes(
    model_hf: torch.nn.Module,
    budgets: list[float],
    dataset_name: str | None = None,
    batch_size: int = 4,
    num_samples: int = 64,
) -> list[Recipe]:
    """The recipe AutoQuantize picks for each budget of effective bits, from one search on a copy of `model_hf`.

    The scores do not depend on the budget, only the choice that follows them does: ModelOpt's
    `get_auto_quantize_config` solves that choice again for each budget, without calibrating or scoring again.
    """
    _check_effective_bits(budgets)
    start = time.perf_counter()
    searched, state, samples_used = _run_auto_quantize(
        copy.deepcopy(model_hf), budgets[0], dataset_name, batch_size, num_samples
    )
    layers = _block_linears(searched)
    round_scores(state)
    recipes = []
    for bits in budgets:
        with warnings.catch_warnings():
            # It warns that its config calibrates with "max" only: the config is read here for its formats only.
            warnings.filterwarnings("ignore", message=r"get_auto_quantize_config: returned config uses")
            config = mtq.get_auto_quantize_config(state, {"effective_bits": bits})
        enabled = {
            entry["quantizer_name"].removesuffix(".weight_quantizer"): entry.get("cfg", {})
            for entry in config["quant_cfg"]
            if entry["quantizer_name"].endswith(".weight_quantizer") and entry.get("enable", True)
        }
        recipes.append(_recipe(searched, {layer: _format_of(enabled.get(layer)) for layer in layers}))
    print(
        f"AutoQuantize searched {len(layers)} layers on {samples_used} samples in {time.perf_counter() - start:.1f} s"
    )
    return recipes


def round_scores(state: dict) -> None:
    """Rounds every candidate format's score in an AutoQuantize search state to SCORE_DIGITS significant digits (in
    place), so that scores equal within float noise are equal, and the formats chosen from them the same every run."""
    for stats in state["candidate_stats"].values():
        stats["scores"] = [float(f"{score:.{SCORE_DIGITS}g}") for score in stats["scores"]]


def _format_of(weight_cfg: dict | None) -> str | None:
    """The mode whose weight quantizer `weight_cfg` (an entry's cfg from `get_auto_quantize_config`) is."""
    if weight_cfg is None:
        return None
    return quant_mode_of(weight_cfg["num_bits"], bool(weight_cfg.get("block_sizes")))


def quantize_with_recipe(
    model_hf: torch.nn.Module,
    recipe: Recipe,
    dataset_name: str | None = None,
    batch_size: int = 4,
    num_samples: int = 64,
) -> torch.nn.Module:
    """Quantizes `model_hf` in place in a recipe's formats, calibrating as AutoQuantize does but without a search.

    Each quantized layer gets a search space of its one format, without the unquantized choice, and the others are
    disabled: AutoQuantize's calibration then gives the model the search would have given on the same samples.
    """
    check_recipe(model_hf, recipe)
    spaces = [
        {"module_name_patterns": [layer], "quantization_formats": [auto_quantize_format(mode)], "allow_no_quant": False}
        for layer, mode in recipe.layers.items()
        if mode is not None
    ]
    unquantized = [layer for layer, mode in recipe.layers.items() if mode is None]
    start = time.perf_counter()
    model_hf, _, samples_used = _run_auto_quantize(
        model_hf, EFFECTIVE_BITS_RANGE[1], dataset_name, batch_size, num_samples, spaces, unquantized, score_steps=1
    )
    print(f"Calibrated the recipe's formats on {samples_used} samples in {time.perf_counter() - start:.1f} s")
    return model_hf


def check_recipe(model_hf: torch.nn.Module, recipe: Recipe) -> None:
    """Raises ValueError unless the recipe names exactly the model's block linears."""
    layers = _block_linears(model_hf)
    if sorted(recipe.layers) != layers:
        raise ValueError(
            f"The recipe's layers do not match the model's: the recipe names {len(recipe.layers)} "
            f"({', '.join(sorted(recipe.layers)[:2])}, ...), the model has {len(layers)} ({', '.join(layers[:2])}, ...)"
        )


def _run_auto_quantize(
    model_hf: torch.nn.Module,
    effective_bits: float,
    dataset_name: str | None,
    batch_size: int,
    num_samples: int,
    search_spaces: list[dict] | None = None,
    unquantized: list[str] | None = None,
    score_steps: int | None = None,
) -> tuple[torch.nn.Module, dict, int]:
    """mtq.auto_quantize over this example's modes on up to `num_samples` samples; returns the model, the search
    state and the number of samples used (fewer than asked when the calibration data holds fewer).

    search_spaces and unquantized narrow the search per layer (see `quantize_with_recipe`); score_steps: the batches
    to score on (default: all of them).
    """
    dataset_name = _default_dataset(dataset_name)
    device = next(model_hf.parameters()).device
    texts = calibration_texts(dataset_name, num_samples)
    batches = calibration_batches(model_hf, texts, gpt2_tokenizer(), device, batch_size, max_length=512)
    with warnings.catch_warnings():
        # ModelOpt warns that results with custom formats "may not be optimal": these are the example's own modes;
        # and that it turns on gradient checkpointing, which is turned off again below.
        warnings.filterwarnings("ignore", message=r"Received custom quantization formats")
        warnings.filterwarnings("ignore", message=r"AutoQuantize: Huggingface model detected")
        warnings.filterwarnings("ignore", message=r"`gradient_checkpointing_enable` is deprecated")
        model_hf, state = mtq.auto_quantize(
            model_hf,
            # lm_head (tied to the embedding) stays out of the search and out of the bits' count.
            constraints={"effective_bits": effective_bits, "cost": {"excluded_module_name_patterns": ["lm_head"]}},
            quantization_formats=[auto_quantize_format(mode) for mode in QUANT_MODES],
            data_loader=batches,
            forward_step=lambda model, batch: model(**batch),
            loss_func=lambda output, batch: output.loss * SCORE_SCALE,
            disabled_layers=["lm_head", *(unquantized or [])],
            module_search_spaces=search_spaces,
            num_calib_steps=len(batches),
            num_score_steps=score_steps or len(batches),
            verbose=False,
        )
    model_hf.gradient_checkpointing_disable()
    return model_hf.eval(), state, len(texts)


def _block_linears(model_hf: torch.nn.Module) -> list[str]:
    """The names of the layers AutoQuantize chooses a format for, sorted."""
    names = [name for name, _ in model_hf.named_modules()]
    return sorted(name for name in names if any(fnmatch.fnmatch(name, pattern) for pattern in BLOCK_LINEARS))


def recipe_from_model(model_hf: torch.nn.Module) -> Recipe:
    """Each block linear's format, read back from its quantizers the way weight_loader.py reads them."""
    return _recipe(model_hf, {name: _quantizer_mode(model_hf.get_submodule(name)) for name in _block_linears(model_hf)})


def _recipe(model_hf: torch.nn.Module, layers: dict[str, str | None]) -> Recipe:
    """The recipe of these formats, with its effective bits counted over the model's weights."""
    sizes = {name: model_hf.get_submodule(name).weight.numel() for name in layers}
    bits = sum(sizes[name] * FORMAT_BITS[mode] for name, mode in layers.items())
    return Recipe(layers, bits / sum(sizes.values()))


def _quantizer_mode(module: torch.nn.Module) -> str | None:
    weight_quantizer = module.weight_quantizer
    if not weight_quantizer.is_enabled:
        return None
    return quant_mode_of(weight_quantizer.num_bits, bool(weight_quantizer.block_sizes))


def format_recipe(recipe: Recipe) -> str:
    """The recipe as a table: one line per layer with its format and bits, and the average."""
    width = max(len(layer) for layer in recipe.layers)
    lines = [f"{'layer'.ljust(width)}  {'format'.ljust(16)}  bits"]
    for layer, mode in recipe.layers.items():
        lines.append(f"{layer.ljust(width)}  {(mode or UNQUANTIZED).ljust(16)}  {FORMAT_BITS[mode]:4.0f}")
    lines.append(f"{'effective bits'.ljust(width)}  {''.ljust(16)}  {recipe.effective_bits:4.2f}")
    return "\n".join(lines)


def save_recipe(recipe: Recipe, path: str) -> None:
    layers = {layer: mode or UNQUANTIZED for layer, mode in recipe.layers.items()}
    with open(path, "w", encoding="utf-8") as file:
        json.dump({"effective_bits": round(recipe.effective_bits, 4), "layers": layers}, file, indent=2)
        file.write("\n")


def load_recipe(path: str) -> Recipe:
    """Reads a recipe `save_recipe` wrote; a ValueError names what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"cannot read the recipe {path}: {error}") from None
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, dict) or not layers or not isinstance(data.get("effective_bits"), (int, float)):
        raise ValueError(f"{path} is not a recipe: expected {{'effective_bits': number, 'layers': {{layer: format}}}}")
    formats = (*QUANT_MODES, UNQUANTIZED)
    unknown = sorted({str(mode) for mode in layers.values() if not isinstance(mode, str) or mode not in formats})
    if unknown:
        raise ValueError(f"{path} has unknown formats {unknown}; supported: {', '.join(formats)}")
    return Recipe(
        {layer: None if mode == UNQUANTIZED else mode for layer, mode in layers.items()}, data["effective_bits"]
    )


class QuantizedCheckpointError(ValueError):
    """A file that `load_quantized` cannot restore: not a ModelOpt checkpoint, or one for another model or mode."""


def save_quantized(model: torch.nn.Module, path: str) -> None:
    """Writes a quantized (calibrated or QAT-trained) model with ModelOpt's own `mto.save`.

    The file holds ModelOpt's state (which quantizers exist, their config: bits, axis, blocks, and how they were
    calibrated) and the model's state dict: the weights and every quantizer's buffers (amax, AWQ's pre_quant_scale).
    """
    mto.save(model, path)


def load_quantized(model: torch.nn.Module, path: str, quant_mode: str | None = None) -> tuple[torch.nn.Module, str]:
    """Restores a model written by `save_quantized` onto `model`, an unquantized GPT-2 of the same shape, with
    `mto.restore`, and returns it with its quantization mode: no calibration, the saved weights and scales as they
    were. The mode is one of QUANT_MODES, or AUTO_QUANT_MODE for a per-layer mix that AutoQuantize made (from a
    search or a recipe): `recipe_from_model` of the returned model then gives each layer's format. With
    `quant_mode`, the file must hold that mode. Raises QuantizedCheckpointError for a file that is not a ModelOpt
    checkpoint, holds no quantized model, or was saved for a model of another shape or another mode.

    The checks read the file before ModelOpt does, so that a wrong file is one clear message, not a traceback from
    deep in `load_state_dict`. A GPT-2 with other weights but the same shape is accepted: the file's weights replace
    them (that is how a QAT-trained model is restored onto the model it started from).
    """
    try:
        # weights_only (torch's default) as mto.restore loads it: a ModelOpt state is tensors and plain values.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types (UnpicklingError, RuntimeError, ...) for a foreign file
        # The first line of torch's message is enough to tell a truncated file from a foreign one; the rest is advice
        # about weights_only, which does not apply to a file that mto.save did not write.
        message = str(error) or type(error).__name__
        reason = message.splitlines()[0].split(". ")[0]
        raise QuantizedCheckpointError(
            f"{path} is not a ModelOpt checkpoint written by mto.save (torch.load: {reason})"
        ) from None
    if not isinstance(checkpoint, dict) or not {"modelopt_state", "model_state_dict"} <= set(checkpoint):
        raise QuantizedCheckpointError(
            f"{path} is not a ModelOpt checkpoint written by mto.save (no modelopt_state and model_state_dict in it)"
        )
    try:
        saved_mode = _saved_quant_mode(checkpoint["modelopt_state"], path)
    except (KeyError, TypeError, AttributeError, IndexError) as error:  # a state edited, or from another tool
        raise QuantizedCheckpointError(
            f"{path} holds a ModelOpt state of another layout than mto.save writes ({type(error).__name__}: {error})"
        ) from None
    saved = checkpoint["model_state_dict"]
    if not isinstance(saved, dict) or not all(isinstance(tensor, torch.Tensor) for tensor in saved.values()):
        raise QuantizedCheckpointError(f"{path}: its model_state_dict is not a dictionary of tensors")
    if quant_mode is not None and quant_mode != saved_mode:
        raise QuantizedCheckpointError(f"{path} holds a model quantized in {saved_mode}, not {quant_mode}")
    for name, shape in _quantized_shapes(model).items():
        if name not in saved or list(saved[name].shape) != shape:
            found = "missing" if name not in saved else f"shape {list(saved[name].shape)}"
            raise QuantizedCheckpointError(
                f"{path} was saved for another model: its {name} is {found}, the model's is {shape}"
            )
    return mto.restore(model, path), saved_mode


def _saved_quant_mode(modelopt_state: dict, path: str) -> str:
    """The mode of a saved ModelOpt state: AUTO_QUANT_MODE for a model that mtq.auto_quantize quantized, otherwise the
    one mode its weight quantizers' bits and blocks show (as weight_loader does)."""
    entries = modelopt_state.get("modelopt_state_dict", [])
    # ModelOpt records mtq.quantize as its "quantize" mode and mtq.auto_quantize (a search, or quantize_with_recipe)
    # as "auto_quantize" (modelopt/torch/quantization/mode.py), whose calibration leaves no mode of its own.
    applied = {mode_name for mode_name, _ in entries}
    if not applied & {"quantize", "auto_quantize"}:
        raise QuantizedCheckpointError(
            f"{path} holds no quantized model (its ModelOpt state has no quantize or auto_quantize mode)"
        )
    # The last entry (calibration updates it) describes the quantizers as they were saved.
    quantizers = entries[-1][1]["metadata"]["quantizer_state"]
    found = {
        quant_mode_of(state["_num_bits"], bool(state["_block_sizes"]))
        for name, state in quantizers.items()
        if name.endswith(".weight_quantizer") and not state["_disabled"]
    }
    if None not in found:
        # A mix stays a mix even when it happens to hold one format: lm_head stays out of it, unlike float8's.
        if "auto_quantize" in applied:
            return AUTO_QUANT_MODE
        if len(found) == 1:
            return found.pop()
    raise QuantizedCheckpointError(
        f"{path} holds a model quantized in none of this example's modes ({', '.join(QUANT_MODES)}, "
        f"or a per-layer mix of them: {AUTO_QUANT_MODE})"
    )


def _quantized_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    """The shape of each tensor of the unquantized model once ModelOpt has quantized it: GPT-2's Conv1D weights
    [in, out] become QuantLinear weights [out, in]."""
    shapes = {}
    for module_name, module in model.named_modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            transposed = isinstance(module, Conv1D) and name == "weight"
            prefix = f"{module_name}." if module_name else ""
            shapes[prefix + name] = list(tensor.shape)[::-1] if transposed else list(tensor.shape)
    return {name: shape for name, shape in shapes.items() if name in model.state_dict()}


def create_forward_loop(
    model: torch.nn.Module,
    dataset_name: str,
    tokenizer: Any,
    device: torch.device | str,
    batch_size: int = 4,
    num_samples: int = 64,
    max_length: int = 512,
) -> Callable[[torch.nn.Module], None]:
    """A `forward_loop(model)` for `mtq.quantize`: runs `num_samples` text samples through the model.

    dataset_name: "cnn_dailymail" or a local .txt/.json/.jsonl file (see `calibration_texts`). tokenizer: a
    transformers GPT-2 tokenizer. The loop's `num_samples` is how many it runs: fewer than asked when the data holds
    fewer.
    """
    texts = calibration_texts(dataset_name, num_samples)
    batches = calibration_batches(model, texts, tokenizer, device, batch_size, max_length)

    @torch.no_grad()
    def forward_loop(model: torch.nn.Module) -> None:
        for batch in tqdm(batches, desc="Calibrating", unit="batch"):
            model(batch["input_ids"], attention_mask=batch["attention_mask"])

    forward_loop.num_samples = sum(len(batch["input_ids"]) for batch in batches)  # what it runs, for the report
    return forward_loop


def calibration_texts(dataset_name: str, num_samples: int) -> list[str]:
    """Up to `num_samples` text samples: from "cnn_dailymail" (articles, from the Hugging Face Hub), or a local file:
    .txt (one sample per paragraph), .json or .jsonl (a "text" field per record). Says so when there are fewer."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    texts = _load_texts(dataset_name, num_samples)
    if len(texts) < num_samples:
        print(
            f"{dataset_name} has only {len(texts)} samples, fewer than the {num_samples} asked for: using {len(texts)}"
        )
    return texts


def calibration_batches(
    model: torch.nn.Module,
    texts: list[str],
    tokenizer: Any,
    device: torch.device | str,
    batch_size: int,
    max_length: int,
) -> list[dict[str, torch.Tensor]]:
    """`texts` as batches of input_ids, attention_mask and labels (padding: -100) [batch, seq], on `device`.

    tokenizer: a transformers GPT-2 tokenizer. Samples are truncated to `max_length` tokens, never beyond what the
    model's position embedding covers.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    max_length = min(max_length, model.config.n_positions)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(
            texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
        labels = tokens["input_ids"].masked_fill(tokens["attention_mask"] == 0, -100)  # no loss on padding
        batch = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"], "labels": labels}
        batches.append({name: tensor.to(device) for name, tensor in batch.items()})
    return batches


def _default_dataset(dataset_name: str | None) -> str:
    """CNN/DailyMail when no dataset is named, or, when the Hugging Face Hub is unreachable, the shipped text."""
    if dataset_name is not None:
        return dataset_name
    if hub_reachable():
        return "cnn_dailymail"
    print("Hugging Face Hub unreachable: calibrating on the shipped data/calibration.txt instead of cnn_dailymail")
    return SHIPPED_CALIBRATION_TEXT


def _load_texts(dataset_name: str, num_samples: int) -> list[str]:
    """Up to `num_samples` non-empty text samples from CNN/DailyMail or a local .txt/.json/.jsonl file."""
    if dataset_name == "cnn_dailymail":
        if not hub_reachable():
            raise OSError(
                "Cannot load cnn_dailymail: the Hugging Face Hub is unreachable. "
                f"Calibrate on a local .txt/.json/.jsonl file instead, such as {SHIPPED_CALIBRATION_TEXT}"
            )
        # Streaming reads just the samples needed instead of downloading the whole data set.
        stream = load_dataset("cnn_dailymail", "3.0.0", split="train", streaming=True)
        return [record["article"] for record in islice(stream, num_samples)]
    if not os.path.isfile(dataset_name):
        raise FileNotFoundError(
            f"Calibration data not found: {dataset_name} (expected 'cnn_dailymail' or a local file)"
        )
    extension = os.path.splitext(dataset_name)[1].lower()
    try:
        if extension == ".txt":
            dataset = load_dataset("text", data_files=dataset_name, sample_by="paragraph", split="train")
        elif extension in (".json", ".jsonl"):
            dataset = load_dataset("json", data_files=dataset_name, split="train")
        else:
            raise ValueError(f"Unsupported calibration file {dataset_name}: expected .txt, .json or .jsonl")
    except (DatasetGenerationError, StopIteration) as error:  # empty, binary, not UTF-8, malformed JSON
        cause = error.__cause__ or error
        raise ValueError(f"Cannot read {dataset_name} as {extension[1:]}: {type(cause).__name__}: {cause}") from None
    if "text" not in dataset.column_names:
        raise ValueError(f"{dataset_name} has no 'text' field (fields: {', '.join(dataset.column_names)})")
    texts = [text.strip() for text in dataset["text"] if isinstance(text, str) and text.strip()]
    if not texts:
        raise ValueError(f"{dataset_name} holds no text to calibrate on")
    return texts[:num_samples]
