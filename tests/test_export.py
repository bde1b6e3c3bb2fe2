"""The exported checkpoint holds what a serving engine reads, and it is the model Tripy runs.

Each mode is calibrated once (module-scoped fixture). The exported files are read back with safetensors and json and
checked against the PyTorch twin loaded by weight_loader from the same quantized model: same scales, and the exported
weights dequantize to the twin's weights.
"""

import json
import os
from dataclasses import dataclass

import pytest
import torch
from helpers import MIXED_LAYER_QUANT_MODES, make_gpt2
from safetensors import safe_open
from transformers import AutoConfig, GPT2Config

from config import AUTO_QUANT_MODE, INT4_BLOCK_SIZE, QUANT_MODES
from export import export_checkpoint
from quantization import Recipe, modelopt_quantize, quantize_with_recipe
from reference import GPT, Int4Linear, QuantLinear
from weight_loader import load_twin

# What ModelOpt 0.47 writes under "quantization" in hf_quant_config.json for each mode.
EXPECTED_QUANT_CONFIG = {
    "float8": {
        "quant_algo": "FP8",
        "kv_cache_quant_algo": None,
        "exclude_modules": ["transformer.wpe", "transformer.wte"],  # lm_head is quantized in float8
    },
    "int8-weight-only": {
        "quant_algo": "W8A16",
        "kv_cache_quant_algo": None,
        "exclude_modules": ["lm_head", "transformer.wpe", "transformer.wte"],
    },
    "int4-weight-only": {
        "quant_algo": "W4A16_AWQ",
        "kv_cache_quant_algo": None,
        "group_size": 128,
        "has_zero_point": False,
        "pre_quant_scale": True,
        "exclude_modules": ["lm_head", "transformer.wpe", "transformer.wte"],
    },
}
STORED_DTYPE = {"float8": torch.float8_e4m3fn, "int8-weight-only": torch.int8, "int4-weight-only": torch.uint8}
# A layer's entry under "quantized_layers" in a MIXED_PRECISION export (an AutoQuantize mix), by format.
MIXED_LAYER_CONFIG = {
    "float8": {"quant_algo": "FP8"},
    "int8-weight-only": {"quant_algo": "W8A16"},
    "int4-weight-only": {
        "quant_algo": "W4A16_AWQ",
        "group_size": 128,
        "has_zero_point": False,
        "pre_quant_scale": True,
    },
}


@dataclass
class Exported:
    mode: str
    export_dir: str
    twin: GPT  # loaded from the quantized model before the export
    logits_before: torch.Tensor  # the twin's logits before the export
    logits_after: torch.Tensor  # a twin loaded from the same model after the export


@pytest.fixture(scope="module", params=QUANT_MODES)
def exported(request, calibration_file, tmp_path_factory) -> Exported:
    mode = request.param
    quantized_model = modelopt_quantize(make_gpt2(), mode, dataset_name=calibration_file, num_samples=4, batch_size=4)
    idx = torch.tensor([[464, 3290, 318, 257, 922, 1110, 13]])  # [1, 7]
    twin = load_twin(quantized_model, mode, quantized_model)
    with torch.no_grad():
        logits_before = twin(idx)
        export_dir = str(tmp_path_factory.mktemp(f"export-{mode}"))
        export_checkpoint(quantized_model, export_dir)
        logits_after = load_twin(quantized_model, mode, quantized_model)(idx)
    return Exported(mode, export_dir, twin, logits_before, logits_after)


def read_tensors(export_dir: str) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(export_dir, "model.safetensors"), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def quantized_layers(twin: GPT) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in twin.named_modules() if isinstance(m, (QuantLinear, Int4Linear))}


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """ModelOpt's packed int4 [out / 2, in] (uint8; low nibble: row 2i, high nibble: row 2i + 1) -> int [out, in]."""
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=1).to(torch.int16)  # [out / 2, 2, in]
    nibbles = torch.where(nibbles > 7, nibbles - 16, nibbles)  # two's complement
    return nibbles.reshape(-1, packed.shape[1])


def test_export_leaves_the_quantized_model_as_it_was(exported):
    assert torch.equal(exported.logits_before, exported.logits_after)


def test_hf_quant_config_names_the_algorithm_and_the_excluded_modules(exported):
    with open(os.path.join(exported.export_dir, "hf_quant_config.json")) as f:
        hf_quant_config = json.load(f)
    assert hf_quant_config["producer"]["name"] == "modelopt"
    assert hf_quant_config["quantization"] == EXPECTED_QUANT_CONFIG[exported.mode]


def test_config_loads_with_transformers(exported):
    config = AutoConfig.from_pretrained(exported.export_dir)
    assert isinstance(config, GPT2Config)
    assert (config.n_embd, config.n_layer, config.n_head, config.vocab_size) == (256, 2, 4, 50257)
    assert config.architectures == ["GPT2LMHeadModel"]
    assert config.quantization_config["quant_method"] == "modelopt"
    assert config.quantization_config["quant_algo"] == EXPECTED_QUANT_CONFIG[exported.mode]["quant_algo"]


