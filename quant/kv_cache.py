"""A float8 KV cache: ModelOpt's quantizers on the keys and values attention reads, and the scales they give.

ModelOpt's Hugging Face plugin gives every GPT2Attention four more quantizers (q/k/v/p_bmm_quantizer) and, when they
are enabled, fake-quantizes the keys and values handed to the attention function, after the cache update, so that
the past and the new tokens are rounded alike. ModelOpt's FP8_KV_CFG enables K and V in FP8 E4M3, one scale each
per layer, max-calibrated like the weights. A serving engine stores the cache in that type: twice the tokens of a
float16 cache in the same memory (docs/export.md measures it with vLLM). The Tripy model and its twin quantize and
dequantize the same keys and values with `k_scale` and `v_scale` (model.py says why its cache is not yet stored in
float8).

    quant_cfg = quantization.quant_config("float8")["quant_cfg"] + kv_cache_quant_cfg("float8")
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from config import KV_CACHE_MODES

if TYPE_CHECKING:  # torch and ModelOpt are imported where they are used: example.py imports this module at its top
    import torch

KV_QUANTIZERS = ("k_bmm_quantizer", "v_bmm_quantizer")  # ModelOpt's, on GPT2Attention; the model's k_scale, v_scale


def check_kv_cache(kv_cache: str) -> None:
    """Raises ValueError unless `kv_cache` is one of KV_CACHE_MODES."""
    if kv_cache not in KV_CACHE_MODES:
        raise ValueError(f"Unknown kv_cache {kv_cache!r}; supported: {', '.join(KV_CACHE_MODES)}")


def kv_cache_quant_cfg(kv_cache: str) -> list[dict]:
    """ModelOpt's quant_cfg entries that enable the K and V quantizers: ModelOpt's own FP8_KV_CFG preset."""
    import modelopt.torch.quantization as mtq

    check_kv_cache(kv_cache)
    return list(mtq.FP8_KV_CFG["quant_cfg"])


def add_kv_cache_quantizers(
    model_hf: torch.nn.Module, kv_cache: str, forward_loop: Callable[[torch.nn.Module], None]
) -> None:
    """Enables the K and V quantizers of a model ModelOpt already quantized and calibrates them alone (max), leaving
    every other quantizer as it was: for AutoQuantize, whose search formats hold linear layers only. `forward_loop`
    is `quantization.create_forward_loop`'s (it counts its samples)."""
    import modelopt.torch.quantization as mtq

    entries = kv_cache_quant_cfg(kv_cache)
    start = time.perf_counter()
    mtq.set_quantizer_by_cfg(model_hf, entries)
    with mtq.set_quantizer_by_cfg_context(model_hf, [{"quantizer_name": "*", "enable": False}, *entries]):
        mtq.calibrate(model_hf, "max", forward_loop)
    seconds = time.perf_counter() - start
    print(f"Calibrated the {kv_cache} KV cache on {forward_loop.num_samples} samples in {seconds:.1f} s")


def kv_cache_in(model_type: str, model_hf: torch.nn.Module | None) -> str | None:
    """example.py's KV cache: the one a quantized model holds (calibrated with --kv-cache, or restored), or, for an
    export (`model_hf` None), the one `model_type` was exported with."""
    if model_hf is None:
        from exports.modelopt_hf import read_export

        return read_export(model_type)[0].kv_cache
    return kv_cache_of(model_hf)


def kv_cache_of(model_hf: torch.nn.Module) -> str | None:
    """The KV cache a ModelOpt-quantized model holds: "float8" when its K and V quantizers are enabled, else None."""
    quantizers = [module for name, module in model_hf.named_modules() if name.endswith(KV_QUANTIZERS)]
    return "float8" if quantizers and all(quantizer.is_enabled for quantizer in quantizers) else None


def kv_cache_quantizers(model_hf: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every enabled K and V quantizer, by the name of the scale it gives the model ("transformer.h.0.attn.k_scale")."""
    quantizers = {}
    for name, module in model_hf.named_modules():
        if name.endswith(KV_QUANTIZERS) and module.is_enabled:
            if module.num_bits not in ((4, 3), [4, 3]):
                raise ValueError(f"{name} is not FP8 E4M3: {module}")
            attention, quantizer = name.rsplit(".", 1)
            quantizers[f"{attention}.{quantizer[0]}_scale"] = module
    return quantizers
