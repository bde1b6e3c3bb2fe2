"""AutoQuantize: each block linear of a Hugging Face GPT-2 in the one of this example's modes, or unquantized, that
costs the least quality within a budget of bits, searched by ModelOpt's `mtq.auto_quantize`; and its choice as a
recipe, a table and a file that `--recipe` reuses.

example.py imports this module only for --quant-mode auto; evaluate.py for its AutoQuantize rows.
"""

import argparse
import copy
import fnmatch
import json
import os
import time
from dataclasses import dataclass

import modelopt.torch.quantization as mtq
import torch

from cli import UsageError
from cli.outputs import output_file
from config import EFFECTIVE_BITS_RANGE, QUANT_MODES, quant_mode_of
from quantization import (
    BLOCK_LINEARS,
    calibration_batches,
    calibration_texts,
    create_forward_loop,
    default_dataset,
    layer_format,
)
from sources.tokenizer import gpt2_tokenizer

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
# The modes AutoQuantize chooses among. Not int8-smoothquant: SmoothQuant calibrates each layer's smoothing against its
# own input statistics, which AutoQuantize's per-layer candidates would each need recomputed, and int8 W8A8 would tie
# with float8 at 8 bits (see `auto_quantize_format`).
SEARCHED_MODES = tuple(mode for mode in QUANT_MODES if mode != "int8-smoothquant")
UNQUANTIZED = "unquantized"  # a layer's format in a recipe file and the table when it stays in high precision


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
    weight, inputs, algorithm = layer_format(quant_mode)
    quant_cfg = [{"quantizer_name": "*", "enable": False}]
    if inputs is not None:
        quant_cfg.append({"quantizer_name": "*input_quantizer", "cfg": inputs})
    quant_cfg.append({"quantizer_name": "*weight_quantizer", "cfg": weight})
    return {"quant_cfg": quant_cfg, "algorithm": algorithm}


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
        config = mtq.get_auto_quantize_config(state, {"effective_bits": bits})  # read for its formats only
        enabled = {
            entry["quantizer_name"]: entry.get("cfg", {})
            for entry in config["quant_cfg"]
            if entry["quantizer_name"].endswith("_quantizer") and entry.get("enable", True)
        }
        recipes.append(_recipe(searched, {layer: _format_of(enabled, layer) for layer in layers}))
    print(
        f"AutoQuantize searched {len(layers)} layers on {samples_used} samples in {time.perf_counter() - start:.1f} s"
    )
    return recipes


def round_scores(state: dict) -> None:
    """Rounds every candidate format's score in an AutoQuantize search state to SCORE_DIGITS significant digits (in
    place), so that scores equal within float noise are equal, and the formats chosen from them the same every run."""
    for stats in state["candidate_stats"].values():
        stats["scores"] = [float(f"{score:.{SCORE_DIGITS}g}") for score in stats["scores"]]


def _format_of(enabled: dict[str, dict], layer: str) -> str | None:
    """The mode of `layer`'s quantizers in `enabled` (each enabled quantizer's cfg from `get_auto_quantize_config`,
    by its name)."""
    weight_cfg = enabled.get(f"{layer}.weight_quantizer")
    if weight_cfg is None:
        return None
    input_quantized = f"{layer}.input_quantizer" in enabled
    return quant_mode_of(weight_cfg["num_bits"], bool(weight_cfg.get("block_sizes")), input_quantized)


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
    dataset_name = default_dataset(dataset_name)
    device = next(model_hf.parameters()).device
    texts = calibration_texts(dataset_name, num_samples)
    batches = calibration_batches(model_hf, texts, gpt2_tokenizer(), device, batch_size, max_length=512)
    model_hf, state = mtq.auto_quantize(
        model_hf,
        # lm_head (tied to the embedding) stays out of the search and out of the bits' count.
        constraints={"effective_bits": effective_bits, "cost": {"excluded_module_name_patterns": ["lm_head"]}},
        quantization_formats=[auto_quantize_format(mode) for mode in SEARCHED_MODES],
        data_loader=batches,
        forward_step=lambda model, batch: model(**batch),
        loss_func=lambda output, batch: output.loss * SCORE_SCALE,
        disabled_layers=["lm_head", *(unquantized or [])],
        module_search_spaces=search_spaces,
        num_calib_steps=len(batches),
        num_score_steps=score_steps or len(batches),
        verbose=False,
    )
    model_hf.activation_checkpointing_disable()  # AutoQuantize turned it on, for the search's backward passes
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
    return quant_mode_of(
        weight_quantizer.num_bits, bool(weight_quantizer.block_sizes), module.input_quantizer.is_enabled
    )


