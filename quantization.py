"""Quantizing a Hugging Face GPT-2 with NVIDIA ModelOpt.

ModelOpt inserts quantizers into the model and calibrates them on sample text: it runs the model and records each
quantized tensor's largest magnitude (amax). weight_loader.py turns those into the scales the Tripy model uses.
"""

import os
import time
import warnings
from collections.abc import Callable
from itertools import islice
from typing import Any

import torch
from datasets import load_dataset
from tqdm import tqdm
from transformers.pytorch_utils import Conv1D

from config import INT4_BLOCK_SIZE, QUANT_MODES, WEIGHT_QUANTIZER, check_quant_mode
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
# Calibration algorithms a caller may pick instead of the mode's own (see quant_config).
CALIBRATION_ALGORITHMS = ("max",)


def quant_config(quant_mode: str, algorithm: str | None = None) -> dict:
    """ModelOpt's config for a mode: every quantizer off, then on for exactly the layers Tripy quantizes.

    algorithm: how to calibrate, instead of the mode's own ("max" for int8 and float8, AWQ for int4); "max" for int4
    takes each block's largest weight as its amax, without AWQ's search.
    """
    check_quant_mode(quant_mode)
    if algorithm is not None and algorithm not in CALIBRATION_ALGORITHMS:
        raise ValueError(f"Unknown calibration algorithm {algorithm!r}; supported: {', '.join(CALIBRATION_ALGORITHMS)}")
    fp8 = {"num_bits": (4, 3), "axis": None}  # E4M3, one scale per tensor
    if quant_mode == "int8-weight-only":
        layers, weight, inputs, default_algorithm = BLOCK_LINEARS, {"num_bits": 8, "axis": 0}, None, "max"
    elif quant_mode == "int4-weight-only":
        weight = {"num_bits": 4, "block_sizes": {-1: INT4_BLOCK_SIZE, "type": "static"}}
        # AWQ scales each input feature to protect the weights that meet large activations; the scale lives on the
        # (disabled) input quantizer as pre_quant_scale.
        layers, inputs, default_algorithm = BLOCK_LINEARS, None, {"method": "awq_lite", "alpha_step": 0.1}
    else:  # float8
        layers, weight, inputs, default_algorithm = (*BLOCK_LINEARS, "lm_head"), fp8, fp8, "max"

    quant_cfg = [{"quantizer_name": "*", "enable": False}]
    for layer in layers:
        quant_cfg.append({"quantizer_name": f"{layer}.weight_quantizer", "cfg": weight})
        if inputs is not None:
            quant_cfg.append({"quantizer_name": f"{layer}.input_quantizer", "cfg": inputs})
    return {"quant_cfg": quant_cfg, "algorithm": algorithm or default_algorithm}


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
    if dataset_name is None:
        if hub_reachable():
            dataset_name = "cnn_dailymail"
        else:
            dataset_name = SHIPPED_CALIBRATION_TEXT
            print(
                "Hugging Face Hub unreachable: calibrating on the shipped data/calibration.txt instead of cnn_dailymail"
            )
    device = next(model_hf.parameters()).device
    forward_loop = create_forward_loop(model_hf, dataset_name, gpt2_tokenizer(), device, batch_size, num_samples)

    start = time.perf_counter()
    mtq.quantize(model_hf, config, forward_loop)
    print(f"Calibrated {quant_mode} on {num_samples} samples in {time.perf_counter() - start:.1f} s")
    return model_hf


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
    were. With `quant_mode`, the file must hold that mode. Raises QuantizedCheckpointError for a file that is not
    a ModelOpt checkpoint, holds no quantized model, or was saved for a model of another shape or another mode.

    The checks read the file before ModelOpt does, so that a wrong file is one clear message, not a traceback from
    deep in `load_state_dict`. A GPT-2 with other weights but the same shape is accepted: the file's weights replace
    them (that is how a QAT-trained model is restored onto the model it started from).
    """
    try:
        # weights_only (torch's default) as mto.restore loads it: a ModelOpt state is tensors and plain values.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types (UnpicklingError, RuntimeError, ...) for a foreign file
        raise QuantizedCheckpointError(f"{path} is not a ModelOpt checkpoint written by mto.save ({error})") from None
    if not isinstance(checkpoint, dict) or not {"modelopt_state", "model_state_dict"} <= set(checkpoint):
        raise QuantizedCheckpointError(
            f"{path} is not a ModelOpt checkpoint written by mto.save (no modelopt_state and model_state_dict in it)"
        )
    saved_mode = _saved_quant_mode(checkpoint["modelopt_state"], path)
    if quant_mode is not None and quant_mode != saved_mode:
        raise QuantizedCheckpointError(f"{path} holds a {saved_mode} model, not {quant_mode}")
    saved = checkpoint["model_state_dict"]
    for name, shape in _quantized_shapes(model).items():
        if name not in saved or list(saved[name].shape) != shape:
            found = "missing" if name not in saved else f"shape {list(saved[name].shape)}"
            raise QuantizedCheckpointError(
                f"{path} was saved for another model: its {name} is {found}, the model's is {shape}"
            )
    return mto.restore(model, path), saved_mode


def _saved_quant_mode(modelopt_state: dict, path: str) -> str:
    """The mode of a saved ModelOpt state, read from its weight quantizers' bits and blocks (as weight_loader does)."""
    modes = [state for mode_name, state in modelopt_state.get("modelopt_state_dict", []) if mode_name == "quantize"]
    if not modes:
        raise QuantizedCheckpointError(f"{path} holds no quantized model (its ModelOpt state has no quantize mode)")
    # The last entry (calibration updates it) describes the quantizers as they were saved.
    quantizers = modelopt_state["modelopt_state_dict"][-1][1]["metadata"]["quantizer_state"]
    found = {
        (_hashable(state["_num_bits"]), bool(state["_block_sizes"]))
        for name, state in quantizers.items()
        if name.endswith(".weight_quantizer") and not state["_disabled"]
    }
    for mode, weight_quantizer in WEIGHT_QUANTIZER.items():
        if found == {weight_quantizer}:
            return mode
    raise QuantizedCheckpointError(
        f"{path} holds a model quantized in none of this example's modes ({', '.join(QUANT_MODES)})"
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


def _hashable(num_bits: int | tuple | list) -> int | tuple:
    """float8's num_bits (4, 3) as a tuple, however the state stored it."""
    return tuple(num_bits) if isinstance(num_bits, list) else num_bits


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

    dataset_name: "cnn_dailymail" (articles, from the Hugging Face Hub), or a local file: .txt (one sample per
    paragraph), .json or .jsonl (a "text" field per record). tokenizer: a transformers GPT-2 tokenizer.
    Samples are truncated to `max_length` tokens, never beyond what the model's position embedding covers.
    """
    if batch_size < 1 or num_samples < 1:
        raise ValueError(f"batch_size and num_samples must be at least 1, got {batch_size} and {num_samples}")
    texts = _load_texts(dataset_name, num_samples)
    if len(texts) < num_samples:
        print(
            f"{dataset_name} has only {len(texts)} samples, fewer than the {num_samples} asked for: using {len(texts)}"
        )
    max_length = min(max_length, model.config.n_positions)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]

    @torch.no_grad()
    def forward_loop(model: torch.nn.Module) -> None:
        for batch in tqdm(batches, desc="Calibrating", unit="batch"):
            tokens = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            model(tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device))

    return forward_loop


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
    if extension == ".txt":
        dataset = load_dataset("text", data_files=dataset_name, sample_by="paragraph", split="train")
    elif extension in (".json", ".jsonl"):
        dataset = load_dataset("json", data_files=dataset_name, split="train")
        if "text" not in dataset.column_names:
            raise ValueError(f"{dataset_name} has no 'text' field (fields: {', '.join(dataset.column_names)})")
    else:
        raise ValueError(f"Unsupported calibration file {dataset_name}: expected .txt, .json or .jsonl")
    texts = [text.strip() for text in dataset["text"] if text and text.strip()]
    return texts[:num_samples]
