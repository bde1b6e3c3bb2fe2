"""Exports the ModelOpt-quantized GPT-2 as a unified Hugging Face checkpoint, the format serving engines load.

ModelOpt's `export_hf_checkpoint` writes each quantized weight in its stored type (float8 E4M3, int8, or int4 packed
two per byte) next to its scales, as safetensors, and names the algorithm in hf_quant_config.json (also copied into
config.json as `quantization_config`). TensorRT-LLM, vLLM and SGLang read that format. The scales come from the same
calibrated amaxes that weight_loader.py turns into the Tripy model's scales, so the engine and Tripy run the same
quantized model.
"""

import copy
import os

import torch
from modelopt.torch.export import export_hf_checkpoint
from transformers import GPT2LMHeadModel


def export_checkpoint(quantized_model: GPT2LMHeadModel, export_dir: str) -> None:
    """Writes a GPT-2 quantized by `quantization.modelopt_quantize` to `export_dir` as ModelOpt's unified checkpoint.

    Files: model.safetensors, hf_quant_config.json, config.json, generation_config.json. Unquantized tensors
    (embeddings, LayerNorms, biases) keep the model's dtype. `quantized_model` is left as it was, so weight_loader can
    still read it afterwards.
    """
    if not any(_is_quantized(module) for module in quantized_model.modules()):
        raise ValueError("export_checkpoint needs a GPT-2 quantized by modelopt_quantize; this model has no quantizers")
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
    before = _file_states(export_dir)
    with torch.inference_mode():
        export_hf_checkpoint(model, dtype=dtype, export_dir=export_dir)
    # safetensors writes model.safetensors readable by its owner only, next to JSON files that follow the umask:
    # every file the export wrote gets the mode a new file gets here.
    umask = os.umask(0)
    os.umask(umask)
    for name, state in _file_states(export_dir).items():
        if before.get(name) != state:
            os.chmod(os.path.join(export_dir, name), 0o666 & ~umask)


def _file_states(folder: str) -> dict[str, tuple[int, int, int]]:
    """name -> (inode, size, modification time) of each file in `folder`: what tells a rewritten file."""
    if not os.path.isdir(folder):
        return {}
    states = {}
    for entry in os.scandir(folder):
        if entry.is_file():
            stat = entry.stat()
            states[entry.name] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return states


def _is_quantized(module: torch.nn.Module) -> bool:
    quantizer = getattr(module, "weight_quantizer", None)
    return quantizer is not None and quantizer.is_enabled
