"""A quantized output layer (`lm_head_mode`, example.py's --lm-head): GPT-2's lm_head in int8 or int4 too, calibrated
with the block linears. On a CPU the output layer is the largest matmul of a step (docs/benchmark.md); docs/quality.md
gives its perplexity cost. quantization.py imports this module only when `modelopt_quantize` is given an lm_head_mode;
cli/example_args.py checks --lm-head with it before torch is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from config import LM_HEAD_MODES, quant_mode_of

if TYPE_CHECKING:  # torch is imported where it is used: the command line checks --lm-head with this module
    import torch

# How each mode's block linears are calibrated by default (quantization.layer_format's algorithm, by its name).
DEFAULT_CALIBRATION = {
    "int8-weight-only": "max",
    "int4-weight-only": "awq_lite",
    "float8": "max",
    "int8-smoothquant": "smoothquant",
}
# Why --export-dir refuses an int4 head (ModelOpt's export fails on it: "Cannot pack weight").
INT4_HEAD_NOT_EXPORTED = (
    "ModelOpt's unified checkpoint packs int4 weights two output rows to a byte, and an output layer of an odd number "
    "of rows (GPT-2's 50257) cannot be packed: export an int8 one, or an int4 one with --export-onnx"
)


def check_lm_head_mode(quant_mode: str, lm_head_mode: str, algorithm: str | dict) -> None:
    """Raises ValueError for an output-layer format the twin cannot hold beside quant_mode's calibration."""
    if lm_head_mode not in LM_HEAD_MODES:
        raise ValueError(f"Unknown lm_head_mode {lm_head_mode!r}; supported: {', '.join(LM_HEAD_MODES)}")
    if quant_mode == "float8":
        raise ValueError("float8 quantizes the output layer already, in float8: it takes no other format for it")
    method = algorithm["method"] if isinstance(algorithm, dict) else algorithm
    if lm_head_mode == "int8-weight-only" and method != "max":
        # AWQ and SmoothQuant would give the head a pre_quant_scale, which an int8 weight-only layer has no place for
        raise ValueError(
            f"an int8 output layer is calibrated with max, and {quant_mode} with {method}: take an int4 one"
        )


def untie_lm_head(model_hf: torch.nn.Module) -> None:
    """Gives GPT-2's output layer a weight of its own instead of the input embedding's, for good."""
    import torch

    model_hf.lm_head.weight = torch.nn.Parameter(model_hf.lm_head.weight.detach().clone())
    model_hf.config.tie_word_embeddings = False


def lm_head_mode_of(model_hf: torch.nn.Module) -> str | None:
    """The lm_head_mode a ModelOpt-quantized GPT-2 holds: its output layer's format when that is one of LM_HEAD_MODES,
    else None (unquantized, or float8's, which is part of the float8 mode)."""
    lm_head = model_hf.lm_head
    quantizer = getattr(lm_head, "weight_quantizer", None)
    if quantizer is None or not quantizer.is_enabled:
        return None
    mode = quant_mode_of(quantizer.num_bits, bool(quantizer.block_sizes), lm_head.input_quantizer.is_enabled)
    return mode if mode in LM_HEAD_MODES else None


def lm_head_in(model_type: str, model_hf: torch.nn.Module | None) -> str | None:
    """example.py's output layer: the format a quantized model holds it in (calibrated with --lm-head, or restored),
    or, for an export (`model_hf` None), the one `model_type` was exported with."""
    if model_hf is None:
        from exports.modelopt_hf import read_export

        return read_export(model_type)[0].lm_head_mode
    return lm_head_mode_of(model_hf)
