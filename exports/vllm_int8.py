"""Rewrites an int8-smoothquant export (W8A8_SQ_PER_CHANNEL) in the compressed-tensors layout vLLM serves int8 W8A8
from, with SmoothQuant's factors folded into the layers before them.

vLLM's CPU build runs int8 only as W8A8 (`CPUInt8ScaledMMLinearKernel`, oneDNN) and reads it from compressed-tensors'
"int-quantized" format: an int8 `weight`, a float32 `weight_scale` [out, 1] per output channel, a static per-tensor
`input_scale` [1]. Its ModelOpt loader reads no int8 recipe, and no layout has a place for a per-input-feature
factor s: the layer computes QDQ(x * s) @ W^T with W already divided by s, so x * s must arrive ready-made. Where the
layer's input comes from decides whether it can, exactly:
- c_attn and c_fc read LayerNorm(h) = n * g + b (ln_1, ln_2): (n * g + b) * s = n * (g * s) + b * s, so the
  LayerNorm's weight and bias are multiplied by s;
- attn.c_proj reads softmax(...) @ v, a mix of value rows with weights that sum to one, channel by channel: scaling
  value channel j by s_j scales the output's channel j by s_j. c_attn's value outputs, rows 2E..3E of its weight and
  bias, are multiplied by s; c_attn's weight is int8 per output row, so only those rows' scales change;
- the MLP's c_proj reads GELU(...), through which no factor passes: quantization.py leaves it unsmoothed (a factor of
  ones), so there is nothing to fold.
The folded model is the same model in exact arithmetic; in floating point it rounds in other places (tests/test_vllm.py
bounds the difference). The fold needs the values unquantized between c_attn and attn.c_proj: a float8 KV cache,
one scale per tensor, would quantize the rescaled values differently, and is refused.
"""

import json
import os
import shutil

import torch
from safetensors.torch import save_file

from exports.modelopt_hf import CONV1D_LAYERS, read_export, read_tensors

# vLLM's compressed-tensors config for int8 W8A8 (as llm-compressor writes it): int8 symmetric weights per output
# channel and int8 symmetric inputs per tensor, both static, on every linear layer but the tied lm_head.
INT8_W8A8_ARGS = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": False}
QUANTIZATION_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "int-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {**INT8_W8A8_ARGS, "strategy": "channel"},
            "input_activations": {**INT8_W8A8_ARGS, "strategy": "tensor"},
        }
    },
    "ignore": ["lm_head"],
}
# The files of the export that vLLM reads as they are: its tokenizer and generation settings.
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json")


def fold_smoothing(tensors: dict[str, torch.Tensor], num_layers: int, embd: int) -> dict[str, torch.Tensor]:
    """The export's tensors (conv1d layout) with each pre_quant_scale folded away (see the module's docstring) and
    the scales in compressed-tensors' shapes. The int8 weights are not touched."""
    folded = dict(tensors)
    for i in range(num_layers):
        block = f"transformer.h.{i}"
        for layer_norm, layer in (("ln_1", "attn.c_attn"), ("ln_2", "mlp.c_fc")):
            factor = folded.pop(f"{block}.{layer}.pre_quant_scale").float()  # [embd]
            for param in ("weight", "bias"):
                folded[f"{block}.{layer_norm}.{param}"] = tensors[f"{block}.{layer_norm}.{param}"] * factor
        factor = folded.pop(f"{block}.attn.c_proj.pre_quant_scale").float()  # [embd], c_proj's input = value channels
        values = slice(2 * embd, 3 * embd)  # c_attn's outputs are q, k, v
        weight_scale, bias = folded[f"{block}.attn.c_attn.weight_scale"].clone(), tensors[f"{block}.attn.c_attn.bias"]
        weight_scale[values] *= factor
        folded[f"{block}.attn.c_attn.weight_scale"] = weight_scale
        folded[f"{block}.attn.c_attn.bias"] = torch.cat([bias[: 2 * embd], bias[values] * factor])
        factor = folded.pop(f"{block}.mlp.c_proj.pre_quant_scale")
        if not torch.all(factor == 1):
            raise ValueError(f"{block}.mlp.c_proj is smoothed: no fold passes through GELU (see quantization.py)")
        for layer in CONV1D_LAYERS:
            name = f"{block}.{layer}"
            folded[f"{name}.weight_scale"] = folded[f"{name}.weight_scale"].float().reshape(-1, 1)  # [out, 1]
            folded[f"{name}.input_scale"] = folded[f"{name}.input_scale"].float().reshape(1)
    return folded


def write_compressed_tensors(export_dir: str, out_dir: str) -> None:
    """Writes `export_dir`, an int8-smoothquant export, to `out_dir` in vLLM's compressed-tensors int8 W8A8 layout:
    model.safetensors (GPT-2's conv1d layout, which vLLM's GPT-2 transposes), config.json, the tokenizer."""
    fmt, hf_config = read_export(export_dir)
    if fmt.quant_mode != "int8-smoothquant":
        raise ValueError(f"{export_dir} is a {fmt.quant_mode} export ({fmt.quant_algo}), not int8-smoothquant")
    if fmt.kv_cache is not None:
        raise ValueError(f"{export_dir} has a {fmt.kv_cache} KV cache, which the folded value rows would not match")
    if fmt.weight_layout != "conv1d":
        raise ValueError(f"{export_dir} holds weights [out, in]; vLLM's GPT-2 reads GPT-2's conv1d layout")
    tensors = fold_smoothing(read_tensors(export_dir), hf_config.n_layer, hf_config.n_embd)
    os.makedirs(out_dir, exist_ok=True)
    save_file(
        {name: tensor.contiguous() for name, tensor in tensors.items()}, os.path.join(out_dir, "model.safetensors")
    )
    with open(os.path.join(export_dir, "config.json"), encoding="utf-8") as file:
        config = json.load(file)
    config["quantization_config"] = QUANTIZATION_CONFIG
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as file:
        json.dump(config, file, indent=2)
    for name in COPIED_FILES:
        if os.path.isfile(os.path.join(export_dir, name)):
            shutil.copyfile(os.path.join(export_dir, name), os.path.join(out_dir, name))
