"""The PyTorch twin (reference.py) holding a Hugging Face GPT-2's weights, quantized by ModelOpt or not, or an
export's: what the tests, evaluate.py, benchmark.py, qat.py and serve_vllm.py run and compare against.
"""

import torch
from transformers import GPT2LMHeadModel

from exports.checkpoint_loader import config_from_export, load_weights_from_export
from quant.lm_head import lm_head_mode_of
from reference import GPT
from weight_loader import config_from_hf, load_quant_weights_from_hf, load_weights_from_hf


def load_twin(
    hf_model: GPT2LMHeadModel,
    quant_mode: str | None = None,
    quantized_model: GPT2LMHeadModel | None = None,
    layer_quant_modes: dict[str, str | None] | None = None,
    kv_cache: str | None = None,
    lm_head_mode: str | None = None,
) -> GPT:
    """A float32 PyTorch twin, in eval mode, holding `hf_model`'s weights, or with a `quant_mode`, the weights and
    scales of `quantized_model` (hf_model quantized by `modelopt_quantize`, or with AUTO_QUANT_MODE by
    `quantization.auto_quantize`, which chose the `layer_quant_modes`), with `kv_cache` its KV-cache scales, and with
    `lm_head_mode` its output layer's (modelopt_quantize's lm_head_mode; by default the one quantized_model holds)."""
    if lm_head_mode is None and quantized_model is not None:
        lm_head_mode = lm_head_mode_of(quantized_model)  # so that every caller's twin holds the head it was given
    config = config_from_hf(
        hf_model,
        dtype="float32",
        quant_mode=quant_mode,
        layer_quant_modes=layer_quant_modes,
        kv_cache=kv_cache,
        lm_head_mode=lm_head_mode,
    )
    twin = GPT(config).eval()
    if quant_mode is None:
        load_weights_from_hf(twin, None, torch.float32, hf_model=hf_model)
    else:
        load_quant_weights_from_hf(twin, None, torch.float32, quant_mode, quantized_model=quantized_model)
    return twin


def load_export_twin(export_dir: str) -> GPT:
    """A float32 PyTorch twin, in eval mode, holding an exports/checkpoint.py checkpoint's quantized weights and
    scales."""
    twin = GPT(config_from_export(export_dir, dtype="float32")).eval()
    load_weights_from_export(twin, export_dir, torch.float32)
    return twin
