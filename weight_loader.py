"""Loads Hugging Face GPT-2 weights, and ModelOpt's quantization scales, into the Tripy GPT or its PyTorch twin.

Both models have the same parameter names as Hugging Face's GPT2LMHeadModel, plus, on quantized layers:
    int8-weight-only   weight [out, in]  weight_scale [out]                                  (per output channel)
    float8             weight [out, in]  weight_scale []     input_scale []                  (per tensor)
    int8-smoothquant   weight [out, in]  weight_scale [out]  input_scale []  pre_quant_scale [in]
    int4-weight-only   weight [in, out]  weight_scale [in / 128, out]  pre_quant_scale [in]  (blocks of 128 inputs)
and, on each attention layer with a quantized KV cache (config.kv_cache, float8 or int8), k_scale [] and v_scale []
(per tensor).
Every scale is ModelOpt's calibrated amax divided by the largest value of the quantized type (`convert_to_scale`).
"""

from typing import Any

import torch
from torch import nn
from transformers import GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from config import (
    AUTO_QUANT_MODE,
    INT4_BLOCK_SIZE,
    GPTConfig,
    check_quant_mode,
    config_from_hf_config,
    layer_quant_mode,
    quant_mode_of,
)
from quant.kv_cache import kv_cache_of, kv_cache_quantizers
from sources.hub import load_hf_model

# The largest magnitude each quantized type holds: scale = amax / maxbound maps amax onto it.
MAXBOUND = {"int8-weight-only": 127.0, "int4-weight-only": 7.0, "float8": 448.0, "int8-smoothquant": 127.0}
KV_CACHE_MAXBOUND = {"float8": MAXBOUND["float8"], "int8": MAXBOUND["int8-weight-only"]}  # by config.kv_cache


def load_weights_from_hf(model: Any, model_type: str, dtype: Any, hf_model: GPT2LMHeadModel | None = None) -> None:
    """Loads unquantized GPT-2 weights into `model` (the Tripy GPT or the twin), cast to `dtype` (that backend's)."""
    hf_model = hf_model if hf_model is not None else load_hf_model(model_type)
    load_into(model, _hf_parameters(hf_model), dtype)


def load_quant_weights_from_hf(
    model: Any, model_type: str, dtype: Any, quant_mode: str, quantized_model: GPT2LMHeadModel | None = None
) -> None:
    """Loads ModelOpt-quantized GPT-2 weights and scales into `model` (the Tripy GPT or the twin).

    `quantized_model` is a Hugging Face GPT-2 already quantized by `modelopt_quantize` in `quant_mode`, or, with
    quant_mode AUTO_QUANT_MODE, by `auto_quantize.auto_quantize`; without it, `model_type` is loaded and calibrated
    here in one of QUANT_MODES. Each layer is read in the format `model.config` gives it (`layer_quant_mode`), and
    must have been quantized by ModelOpt in that format.
    """
    if quant_mode == AUTO_QUANT_MODE:
        if quantized_model is None:
            raise ValueError(f"quant_mode {AUTO_QUANT_MODE!r} loads from a quantized_model: pass the searched model")
    else:
        check_quant_mode(quant_mode)
    if quantized_model is None:
        from quantization import modelopt_quantize  # imports ModelOpt, which only this path needs

        quantized_model = modelopt_quantize(load_hf_model(model_type), quant_mode)
    tensors = _hf_parameters(quantized_model)
    # ModelOpt gives each linear layer it quantizes a "weight_quantizer": the layer is reached by its name.
    quantizers = [name for name, _ in quantized_model.named_modules() if name.endswith(".weight_quantizer")]
    for quantizer_name in quantizers:
        name = quantizer_name.removesuffix(".weight_quantizer")  # "transformer.h.0.mlp.c_fc"
        if get_submodule(quantized_model, quantizer_name).is_enabled:
            layer_mode = layer_quant_mode(model.config, name)
            if layer_mode is None:
                raise ValueError(f"{name} is quantized by ModelOpt, but unquantized in the model's config")
            module = get_submodule(quantized_model, name)
            for param_name, tensor in _quantized_linear(module, layer_mode, name).items():
                tensors[f"{name}.{param_name}"] = tensor
    kv_cache = kv_cache_of(quantized_model)  # a KV cache's K and V, if calibrated
    if kv_cache != model.config.kv_cache:
        raise ValueError(f"ModelOpt's KV cache is {kv_cache}, the model's config has {model.config.kv_cache}")
    for name, quantizer in kv_cache_quantizers(quantized_model).items():
        tensors[name] = convert_to_scale(quantizer.amax, KV_CACHE_MAXBOUND[kv_cache])
    load_into(model, tensors, dtype)


