"""The exported checkpoint holds what a serving engine reads, it is the model Tripy runs, and transformers loads it.

Each mode is calibrated once (module-scoped fixture). The exported files are read back with safetensors and json and
checked against the PyTorch twin loaded by weight_loader from the same quantized model: same scales, and the exported
weights dequantize to the twin's weights. Then the export is loaded the ways a user loads it: with transformers'
from_pretrained (through modelopt_hf's HfQuantizer) and into a twin (export_loader.load_weights_from_export), and
both must compute what the twin of the calibrated model computes.
"""

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass

import pytest
import torch
from helpers import MIXED_LAYER_QUANT_MODES, make_gpt2, usage_error
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config

import reference
import serve_vllm
from config import AUTO_QUANT_MODE, INT4_BLOCK_SIZE, QUANT_MODES
from evaluate import weight_bytes
from exports import modelopt_hf
from exports.checkpoint import export_checkpoint, export_step
from measure.twin import load_export_twin, load_twin
from quant.auto_quantize import Recipe, quantize_with_recipe
from quantization import modelopt_quantize
from reference import GPT, Int4Linear, QuantLinear, SmoothQuantLinear

# What ModelOpt 0.47 writes under "quantization" in hf_quant_config.json for each mode.
EXPECTED_QUANT_CONFIG = {
    "float8": {
        "quant_algo": "FP8",
        "kv_cache_quant_algo": None,
        "exclude_modules": ["transformer.wpe", "transformer.wte"],  # lm_head is quantized in float8
        "weight_layout": "conv1d",
    },
    "int8-weight-only": {
        "quant_algo": "W8A16",
        "kv_cache_quant_algo": None,
        "exclude_modules": ["lm_head", "transformer.wpe", "transformer.wte"],
        "weight_layout": "conv1d",
    },
    "int4-weight-only": {
        "quant_algo": "W4A16_AWQ",
        "kv_cache_quant_algo": None,
        "group_size": 128,
        "has_zero_point": False,
        "pre_quant_scale": True,
        "exclude_modules": ["lm_head", "transformer.wpe", "transformer.wte"],
        "weight_layout": "conv1d",
    },
    "int8-smoothquant": {
        "quant_algo": "W8A8_SQ_PER_CHANNEL",
        "kv_cache_quant_algo": None,
        "exclude_modules": ["lm_head", "transformer.wpe", "transformer.wte"],
        "weight_layout": "conv1d",
    },
}
STORED_DTYPE = {
    "float8": torch.float8_e4m3fn,
    "int8-weight-only": torch.int8,
    "int4-weight-only": torch.uint8,
    "int8-smoothquant": torch.int8,
}
IDX = torch.tensor([[464, 3290, 318, 257, 922, 1110, 13]])  # [1, 7]
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
    twin = load_twin(quantized_model, mode, quantized_model)
    with torch.no_grad():
        logits_before = twin(IDX)
        export_dir = str(tmp_path_factory.mktemp(f"export-{mode}"))
        export_step(quantized_model, export_dir)  # as --export-dir writes it: export_checkpoint via cli/outputs.py
        logits_after = load_twin(quantized_model, mode, quantized_model)(IDX)
    return Exported(mode, export_dir, twin, logits_before, logits_after)


