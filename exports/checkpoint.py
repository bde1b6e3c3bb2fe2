"""Exports the ModelOpt-quantized GPT-2 as a unified Hugging Face checkpoint, the format serving engines load.

ModelOpt's `export_hf_checkpoint` writes each quantized weight in its stored type (float8 E4M3, int8, or int4 packed
two per byte) next to its scales, as safetensors, and names the algorithm in hf_quant_config.json (also copied into
config.json as `quantization_config`). The scales come from the same calibrated amaxes that weight_loader.py turns
into the Tripy model's scales, so an engine and Tripy run the same quantized model.

Three things are added, and one name changed, so that the directory is all a consumer needs (exports/modelopt_hf.py
describes the format):
- GPT-2's c_attn/c_proj/c_fc weights are rewritten [in, out], the layout of GPT-2's Conv1D that GPT-2 loaders expect
  (vLLM's transposes every one of them; ModelOpt writes [out, in]), recorded as "weight_layout": "conv1d";
- a float8 KV cache's scales, which ModelOpt writes as transformer.h.N.attn.k_proj.k_scale (GPT-2 has no k_proj, and
  vLLM's GPT-2 refuses the name), are renamed transformer.h.N.attn.attn.k_scale (and v_scale), where vLLM's GPT-2
  attention keeps them (see `_kv_scale_name`);
- GPT-2's tokenizer files, so that `vllm serve DIR` or `AutoTokenizer.from_pretrained(DIR)` work offline;
- a pre_quant_scale of ones for int4 layers calibrated without AWQ, which W4A16_AWQ promises, and for int8 W8A8 layers
  calibrated without SmoothQuant, which W8A8_SQ_PER_CHANNEL promises (see `_add_identity_pre_quant_scales`).
"""

import copy
import json
import os
import time
import warnings

import torch
from modelopt.torch.export import export_hf_checkpoint
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

from cli import UsageError
from cli.outputs import output_folder
from exports.modelopt_hf import CONV1D_LAYERS, safetensors_files
from quant.kv_cache import INT8_KV_NOT_EXPORTED, kv_cache_of
from quant.lm_head import INT4_HEAD_NOT_EXPORTED, lm_head_mode_of
from sources.tokenizer import gpt2_tokenizer


def export_checkpoint(quantized_model: GPT2LMHeadModel, export_dir: str) -> None:
    """Writes a GPT-2 quantized by `quantization.modelopt_quantize` to `export_dir` as ModelOpt's unified checkpoint.

    Files: model.safetensors, hf_quant_config.json, config.json, generation_config.json, and the tokenizer's
    (tokenizer.json, tokenizer_config.json). Unquantized tensors (embeddings, LayerNorms, biases) keep the model's
    dtype. `quantized_model` is left as it was, so weight_loader can still read it afterwards.
    """
    if not any(_is_quantized(module) for module in quantized_model.modules()):
        raise ValueError("export_checkpoint needs a GPT-2 quantized by modelopt_quantize; this model has no quantizers")
    if lm_head_mode_of(quantized_model) == "int4-weight-only" and quantized_model.lm_head.out_features % 2:
        raise ValueError(INT4_HEAD_NOT_EXPORTED)
    if kv_cache_of(quantized_model) == "int8":  # a restored one: --kv-cache int8 is refused before calibrating
        raise ValueError(f"the model has an int8 KV cache: {INT8_KV_NOT_EXPORTED}")
    # ModelOpt's export replaces every quantized layer's weight with its int8/float8/packed-int4 form in place.
    model = copy.deepcopy(quantized_model)
    # ModelOpt reads the architectures to tell language models from multimodal ones; a model built from a bare
    # GPT2Config has none (TypeError: 'NoneType' object is not iterable).
    if not model.config.architectures:
        model.config.architectures = [type(model).__name__]
    # Without a dtype, ModelOpt exports in config.dtype, which save_pretrained leaves as a string ("float32"); its
    # `weight.to(dtype)` then reads the string as a device (RuntimeError: Invalid device string: 'float32').
    dtype = next(model.parameters()).dtype
    model.config.dtype = dtype
    _add_identity_pre_quant_scales(model)
    with torch.inference_mode(), warnings.catch_warnings():
        # ModelOpt warns before it re-raises any error (a full disk's too); the caller reports the error once.
        warnings.filterwarnings("ignore", message="Cannot export model to the model_config")
        export_hf_checkpoint(model, dtype=dtype, export_dir=export_dir)
    _write_conv1d_layout(export_dir)
    gpt2_tokenizer().save_pretrained(export_dir)


