"""A quantized output layer (`lm_head_mode`): GPT-2's lm_head in int8 or int4 too, calibrated with the block linears.
On a CPU the output layer is the largest matmul of a step (docs/benchmark.md); docs/quality.md gives its perplexity
cost. quantization.py imports this module only when `modelopt_quantize` is given an lm_head_mode.
"""

import torch

from config import LM_HEAD_MODES


def check_lm_head_mode(quant_mode: str, lm_head_mode: str, algorithm: str | dict) -> None:
    """Raises ValueError for an output-layer format the twin cannot hold beside quant_mode's calibration."""
    if lm_head_mode not in LM_HEAD_MODES:
        raise ValueError(f"Unknown lm_head_mode {lm_head_mode!r}; supported: {', '.join(LM_HEAD_MODES)}")
    if quant_mode == "float8":
        raise ValueError("float8 quantizes the output layer already, in float8: it takes no lm_head_mode")
    if lm_head_mode == "int8-weight-only" and algorithm != "max":
        # AWQ would give the head a pre_quant_scale, which an int8 layer has no place for
        raise ValueError("an int8 output layer is calibrated with max: beside AWQ's int4 take an int4 one")


def untie_lm_head(model_hf: torch.nn.Module) -> None:
    """Gives GPT-2's output layer a weight of its own instead of the input embedding's, for good."""
    model_hf.lm_head.weight = torch.nn.Parameter(model_hf.lm_head.weight.detach().clone())
    model_hf.config.tie_word_embeddings = False