def read_tensors(export_dir: str) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(export_dir, "model.safetensors"), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def quantized_layers(twin: GPT) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in twin.named_modules() if isinstance(m, (QuantLinear, Int4Linear, SmoothQuantLinear))}


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Packed int4 in GPT-2's layout [in, out / 2] (uint8; low nibble: output 2i, high nibble: output 2i + 1)
    -> int [in, out]."""
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=2).to(torch.int16)  # [in, out / 2, 2]
    nibbles = torch.where(nibbles > 7, nibbles - 16, nibbles)  # two's complement
    return nibbles.reshape(packed.shape[0], -1)


def test_export_leaves_the_quantized_model_as_it_was(exported):
    assert torch.equal(exported.logits_before, exported.logits_after)


def test_hf_quant_config_names_the_algorithm_and_the_excluded_modules(exported):
    with open(os.path.join(exported.export_dir, "hf_quant_config.json")) as f:
        hf_quant_config = json.load(f)
    assert hf_quant_config["producer"]["name"] == "modelopt"
    assert hf_quant_config["quantization"] == EXPECTED_QUANT_CONFIG[exported.mode]


def test_every_exported_file_has_the_mode_the_umask_gives(exported):
    """safetensors writes model.safetensors for its owner only (0600), the JSON files follow the umask (0644), and
    the temporary folder the export is written in is its owner's (0700): cli/outputs.py gives each the umask's mode."""
    umask = os.umask(0)
    os.umask(umask)
    modes = {entry.name: entry.stat().st_mode & 0o777 for entry in os.scandir(exported.export_dir)}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask) and "model.safetensors" in modes
    assert os.stat(exported.export_dir).st_mode & 0o777 == 0o777 & ~umask


def test_config_loads_with_transformers(exported):
    config = AutoConfig.from_pretrained(exported.export_dir)
    assert isinstance(config, GPT2Config)
    assert (config.n_embd, config.n_layer, config.n_head, config.vocab_size) == (256, 2, 4, 50257)
    assert config.architectures == ["GPT2LMHeadModel"]
    assert config.quantization_config["quant_method"] == "modelopt"
    assert config.quantization_config["quant_algo"] == EXPECTED_QUANT_CONFIG[exported.mode]["quant_algo"]
    assert config.quantization_config["weight_layout"] == "conv1d"
    # float8 exports lm_head as its own float8 tensor: a loader must not tie it back to wte.
    assert config.tie_word_embeddings == (exported.mode != "float8")


def test_weights_are_stored_quantized_with_the_tripy_scales(exported):
    tensors = read_tensors(exported.export_dir)
    layers = quantized_layers(exported.twin)
    assert len(layers) == 2 * 4 + (exported.mode == "float8")  # 4 linears per block, plus lm_head in float8
    for name, layer in layers.items():
        weight, weight_scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]
        assert weight.dtype == STORED_DTYPE[exported.mode], name
        if exported.mode == "int4-weight-only":
            in_features, out_features = layer.weight.shape
            assert weight.shape == (in_features, out_features // 2), name  # GPT-2's [in, out], two outputs per byte
            # Exported [out, in / 128]; the Tripy layer blocks along its dim 0: [in / 128, out].
            assert weight_scale.shape == (out_features, in_features // INT4_BLOCK_SIZE), name
            assert torch.equal(weight_scale.t(), layer.weight_scale.detach()), name
            assert torch.equal(tensors[f"{name}.pre_quant_scale"], layer.pre_quant_scale.detach()), name
        else:
            out_features, in_features = layer.weight.shape
            # GPT-2's Conv1D layout, [in, out], except lm_head, an nn.Linear in GPT-2 too.
            assert weight.shape == ((out_features, in_features) if name == "lm_head" else (in_features, out_features))
            assert torch.equal(weight_scale, layer.weight_scale.detach()), name
        if exported.mode in ("float8", "int8-smoothquant"):
            assert torch.equal(tensors[f"{name}.input_scale"], layer.input_scale.detach()), name
        else:
            assert f"{name}.input_scale" not in tensors, name
        if exported.mode == "int8-smoothquant":  # the MLP's c_proj a factor of ones (quantization.unsmooth_after_gelu)
            assert torch.equal(tensors[f"{name}.pre_quant_scale"], layer.pre_quant_scale.detach()), name
    if exported.mode != "float8":
        assert not any(name.startswith("lm_head.") for name in tensors)  # tied to wte and left unquantized


def test_exported_weights_dequantize_to_the_twins_weights(exported):
    tensors = read_tensors(exported.export_dir)
    for name, layer in quantized_layers(exported.twin).items():
        weight, weight_scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]
        if name != "lm_head":
            weight = weight.t()  # GPT-2's [in, out] -> [out, in] (int4: [out / 2, in])
        if exported.mode == "float8":
            dequantized = weight.float() * weight_scale  # [out, in]
        elif exported.mode in ("int8-weight-only", "int8-smoothquant"):
            dequantized = weight.float() * weight_scale[:, None]  # [out, in]
        else:
            scale = weight_scale.t().repeat_interleave(INT4_BLOCK_SIZE, dim=0)  # [in, out]
            dequantized = unpack_int4(weight.t()) * scale  # [in, out], as the twin holds it
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


def test_export_carries_gpt2s_tokenizer(exported):
    tokenizer = AutoTokenizer.from_pretrained(exported.export_dir)
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]  # GPT-2's ids, as tiktoken's gpt2 gives them
    assert tokenizer.eos_token_id == 50256


def load_with_transformers(export_dir: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(export_dir, dtype=dtype).eval()


def test_transformers_holds_the_weights_in_their_stored_types(exported):
    model = load_with_transformers(exported.export_dir)
    tensors = read_tensors(exported.export_dir)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, modelopt_hf.ModelOptLinear)}
    assert sorted(layers) == sorted(quantized_layers(exported.twin))
    for name, layer in layers.items():
        for param_name, param in layer.named_parameters():
            assert param.dtype == tensors[f"{name}.{param_name}"].dtype, f"{name}.{param_name}"
            assert torch.equal(param, tensors[f"{name}.{param_name}"]), f"{name}.{param_name}"
    assert layers["transformer.h.0.mlp.c_fc"].weight.dtype == STORED_DTYPE[exported.mode]


def test_transformers_layers_compute_the_twins_weights(exported):
    """Layer by layer, so that a square layer (attn.c_proj, [256, 256]) read in the wrong layout is caught by name."""
    model = load_with_transformers(exported.export_dir)
    twin_layers = quantized_layers(exported.twin)
    for name, layer in model.named_modules():
        if isinstance(layer, modelopt_hf.ModelOptLinear):
            weight = modelopt_hf.dequantize_weight(
                layer.weight, layer.weight_scale, exported.mode, layer.conv1d, layer.group_size
            )  # [out, in]
            expected = twin_layers[name].dequantized_weight  # [out, in], int4 [in, out]
            if exported.mode == "int4-weight-only":
                expected = expected.t()
            torch.testing.assert_close(weight, expected, rtol=1e-6, atol=1e-7, msg=name)


def logits_bound(mode: str) -> float:
    """How far two computations of one quantized model may differ, as a fraction of the largest logit, when they order
    some float32 sums differently: 1e-5 for weight-only modes. int8-smoothquant rounds every layer's input to an int8
    step of 1/127 of its amax, and a last-bit difference on a rounding boundary moves a value by a whole step, and
    every later logit a little with it (seen: 0.012 of a largest logit of 1.5): 2%. Dropping SmoothQuant's factor or
    its input quantization moves the logits by many times that (tests/test_quantization.py)."""
    return 2e-2 if mode == "int8-smoothquant" else 1e-5


def test_transformers_logits_equal_the_twins(exported):
    """float8 bit for bit; the other modes within logits_bound (transformers' GPT-2 and the twin order some float32
    sums differently)."""
    with torch.no_grad():
        logits = load_with_transformers(exported.export_dir)(IDX).logits
    if exported.mode == "float8":
        assert torch.equal(logits, exported.logits_before)
    else:
        gap = (logits - exported.logits_before).abs().max()
        assert gap <= logits_bound(exported.mode) * exported.logits_before.abs().max()


def test_transformers_generates_the_twins_greedy_tokens(exported):
    model = load_with_transformers(exported.export_dir)
    generated = model.generate(IDX, max_new_tokens=8, do_sample=False, pad_token_id=50256)
    expected = reference.generate(exported.twin, IDX, 8, top_k=1)
    assert torch.equal(generated, expected)


def test_transformers_weights_take_the_bytes_the_quality_report_counts(exported):
    """Loaded in float16, the precision evaluate.weight_bytes counts high-precision tensors in."""
    model = load_with_transformers(exported.export_dir, dtype=torch.float16)
    loaded_bytes = sum(param.numel() * param.element_size() for param in model.parameters())  # tied: counted once
    assert loaded_bytes == weight_bytes(exported.twin)


def test_transformers_reads_modelopts_own_layout_too(exported, tmp_path):
    """An export in ModelOpt's layout (weights [out, in], no weight_layout recorded) loads to the same model."""
    linear_dir = tmp_path / "linear-layout"
    shutil.copytree(exported.export_dir, linear_dir)
    tensors = load_file(linear_dir / "model.safetensors")
    for name in quantized_layers(exported.twin):
        if name != "lm_head":
            tensors[f"{name}.weight"] = tensors[f"{name}.weight"].t().contiguous()
    save_file(tensors, linear_dir / "model.safetensors", metadata={"format": "pt"})
    for file_name, section in (("hf_quant_config.json", "quantization"), ("config.json", "quantization_config")):
        config = json.loads((linear_dir / file_name).read_text())
        del config[section]["weight_layout"]
        (linear_dir / file_name).write_text(json.dumps(config))
    with torch.no_grad():
        logits = load_with_transformers(str(linear_dir))(IDX).logits
        exported_logits = load_with_transformers(exported.export_dir)(IDX).logits
    # The same weights; a transposed copy can change the order of float32 sums in the matmul (seen on CI: 1.5e-6 with
    # a largest logit of 1.5), so the bound of the transformers-vs-twin test.
    atol = logits_bound(exported.mode) * exported_logits.abs().max().item()
    torch.testing.assert_close(logits, exported_logits, rtol=0, atol=atol)


