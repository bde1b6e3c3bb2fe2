"""A quantized KV cache: ModelOpt's quantizers on the keys and values attention reads, and the scales they give.

ModelOpt's Hugging Face plugin gives every GPT2Attention four more quantizers (q/k/v/p_bmm_quantizer) and, when they
are enabled, fake-quantizes the keys and values handed to the attention function, after the cache update, so that
the past and the new tokens are rounded alike. Both modes enable K and V with one scale each per layer,
max-calibrated like the weights:
- float8 (E4M3), ModelOpt's FP8_KV_CFG preset: a serving engine stores the cache in that type, twice the tokens of a
  float16 cache in the same memory (docs/export.md measures it with vLLM);
- int8, the same quantizers at 8 integer bits (ModelOpt has no preset for it): ONNX Runtime's GroupQueryAttention
  stores the cache in int8 on a CPU, which has no float8 kernel, and reads a quarter of float32's bytes per step
  (docs/onnx.md).
The Tripy model and its twin quantize and dequantize the same keys and values with `k_scale` and `v_scale` (model.py
says why its cache is not stored in the quantized type).

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
KV_CACHE_BITS = {"float8": (4, 3), "int8": 8}  # each mode's num_bits, as ModelOpt's quantizers hold it
KV_CACHE_NAMES = {"float8": "a float8 KV cache", "int8": "an int8 KV cache"}  # as the runs print them
# Why an int8 KV cache has no --export-dir: ModelOpt 0.47's export_hf_checkpoint stops at it (an assertion that admits
# FP8 and NVFP4 only, and its scales are amax / 448 for every format), and the engines that load the checkpoint,
# transformers through exports/modelopt_hf.py and vLLM, store float8 caches.
INT8_KV_NOT_EXPORTED = (
    "ModelOpt's checkpoint holds a float8 KV cache, the one serving engines such as vLLM store, and its exporter "
    "stops at an int8 one; an int8 KV cache is for ONNX Runtime on a CPU: --export-onnx DIR --onnx-flavor ort"
)


def check_kv_cache(kv_cache: str) -> None:
    """Raises ValueError unless `kv_cache` is one of KV_CACHE_MODES."""
    if kv_cache not in KV_CACHE_MODES:
        raise ValueError(f"Unknown kv_cache {kv_cache!r}; supported: {', '.join(KV_CACHE_MODES)}")


def described_with_kv_cache(quant_mode: str, kv_cache: str | None) -> str:
    """How calibrating and restoring name a mode and its KV cache: "int4-weight-only with an int8 KV cache"."""
    return quant_mode if kv_cache is None else f"{quant_mode} with {KV_CACHE_NAMES[kv_cache]}"


def kv_cache_quant_cfg(kv_cache: str) -> list[dict]:
    """ModelOpt's quant_cfg entries that enable the K and V quantizers: ModelOpt's own FP8_KV_CFG preset for float8,
    and the same entry at 8 integer bits for int8."""
    import modelopt.torch.quantization as mtq

    check_kv_cache(kv_cache)
    if kv_cache == "float8":
        return list(mtq.FP8_KV_CFG["quant_cfg"])
    return [{"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": KV_CACHE_BITS["int8"], "axis": None}}]


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
    """The KV cache a ModelOpt-quantized model holds: one of KV_CACHE_MODES when its K and V quantizers are enabled,
    by their bits, else None."""
    quantizers = [module for name, module in model_hf.named_modules() if name.endswith(KV_QUANTIZERS)]
    if not quantizers or not all(quantizer.is_enabled for quantizer in quantizers):
        return None
    return _kv_cache_mode(quantizers[0].num_bits, "the K and V quantizers")


def _kv_cache_mode(num_bits: int | tuple | list, name: str) -> str:
    """The mode of KV_CACHE_BITS with these bits (a saved state may hold float8's as a list)."""
    bits = tuple(num_bits) if isinstance(num_bits, list) else num_bits
    for mode, mode_bits in KV_CACHE_BITS.items():
        if bits == mode_bits:
            return mode
    raise ValueError(f"{name} have num_bits {num_bits}; a KV cache here is float8 E4M3 (4, 3) or int8 (8)")


def kv_cache_quantizers(model_hf: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every enabled K and V quantizer, by the name of the scale it gives the model ("transformer.h.0.attn.k_scale")."""
    quantizers = {}
    for name, module in model_hf.named_modules():
        if name.endswith(KV_QUANTIZERS) and module.is_enabled:
            _kv_cache_mode(module.num_bits, name)
            attention, quantizer = name.rsplit(".", 1)
            quantizers[f"{attention}.{quantizer[0]}_scale"] = module
    return quantizers