def format_recipe(recipe: Recipe) -> str:
    """The recipe as a table: one line per layer with its format and bits, and the average."""
    width = max(len(layer) for layer in recipe.layers)
    lines = [f"{'layer'.ljust(width)}  {'format'.ljust(16)}  bits"]
    for layer, mode in recipe.layers.items():
        lines.append(f"{layer.ljust(width)}  {(mode or UNQUANTIZED).ljust(16)}  {FORMAT_BITS[mode]:4.0f}")
    lines.append(f"{'effective bits'.ljust(width)}  {''.ljust(16)}  {recipe.effective_bits:4.2f}")
    return "\n".join(lines)


def save_recipe(recipe: Recipe, path: str, replace: bool = False) -> None:
    """Writes the recipe as JSON into a new file that becomes `path` whole (cli/outputs.py): only if nothing is
    there by then, or with `replace` over the last one."""
    layers = {layer: mode or UNQUANTIZED for layer, mode in recipe.layers.items()}
    with output_file(path, "--recipe-out", replace) as temp, open(temp, "w", encoding="utf-8") as file:
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


def auto_quantize_step(
    hf_model: torch.nn.Module, args: argparse.Namespace, recipe_out: str, device: str
) -> dict[str, str | None]:
    """example.py's --quant-mode auto: quantizes `hf_model` in place in a per-layer mix of formats, searched by
    AutoQuantize within --effective-bits and saved to `recipe_out`, or read from --recipe. Prints the formats; returns
    them by layer name. With --kv-cache, the K and V quantizers are added to the mix and calibrated after it
    (quant/kv_cache.py). What the library turns down is a UsageError."""
    import datasets

    datasets.disable_progress_bars()
    hf_model.to(device)  # as in example.quantize: calibration and scoring on the GPU when there is one
    samples = dict(dataset_name=default_dataset(args.calibration_data), num_samples=args.num_calibration_samples)
    try:
        if args.recipe is not None:
            saved_recipe = load_recipe(args.recipe)
            try:
                check_recipe(hf_model, saved_recipe)
            except ValueError as error:
                raise UsageError(f"--recipe {args.recipe}: {error}") from None
            quantize_with_recipe(hf_model, saved_recipe, **samples)
            recipe = recipe_from_model(hf_model)  # what the model now is, whatever the file says
        else:
            recipe = auto_quantize(hf_model, args.effective_bits, **samples)
        if args.kv_cache is not None:
            from quant.kv_cache import add_kv_cache_quantizers

            forward_loop = create_forward_loop(hf_model, tokenizer=gpt2_tokenizer(), device=device, **samples)
            add_kv_cache_quantizers(hf_model, args.kv_cache, forward_loop)
    except (OSError, ValueError) as error:  # unreadable calibration data, a recipe for another model
        raise UsageError(str(error)) from None
    hf_model.to("cpu")
    print(format_recipe(recipe))
    if args.recipe is None:
        replaced = " (replacing the last search's)" if os.path.exists(recipe_out) else ""
        save_recipe(recipe, recipe_out, replace=args.recipe_out is None)  # the default file is the last search's
        print(
            f"Saved the per-layer formats to {recipe_out}{replaced}: "
            f"--recipe {recipe_out} reuses them without searching"
        )
    return recipe.layers