def test_twin_loaded_from_the_export_computes_the_exporting_runs_logits(exported):
    """What example.py --model-type EXPORT_DIR runs: no calibration, the same logits, bit for bit."""
    with torch.no_grad():
        logits = load_export_twin(exported.export_dir)(IDX)
    assert torch.equal(logits, exported.logits_before)


def test_int4_calibrated_without_awq_exports_a_pre_quant_scale_of_ones(calibration_file, tmp_path):
    """int4 calibrated with max (qat.py's default) has no pre_quant_scale. ModelOpt exports it as W4A16_AWQ all the
    same, "pre_quant_scale": true, so the export must hold the tensor: ones, the scale that changes nothing."""
    quantized_model = modelopt_quantize(
        make_gpt2(), "int4-weight-only", dataset_name=calibration_file, num_samples=4, batch_size=4, algorithm="max"
    )
    assert not [name for name, _ in quantized_model.named_buffers() if name.endswith("_pre_quant_scale")]
    with torch.no_grad():
        expected = load_twin(quantized_model, "int4-weight-only", quantized_model)(IDX)
    export_dir = str(tmp_path / "int4-max")
    export_checkpoint(quantized_model, export_dir)
    assert not [name for name, _ in quantized_model.named_buffers() if name.endswith("_pre_quant_scale")]

    with open(os.path.join(export_dir, "hf_quant_config.json")) as f:
        assert json.load(f)["quantization"] == EXPECTED_QUANT_CONFIG["int4-weight-only"]
    tensors = read_tensors(export_dir)
    for name in MIXED_LAYER_QUANT_MODES:  # every block linear of make_gpt2's two blocks
        in_features = quantized_model.get_submodule(name).weight.shape[1]  # QuantLinear: [out, in]
        assert torch.equal(tensors[f"{name}.pre_quant_scale"], torch.ones(in_features)), name
    with torch.no_grad():
        assert torch.equal(load_export_twin(export_dir)(IDX), expected)  # what example.py --model-type runs
        logits = load_with_transformers(export_dir)(IDX).logits
    assert (logits - expected).abs().max() <= 1e-5 * expected.abs().max()  # as test_transformers_logits_equal_...


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
        weight = tensors[f"{name}.weight"].t()  # GPT-2's [in, out] -> [out, in] (int4: [out / 2, in])
        if mode is None:
            assert torch.equal(weight, layer.weight.detach()), name  # unquantized, in the same layout
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
            scale = weight_scale.t().repeat_interleave(INT4_BLOCK_SIZE, dim=0)  # [in, out]
            dequantized = unpack_int4(weight.t()) * scale  # [in, out], as the twin holds it
            assert torch.equal(tensors[f"{name}.pre_quant_scale"], layer.pre_quant_scale.detach()), name
        torch.testing.assert_close(dequantized, layer.dequantized_weight, rtol=1e-6, atol=1e-7, msg=name)


