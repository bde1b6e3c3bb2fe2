"""The compressed-tensors folder exports/vllm_int8.py writes for vLLM is the int8-smoothquant model, factors folded.

vLLM itself runs in its own environment (tests/test_vllm.py); here the folder is read back into the twin, by the
layout vLLM reads (int8 weights [in, out] that its GPT-2 transposes, weight_scale [out, 1], input_scale [1], no
pre_quant_scale), and must compute what the twin of the export computes, factors and all.
"""

import json
import os

import pytest
import torch
from helpers import make_gpt2
from safetensors.torch import load_file

from config import config_from_hf_config
from exports.checkpoint import export_checkpoint
from exports.modelopt_hf import CONV1D_LAYERS
from exports.vllm_int8 import QUANTIZATION_CONFIG, write_compressed_tensors
from measure.twin import load_export_twin, load_twin
from quantization import modelopt_quantize
from reference import GPT
from weight_loader import load_into

TOKENS = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def folders(calibration_file, tmp_path_factory) -> tuple[torch.nn.Module, str, str]:
    """(the unquantized model, its int8-smoothquant export, the export rewritten for vLLM)."""
    hf_model = make_gpt2()
    quantized = modelopt_quantize(make_gpt2(), "int8-smoothquant", calibration_file, num_samples=4, batch_size=4)
    export_dir = str(tmp_path_factory.mktemp("export"))
    export_checkpoint(quantized, export_dir)
    vllm_dir = str(tmp_path_factory.mktemp("vllm"))
    write_compressed_tensors(export_dir, vllm_dir)
    return hf_model, export_dir, vllm_dir


def twin_of_compressed_tensors(vllm_dir: str, hf_model: torch.nn.Module) -> GPT:
    """The twin holding the folder as vLLM reads it: the int8 weights times their scales, each layer's factor one."""
    stored = load_file(os.path.join(vllm_dir, "model.safetensors"))
    tensors = {}
    for name, tensor in stored.items():
        layer, param = name.rsplit(".", 1)
        if not layer.endswith(CONV1D_LAYERS):
            tensors[name] = tensor.float()
        elif param == "weight":
            weight = tensor.t().float()  # GPT-2's [in, out], which vLLM's GPT-2 transposes: [out, in]
            tensors[name] = weight * stored[f"{layer}.weight_scale"]  # [out, 1]
            tensors[f"{layer}.pre_quant_scale"] = torch.ones(weight.shape[1])
        elif param in ("weight_scale", "input_scale"):
            tensors[name] = tensor.squeeze()
        else:
            tensors[name] = tensor
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"]  # tied, as vLLM ties it
    config = config_from_hf_config(hf_model.config, dtype="float32", quant_mode="int8-smoothquant")
    twin = GPT(config).eval()
    load_into(twin, tensors, torch.float32)
    return twin


def test_the_folder_has_vllms_int8_w8a8_layout(folders):
    _, _, vllm_dir = folders
    with open(os.path.join(vllm_dir, "config.json")) as file:
        assert json.load(file)["quantization_config"] == QUANTIZATION_CONFIG
    stored = load_file(os.path.join(vllm_dir, "model.safetensors"))
    layer = "transformer.h.1.mlp.c_fc"
    assert stored[f"{layer}.weight"].dtype == torch.int8 and stored[f"{layer}.weight"].shape == (256, 1024)
    assert stored[f"{layer}.weight_scale"].dtype == torch.float32 and stored[f"{layer}.weight_scale"].shape == (1024, 1)
    assert stored[f"{layer}.input_scale"].dtype == torch.float32 and stored[f"{layer}.input_scale"].shape == (1,)
    assert not [name for name in stored if name.endswith("pre_quant_scale")]


@torch.no_grad()
def test_the_folded_model_computes_the_exports(folders):
    """The same model in exact arithmetic; float32 rounds the folded products in other places, which can move an
    activation across an int8 rounding boundary now and then: a tenth of what quantizing changes, as the parity tests
    allow. A fold missing its LayerNorm or its value rows would be off by far more (tests/test_quantization.py)."""
    hf_model, export_dir, vllm_dir = folders
    expected = load_export_twin(export_dir)(TOKENS)
    quantization_effect = (expected - hf_model(TOKENS).logits).abs().max()
    folded = twin_of_compressed_tensors(vllm_dir, hf_model)(TOKENS)
    assert (folded - expected).abs().max() < 0.1 * quantization_effect


def test_other_exports_are_refused(calibration_file, tmp_path):
    quantized = modelopt_quantize(make_gpt2(), "int8-weight-only", calibration_file, num_samples=4, batch_size=4)
    export_checkpoint(quantized, str(tmp_path / "export"))
    with pytest.raises(ValueError, match="is a int8-weight-only export .W8A16., not int8-smoothquant"):
        write_compressed_tensors(str(tmp_path / "export"), str(tmp_path / "vllm"))


def test_the_twin_of_the_export_is_the_twin_of_the_calibrated_model(folders, calibration_file):
    """What the folded model is compared with above is the calibrated model: the export changed nothing."""
    hf_model, export_dir, _ = folders
    quantized = modelopt_quantize(make_gpt2(), "int8-smoothquant", calibration_file, num_samples=4, batch_size=4)
    with torch.no_grad():
        expected = load_twin(hf_model, "int8-smoothquant", quantized)(TOKENS)
        assert torch.equal(load_export_twin(export_dir)(TOKENS), expected)