def _add_identity_pre_quant_scales(model: GPT2LMHeadModel) -> None:
    """Gives each int4 layer without AWQ's pre_quant_scale (int4 calibrated with "max", as qat.py does), and each int8
    W8A8 layer without SmoothQuant's (int8-smoothquant calibrated with "max"), a scale of ones.

    ModelOpt exports every block-wise int4 layer as W4A16_AWQ with "pre_quant_scale": true, and int8 W8A8 as
    W8A8_SQ_PER_CHANNEL, but writes the tensor only for a layer that has one: such an export promises tensors it lacks,
    and their loaders (exports/modelopt_hf.py among them) refuse it. (x * 1) @ W^T is x @ W^T exactly, so the export
    computes what the model computes, as weight_loader.py's twin does, which also takes a missing scale as ones.
    """
    for module in model.modules():
        w8a8 = _is_quantized(module) and module.weight_quantizer.num_bits == 8 and module.input_quantizer.is_enabled
        if _is_quantized(module) and (module.weight_quantizer.num_bits == 4 or w8a8):
            input_quantizer = module.input_quantizer
            if input_quantizer.pre_quant_scale is None:
                weight = module.weight  # QuantLinear's: [out, in]
                input_quantizer.pre_quant_scale = torch.ones(weight.shape[1], dtype=weight.dtype, device=weight.device)


def _kv_scale_name(name: str) -> str:
    """ModelOpt's name for a KV-cache scale -> vLLM's GPT-2's; other names unchanged.

    ModelOpt names them after a k_proj/v_proj layer, as in Llama. vLLM's GPT-2 turns "attn.k_proj.k_scale" into
    "attn.k_proj.attn.k_scale", which it has no module for, and stops loading; it reads "attn.attn.k_scale" as it is.
    """
    for kv in ("k", "v"):
        name = name.replace(f".attn.{kv}_proj.{kv}_scale", f".attn.attn.{kv}_scale")
    return name


def _write_conv1d_layout(export_dir: str) -> None:
    """Transposes the quantized Conv1D weights to [in, out], renames the KV-cache scales (`_kv_scale_name`), records
    the layout in both quantization configs, and unties lm_head from wte in config.json when the export holds a
    quantized lm_head of its own."""
    lm_head_quantized = False
    for path in safetensors_files(export_dir):
        tensors = {_kv_scale_name(name): tensor for name, tensor in load_file(path).items()}
        lm_head_quantized |= "lm_head.weight_scale" in tensors
        for name in list(tensors):
            layer = name.removesuffix(".weight")
            # Every Conv1D layer, quantized or not: a mix (AutoQuantize) leaves some in high precision.
            if layer != name and layer.endswith(CONV1D_LAYERS):
                # int4's packed [out / 2, in] becomes [in, out / 2]: each byte still holds two output rows.
                tensors[name] = tensors[name].t().contiguous()
        save_file(tensors, path, metadata={"format": "pt"})
    index_path = os.path.join(export_dir, "model.safetensors.index.json")
    if os.path.isfile(index_path):  # a sharded export: its index names each tensor's shard
        with open(index_path) as file:
            index = json.load(file)
        index["weight_map"] = {_kv_scale_name(name): shard for name, shard in index["weight_map"].items()}
        with open(index_path, "w") as file:
            json.dump(index, file, indent=2)

    quant_config_path = os.path.join(export_dir, "hf_quant_config.json")
    with open(quant_config_path) as file:
        hf_quant_config = json.load(file)
    hf_quant_config["quantization"]["weight_layout"] = "conv1d"
    with open(quant_config_path, "w") as file:
        json.dump(hf_quant_config, file, indent=4)
    # transformers reads config.json's copy, which ModelOpt writes without group_size.
    config_path = os.path.join(export_dir, "config.json")
    with open(config_path) as file:
        config = json.load(file)
    config["quantization_config"]["weight_layout"] = "conv1d"
    # float8 and --lm-head quantize lm_head, exported as its own tensor: loaders that tie it to wte would drop it.
    if lm_head_quantized:
        config["tie_word_embeddings"] = False
    if "group_size" in hf_quant_config["quantization"]:
        config["quantization_config"]["group_size"] = hf_quant_config["quantization"]["group_size"]
    with open(config_path, "w") as file:
        json.dump(config, file, indent=2)


def _is_quantized(module: torch.nn.Module) -> bool:
    quantizer = getattr(module, "weight_quantizer", None)
    return quantizer is not None and quantizer.is_enabled


def export_step(quantized_model: torch.nn.Module, export_dir: str, overwrite: bool = False) -> None:
    """example.py's --export-dir: writes the quantized model as a unified Hugging Face checkpoint, which TensorRT-LLM
    and vLLM load, into a new folder that becomes `export_dir` whole (cli/outputs.py); what it cannot export, and
    what cannot be written, is a UsageError."""
    start = time.perf_counter()
    try:
        with output_folder(export_dir, "--export-dir", overwrite) as folder:
            export_checkpoint(quantized_model, folder)
    except (ValueError, RuntimeError) as error:  # exports/checkpoint.py's documented limitations
        raise UsageError(f"cannot export to {export_dir}: {error}") from None
    print(f"Exported the quantized checkpoint to {export_dir} in {time.perf_counter() - start:.1f} s")