def test_serve_vllm_refuses_what_it_cannot_serve_in_one_line(exported, capsys):
    """Before vLLM is imported: a format its ModelOpt loader does not read, a generation longer than the context,
    and (where it is not installed, as in CI) vLLM itself."""
    if exported.mode not in serve_vllm.SERVED_MODES:
        line = usage_error(serve_vllm.main, [exported.export_dir], "serve_vllm.py", capsys)
        assert f"is a {exported.mode} export" in line and "vLLM serves float8 (FP8) and int8-smoothquant" in line
        return
    line = usage_error(serve_vllm.main, [exported.export_dir, "--max-tokens", "128"], "serve_vllm.py", capsys)
    assert "plus --max-tokens (128) is longer than the 128 tokens the model can attend to" in line
    if importlib.util.find_spec("vllm") is None:
        line = usage_error(serve_vllm.main, [exported.export_dir], "serve_vllm.py", capsys)
        assert "vLLM is not installed in this environment" in line


@pytest.fixture(scope="module")
def exported_head(calibration_file, tmp_path_factory) -> tuple[str, torch.nn.Module, GPT]:
    """int8-weight-only with its output layer in int8 too (--lm-head int8-weight-only): the export, ModelOpt's
    fake-quantized model and its twin."""
    mode = "int8-weight-only"
    quantized_model = modelopt_quantize(
        make_gpt2(), mode, dataset_name=calibration_file, num_samples=4, batch_size=4, lm_head_mode=mode
    )
    export_dir = str(tmp_path_factory.mktemp("export-lm-head"))
    export_step(quantized_model, export_dir)
    return export_dir, quantized_model, load_twin(quantized_model, mode, quantized_model, lm_head_mode=mode)