def test_weights_are_stored_quantized_with_the_tripy_scales(exported):
    tensors = read_tensors(exported.export_dir)
    layers = quantized_layers(exported.twin)
    assert len(layers) == 2 * 4 + (exported.mode == "float8")  # 4 linears per block, plus lm_head in float8
    for name, layer in layers.items():
        weight, weight_scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]
        assert weight.dtype == STORED_DTYPE[exported.mode], name
        if exported.mode == "int4-weight-only":
            in_features, out_features = layer.weight.shape
            assert weight.shape == (out_features // 2, in_features), name  # two output rows per byte
            # Exported [out, in / 128]; the Tripy layer blocks along its dim 0: [in / 128, out].
            assert weight_scale.shape == (out_features, in_features // INT4_BLOCK_SIZE), name
            assert torch.equal(weight_scale.t(), layer.weight_scale.detach()), name
            assert torch.equal(tensors[f"{name}.pre_quant_scale"], layer.pre_quant_scale.detach()), name
        else:
            assert weight.shape == layer.weight.shape, name  # [out, in]
            assert torch.equal(weight_scale, layer.weight_scale.detach()), name
        if exported.mode == "float8":
            assert torch.equal(tensors[f"{name}.input_scale"], layer.input_scale.detach()), name
        else:
            assert f"{name}.input_scale" not in tensors, name
    if exported.mode != "float8":
        assert not any(name.startswith("lm_head.") for name in tensors)  # tied to wte and left unquantized


def test_exported_weights_dequantize_to_the_twins_weights(exported):
    tensors = read_tensors(exported.export_dir)
    for name, layer in quantized_layers(exported.twin).items():
        weight, weight_scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]
        if exported.mode == "float8":
            dequantized = weight.float() * weight_scale  # [out, in]
        elif exported.mode == "int8-weight-only":
            dequantized = weight.float() * weight_scale[:, None]  # [out, in]
        else:
            scale = weight_scale.repeat_interleave(INT4_BLOCK_SIZE, dim=1)  # [out, in]
            dequantized = (unpack_int4(weight) * scale).t()  # [in, out], as the twin holds it
        torch.testing.assert_close(dequantized, layer.dequantized_weight, rtol=1e-6, atol=1e-7, msg=name)


def test_unquantized_tensors_are_the_models(exported):
    tensors = read_tensors(exported.export_dir)
    twin_state = exported.twin.state_dict()
    for name in [
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.ln_f.weight",
        "transformer.ln_f.bias",
    ]:
        assert torch.equal(tensors[name], twin_state[name]), name
    for name, layer in quantized_layers(exported.twin).items():
        if layer.bias is not None:  # lm_head has none
            assert torch.equal(tensors[f"{name}.bias"], twin_state[f"{name}.bias"]), name


def test_exports_a_saved_model_without_architectures(calibration_file, tmp_path):
    # save_pretrained leaves config.dtype as the string "float32", which ModelOpt alone fails on.
    model = make_gpt2()
    model.save_pretrained(tmp_path / "saved")
    model.config.architectures = None
    modelopt_quantize(model, "int8-weight-only", dataset_name=calibration_file, num_samples=4, batch_size=4)
    export_checkpoint(model, str(tmp_path / "export"))
    config = AutoConfig.from_pretrained(tmp_path / "export")
    assert config.architectures == ["GPT2LMHeadModel"]
    assert config.quantization_config["quant_algo"] == "W8A16"
    assert model.config.architectures is None  # set on the exported copy only


def test_unquantized_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has no quantizers"):
        export_checkpoint(make_gpt2(), str(tmp_path))


@pytest.fixture(scope="module")
def exported_mixed(calibration_file, tmp_path_factory) -> tuple[str, GPT]:
    """A mix of every format and an unquantized layer, as AutoQuantize makes it; the export and the twin."""
    recipe = Recipe(MIXED_LAYER_QUANT_MODES, effective_bits=0.0)
    quantized_model = quantize_with_recipe(make_gpt2(), recipe, calibration_file, num_samples=4, batch_size=4)
    twin = load_twin(quantized_model, AUTO_QUANT_MODE, quantized_model, layer_quant_modes=MIXED_LAYER_QUANT_MODES)
    export_dir = str(tmp_path_factory.mktemp("export-mixed"))
    export_checkpoint(quantized_model, export_dir)
    return export_dir, twin


def test_mixed_export_names_each_layers_format(exported_mixed):
    export_dir, _ = exported_mixed
    with open(os.path.join(export_dir, "hf_quant_config.json")) as f:
        quantization = json.load(f)["quantization"]
    assert quantization["quant_algo"] == "MIXED_PRECISION"
    expected = {layer: MIXED_LAYER_CONFIG[mode] for layer, mode in MIXED_LAYER_QUANT_MODES.items() if mode is not None}
    assert quantization["quantized_layers"] == expected  # the unquantized layer and lm_head are not listed
    assert AutoConfig.from_pretrained(export_dir).quantization_config["quant_algo"] == "MIXED_PRECISION"


def test_mixed_export_stores_each_layer_in_its_format(exported_mixed):
    export_dir, twin = exported_mixed
    tensors = read_tensors(export_dir)
    for name, mode in MIXED_LAYER_QUANT_MODES.items():
        layer = twin.get_submodule(name)
        weight = tensors[f"{name}.weight"]
        if mode is None:
            assert torch.equal(weight, layer.weight.detach()), name  # [out, in], as it was
            assert f"{name}.weight_scale" not in tensors, name
            continue
        assert weight.dtype == STORED_DTYPE[mode], name
        weight_scale = tensors[f"{name}.weight_scale"]
        if mode == "float8":
            dequantized = weight.float() * weight_scale
            assert torch.equal(tensors[f"{name}.input_scale"], layer.input_scale.detach()), name
        elif mode == "int8-weight-only":
            dequantized = weight.float() * weight_scale[:, None]
        else:
            scale = weight_scale.repeat_interleave(INT4_BLOCK_SIZE, dim=1)
            dequantized = (unpack_int4(weight) * scale).t()
            assert torch.equal(tensors[f"{name}.pre_quant_scale"], layer.pre_quant_scale.detach()), name
        torch.testing.assert_close(dequantized, layer.dequantized_weight, rtol=1e-6, atol=1e-7, msg=name)
