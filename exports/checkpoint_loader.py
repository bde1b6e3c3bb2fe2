"""Loads a checkpoint written by exports/checkpoint.py (ModelOpt's unified Hugging Face format, read by
exports/modelopt_hf.py) into the Tripy GPT or its PyTorch twin: the weights and scales as they were calibrated, with no
calibration.

example.py imports this module only when --model-type names an export.
"""

from typing import Any

from cli import UsageError
from config import GPTConfig, config_from_hf_config
from weight_loader import load_into


def load_weights_from_export(model: Any, export_dir: str, dtype: Any) -> None:
    """Loads a checkpoint written by exports/checkpoint.py into `model` (the Tripy GPT or the twin), with no
    calibration.

    `model` is built for the export's mode (`config_from_export`). Each quantized weight is dequantized from its stored
    type (stored * scale, exactly the value the calibrated model quantized it to), and the model quantizes it again
    with the same scale, which gives back the stored values. Raises modelopt_hf.ExportFormatError for a directory that
    is not such an export, an unknown quant_algo, a missing tensor or a tensor of the wrong shape.
    """
    from exports.modelopt_hf import CONV1D_LAYERS, check_tensors, dequantize_weight, read_export, read_tensors

    fmt, hf_config = read_export(export_dir)
    check_tensors(export_dir, fmt, hf_config)
    stored = read_tensors(export_dir)
    tensors = {}
    for name, tensor in stored.items():
        layer, param_name = name.rsplit(".", 1)
        if fmt.is_quantized(layer):
            continue
        if param_name in ("k_scale", "v_scale"):  # vLLM's name, attn.attn.k_scale, for the model's attn.k_scale
            tensors[f"{layer.removesuffix('.attn')}.{param_name}"] = tensor
            continue
        # An unquantized Conv1D weight, as GPT-2 stores it, is [in, out]; the Tripy model's is [out, in].
        tensors[name] = tensor.t() if param_name == "weight" and layer.endswith(CONV1D_LAYERS) else tensor
    layers = {name.rsplit(".", 1)[0] for name in stored if name.endswith(".weight_scale")}
    for layer in layers:
        conv1d = fmt.weight_layout == "conv1d" and layer != "lm_head"
        scale = stored[f"{layer}.weight_scale"].float()
        weight = dequantize_weight(
            stored[f"{layer}.weight"], scale, fmt.quant_mode, conv1d, fmt.group_size
        )  # [out, in]
        if fmt.quant_mode == "int4-weight-only":  # the Tripy layer blocks along dim 0: weight [in, out]
            tensors[f"{layer}.weight"] = weight.t().contiguous()
            tensors[f"{layer}.weight_scale"] = scale.t().contiguous()  # [in / block, out]
            tensors[f"{layer}.pre_quant_scale"] = stored[f"{layer}.pre_quant_scale"]
        else:
            tensors[f"{layer}.weight"], tensors[f"{layer}.weight_scale"] = weight, scale
        if fmt.quant_mode in ("float8", "int8-smoothquant"):
            tensors[f"{layer}.input_scale"] = stored[f"{layer}.input_scale"]
        if fmt.quant_mode == "int8-smoothquant":
            tensors[f"{layer}.pre_quant_scale"] = stored[f"{layer}.pre_quant_scale"]
        if f"{layer}.bias" in stored:
            tensors[f"{layer}.bias"] = stored[f"{layer}.bias"]
    if "lm_head.weight" not in tensors:  # tied to wte, as in GPT-2
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"]
    load_into(model, {name: tensor.float() for name, tensor in tensors.items()}, dtype)


def config_from_export(export_dir: str, **overrides: Any) -> GPTConfig:
    """The GPTConfig of an exports/checkpoint.py checkpoint, in its quantization mode, KV cache and output layer's
    format; `overrides` sets seq_len, dtype, ..."""
    from exports.modelopt_hf import read_export

    fmt, hf_config = read_export(export_dir)
    modes = {"quant_mode": fmt.quant_mode, "kv_cache": fmt.kv_cache, "lm_head_mode": fmt.lm_head_mode}
    return config_from_hf_config(hf_config, **modes, **overrides)


def read_checked_export(export_dir: str) -> tuple[Any, str]:
    """example.py's --model-type EXPORT_DIR: (its GPT2Config, its quantization mode) of an export, checked down to
    every tensor's shape; what is wrong with it is a UsageError. (A --quant-mode it was not calibrated in is refused
    with the command line, cli/example_args.py.)"""
    from exports.modelopt_hf import ExportFormatError, check_tensors, read_export

    try:
        fmt, hf_config = read_export(export_dir)
        check_tensors(export_dir, fmt, hf_config)
    except (ExportFormatError, OSError) as error:
        raise UsageError(str(error)) from None
    return hf_config, fmt.quant_mode