def _quantized_linear(module: nn.Module, quant_mode: str, name: str) -> dict[str, torch.Tensor]:
    """The Tripy layer's parameters for one ModelOpt QuantLinear (its weight is [out, in])."""
    weight_quantizer, input_quantizer = module.weight_quantizer, module.input_quantizer
    found = quant_mode_of(weight_quantizer.num_bits, bool(weight_quantizer.block_sizes), input_quantizer.is_enabled)
    if found != quant_mode:
        raise ValueError(f"{name} was not quantized for {quant_mode} (weight quantizer: {weight_quantizer})")
    maxbound = MAXBOUND[quant_mode]
    weight = module.weight.detach()
    weight_scale = convert_to_scale(weight_quantizer.amax, maxbound)
    if quant_mode == "int8-weight-only":
        return {"weight": weight, "weight_scale": weight_scale}  # scale [out]
    if quant_mode in ("float8", "int8-smoothquant"):
        tensors = {
            "weight": weight,
            "weight_scale": weight_scale,  # [out] for int8, [] for float8
            "input_scale": convert_to_scale(input_quantizer.amax, maxbound),
        }
        if quant_mode == "int8-smoothquant":
            # SmoothQuant's smoothing factor [in]: the weight is already divided by it (see quantization.py).
            tensors["pre_quant_scale"] = _pre_quant_scale(input_quantizer, weight.shape[1])
        return tensors
    # int4: ModelOpt's amax is [out * in / block, 1], ordered [out, in / block]; Tripy blocks along dim 0.
    out_features, in_features = weight.shape
    weight_scale = weight_scale.reshape(out_features, in_features // INT4_BLOCK_SIZE)
    return {
        "weight": weight.t().contiguous(),  # [in, out]
        "weight_scale": weight_scale.t().contiguous(),  # [in / block, out]
        "pre_quant_scale": _pre_quant_scale(input_quantizer, in_features),
    }


def _pre_quant_scale(input_quantizer: nn.Module, in_features: int) -> torch.Tensor:
    """The factor [in] ModelOpt multiplies a layer's input by (AWQ's or SmoothQuant's), as float32. A layer calibrated
    without one (int4 or int8-smoothquant calibrated with "max") gets ones: scaling by one is the same layer."""
    if input_quantizer.pre_quant_scale is None:
        return torch.ones(in_features)
    return input_quantizer.pre_quant_scale.detach().float()


def convert_to_scale(amax: torch.Tensor, maxbound: float) -> torch.Tensor:
    """ModelOpt's amax -> quantization scale (amax / maxbound) as float32, with size-1 dimensions squeezed."""
    return (amax.detach().float() / maxbound).squeeze()


def get_submodule(module: Any, attr_name: str) -> Any:
    """Follows a dotted path such as "transformer.h.0.attn" from `module`.

    Integer parts index lists (ModuleList, Sequential, a Tripy module's list), other parts look up dictionaries
    (ModuleDict, a Tripy module's dict) by key, or attributes.
    """
    current = module
    for part in attr_name.split("."):
        if isinstance(current, (nn.ModuleList, nn.Sequential, list, tuple)) and part.isdigit():
            found = int(part) < len(current)
            current = current[int(part)] if found else None
        elif isinstance(current, (nn.ModuleDict, dict)):
            found = part in current
            current = current[part] if found else None
        else:
            found = hasattr(current, part)
            current = getattr(current, part, None)
        if not found:
            raise AttributeError(f"No submodule {part!r} in path {attr_name!r}")
    return current


def config_from_hf(hf_model: GPT2LMHeadModel, **overrides: Any) -> GPTConfig:
    """The GPTConfig matching a Hugging Face GPT-2; `overrides` sets the other fields (dtype, quant_mode, ...)."""
    return config_from_hf_config(hf_model.config, **overrides)


def _hf_parameters(hf_model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter by name, linear weights as [out, in] (HF's GPT-2 Conv1D stores them [in, out])."""
    tensors = {}
    for module_name, module in hf_model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            tensor = param.detach()
            if isinstance(module, Conv1D) and param_name == "weight":
                tensor = tensor.t()
            tensors[f"{module_name}.{param_name}"] = tensor
    return tensors


class ScaleUnderflowError(ValueError):
    """A quantization scale the model's dtype cannot hold (see `_check_scales_fit`)."""


def _check_scales_fit(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Raises if a quantization scale is below `dtype`'s smallest normal number.

    Below it (6.1e-5 in float16) a number keeps fewer significant bits the smaller it is, down to zero, where
    quantizing divides by zero: every weight of the block or channel would change without a word. int8 scales are
    amax / 127: a gpt2-shaped model with small random weights has some of 8e-5.
    """
    tiny = torch.finfo(dtype).tiny
    for name, tensor in tensors.items():
        if name.endswith("_scale") and tensor.numel() and tensor.min().item() < tiny:
            raise ScaleUnderflowError(
                f"{name} has a scale of {tensor.min().item():.3g}, below {dtype}'s smallest normal number "
                f"({tiny:.3g}): it would lose precision or become zero. Run in float32 instead"
            )


def load_into(model: Any, tensors: dict[str, torch.Tensor], dtype: Any) -> None:
    """Checks names and shapes against the model's parameters, casts to `dtype`, and loads."""
    expected = model.state_dict()
    # tp.Linear's input_scale is an OptionalParameter: weight-only modes leave it unset.
    optional = {name for name, value in expected.items() if type(value).__name__ == "OptionalParameter"}
    missing = sorted(set(expected) - set(tensors) - optional)
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"Weights do not match the model. Missing: {missing}. Unexpected: {unexpected}.")
    wrong_shapes = [
        f"{name}: model {tuple(expected[name].shape)}, weights {tuple(tensor.shape)}"
        for name, tensor in tensors.items()
        if expected[name].shape is not None and tuple(expected[name].shape) != tuple(tensor.shape)
    ]
    if wrong_shapes:
        raise ValueError(f"Weight shapes do not match the model: {'; '.join(wrong_shapes)}")
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype.name)  # tp.float16 -> torch's
    # Both models hold their scales in the model's dtype (nvtripy requires it): in float16 a scale may not fit.
    _check_scales_fit(tensors, torch_dtype)

    if isinstance(model, nn.Module):
        model.load_state_dict({name: tensor.to(torch_dtype) for name, tensor in tensors.items()})
    else:
        import nvtripy as tp

        # Tripy takes the tensors through DLPack; they stay in CPU memory, where its quantize wants its scales.
        model.load_state_dict(
            {name: tp.Tensor(tensor.to(torch_dtype).contiguous()) for name, tensor in tensors.items()}
        )