def test_an_int8_output_layer_is_stored_int8_with_the_twins_scales(exported_head):
    export_dir, _, twin = exported_head
    with open(os.path.join(export_dir, "hf_quant_config.json")) as f:
        quantization = json.load(f)["quantization"]
    assert quantization["quant_algo"] == "W8A16" and "lm_head" not in quantization["exclude_modules"]
    assert AutoConfig.from_pretrained(export_dir).tie_word_embeddings is False  # a loader must not tie it back
    tensors = read_tensors(export_dir)
    weight, weight_scale = tensors["lm_head.weight"], tensors["lm_head.weight_scale"]  # nn.Linear's [out, in]
    assert weight.dtype == torch.int8 and weight.shape == twin.lm_head.weight.shape
    # the hand-computed scale: each output row's largest weight over int8's 127
    hand_scale = twin.lm_head.weight.detach().abs().amax(dim=1) / 127
    torch.testing.assert_close(weight_scale, hand_scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(weight_scale, twin.lm_head.weight_scale.detach(), rtol=0, atol=0)
    dequantized = weight.float() * weight_scale[:, None]
    torch.testing.assert_close(dequantized, twin.lm_head.dequantized_weight, rtol=1e-6, atol=1e-7)
    # the input embedding stays the model's own, unquantized
    assert torch.equal(tensors["transformer.wte.weight"], twin.transformer.wte.weight.detach())


def test_an_int8_output_layer_loads_into_transformers_and_the_twin_as_calibrated(exported_head):
    """transformers (through the HfQuantizer) and example.py --model-type EXPORT compute the calibrated twin's logits,
    which are ModelOpt's fake-quantized model's but for a few rounding ties (tests/test_quantization.py)."""
    export_dir, quantized_model, twin = exported_head
    with torch.no_grad():
        expected = twin(IDX)
        modelopt_logits = quantized_model(IDX).logits
        model = load_with_transformers(export_dir)
        logits = model(IDX).logits
        export_twin = load_export_twin(export_dir)
        export_logits = export_twin(IDX)
    assert isinstance(model.lm_head, modelopt_hf.ModelOptLinear) and model.lm_head.weight.dtype == torch.int8
    assert (logits - expected).abs().max() <= logits_bound("int8-weight-only") * expected.abs().max()
    assert isinstance(export_twin.lm_head, QuantLinear)
    assert torch.equal(export_logits, expected)
    assert torch.isclose(expected, modelopt_logits, atol=1e-4, rtol=1e-4).float().mean() > 0.999
    generated = model.generate(IDX, max_new_tokens=8, do_sample=False, pad_token_id=50256)
    assert torch.equal(generated, reference.generate(twin, IDX, 8, top_k=1))


def test_serve_vllm_refuses_an_output_layer_quantized_by_lm_head_saying_why(exported_head, capsys):
    line = usage_error(serve_vllm.main, [exported_head[0]], "serve_vllm.py", capsys)
    assert "is a int8-weight-only export (W8A16)" in line
    assert "none with an output layer quantized by --lm-head: vLLM's CPU build computes int8 only as W8A8" in line


def test_an_int4_output_layer_is_not_exported(calibration_file, tmp_path):
    """ModelOpt packs int4 two output rows to a byte: GPT-2's 50257 rows cannot be; refused before ModelOpt tries."""
    quantized_model = modelopt_quantize(
        make_gpt2(), "int8-weight-only", calibration_file, num_samples=4, lm_head_mode="int4-weight-only"
    )
    with pytest.raises(ValueError, match="an output layer of an odd number of rows"):
        export_checkpoint(quantized_model, str(tmp_path / "export"))
    assert not (tmp_path / "export").exists()
