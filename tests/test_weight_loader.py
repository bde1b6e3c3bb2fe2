import json
import time
from dataclasses import replace

import huggingface_hub.constants
import pytest
import torch
from helpers import make_gpt2
from torch import nn

from quantization import SHIPPED_CALIBRATION_TEXT as CALIBRATION_TEXT
from reference import GPT
from sources.hub import HubUnreachableError, hub_offline, load_hf_model
from sources.tokenizer import gpt2_encoding, gpt2_tokenizer
from weight_loader import (
    config_from_hf,
    convert_to_scale,
    get_submodule,
    load_quant_weights_from_hf,
    load_weights_from_hf,
)


def test_get_submodule_follows_attributes_lists_and_dicts():
    inner = nn.Linear(2, 2)
    root = nn.Module()
    root.blocks = nn.ModuleList([nn.Identity(), nn.ModuleDict({"proj": inner})])
    assert get_submodule(root, "blocks.1.proj") is inner
    assert get_submodule(root, "blocks.1.proj.weight") is inner.weight
    plain = type("TripyLike", (), {"h": [{"ln": "layer norm"}]})()  # Tripy modules hold plain lists and dicts
    assert get_submodule(plain, "h.0.ln") == "layer norm"


@pytest.mark.parametrize("path, missing", [("blocks.2", "'2'"), ("blocks.1.nope", "'nope'"), ("head", "'head'")])
def test_get_submodule_names_the_missing_part_and_the_path(path, missing):
    root = nn.Module()
    root.blocks = nn.ModuleList([nn.Identity(), nn.ModuleDict({"proj": nn.Identity()})])
    with pytest.raises(AttributeError, match=f"{missing} in path '{path}'"):
        get_submodule(root, path)


def test_convert_to_scale_divides_and_squeezes():
    scale = convert_to_scale(torch.tensor([[254.0], [63.5]], dtype=torch.float16), 127)
    assert scale.dtype == torch.float32 and scale.shape == (2,)
    torch.testing.assert_close(scale, torch.tensor([2.0, 0.5]))
    assert convert_to_scale(torch.tensor(448.0), 448).shape == ()


def test_loading_into_a_model_of_another_shape_lists_missing_and_unexpected(gpt2_checkpoint):
    hf_model = load_hf_model(gpt2_checkpoint)
    config = config_from_hf(hf_model, dtype="float32")
    twin = GPT(replace(config, num_layers=3))
    with pytest.raises(ValueError, match=r"Missing: \['transformer\.h\.2\.attn\.c_attn\.bias'.*Unexpected: \[\]"):
        load_weights_from_hf(twin, gpt2_checkpoint, torch.float32, hf_model=hf_model)
    twin = GPT(replace(config, num_layers=1))
    with pytest.raises(ValueError, match=r"Missing: \[\]\. Unexpected: \['transformer\.h\.1\.attn"):
        load_weights_from_hf(twin, gpt2_checkpoint, torch.float32, hf_model=hf_model)
    twin = GPT(replace(config, block_size=64))
    with pytest.raises(ValueError, match=r"transformer\.wpe\.weight: model \(64, 256\), weights \(128, 256\)"):
        load_weights_from_hf(twin, gpt2_checkpoint, torch.float32, hf_model=hf_model)


def test_load_weights_from_a_checkpoint_directory(gpt2_checkpoint):
    twin = GPT(config_from_hf(load_hf_model(gpt2_checkpoint), dtype="float32"))
    load_weights_from_hf(twin, gpt2_checkpoint, torch.float32)
    hf_model = load_hf_model(gpt2_checkpoint)
    torch.testing.assert_close(twin.transformer.h[1].mlp.c_fc.weight, hf_model.transformer.h[1].mlp.c_fc.weight.t())


def test_unknown_model_type_lists_what_is_accepted():
    with pytest.raises(ValueError, match="expected one of gpt2, gpt2-medium, gpt2-large, gpt2-xl or a local"):
        load_hf_model("gpt3")


def test_directory_that_is_not_a_gpt2_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="is not a Hugging Face GPT-2 checkpoint"):
        load_hf_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="is not a Hugging Face GPT-2 checkpoint"):
        load_hf_model(str(tmp_path))


def test_hub_model_offline_fails_fast_and_suggests_a_local_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(HubUnreachableError, match="Cannot download gpt2-xl.*local GPT-2 checkpoint directory"):
        load_hf_model("gpt2-xl")
    assert time.perf_counter() - start < 5


def test_offline_tokenizers_match_gpt2_known_encoding():
    assert gpt2_encoding().encode("Hello world") == [15496, 995]
    assert gpt2_tokenizer().encode("Hello world") == [15496, 995]
    text = "ModelOpt's amax -> scale = amax / 127.\n\nIt's 2026; naïve café!"
    assert gpt2_encoding().encode(text) == gpt2_tokenizer().encode(text)


def test_a_scale_float16_cannot_hold_is_an_error_not_a_silent_loss():
    """A layer with tiny weights gets int8 scales below float16's smallest normal (6.1e-5): loading it in float16
    names the scale; float32 holds it."""
    from quantization import modelopt_quantize

    hf_model = make_gpt2(n_embd=128, n_layer=1, n_head=4, n_positions=32)
    with torch.no_grad():
        hf_model.transformer.h[0].attn.c_proj.weight.mul_(1e-3)  # row amax ~1e-4: scale ~1e-6
    modelopt_quantize(hf_model, "int8-weight-only", CALIBRATION_TEXT, batch_size=4, num_samples=4)
    config = config_from_hf(hf_model, dtype="float16", quant_mode="int8-weight-only")
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_proj\.weight_scale has a scale of .* float32"):
        load_quant_weights_from_hf(GPT(config), None, torch.float16, "int8-weight-only", quantized_model=hf_model)
    twin = GPT(config_from_hf(hf_model, dtype="float32", quant_mode="int8-weight-only"))
    load_quant_weights_from_hf(twin, None, torch.float32, "int8-weight-only", quantized_model=hf_model)


def test_example_reports_a_scale_float16_cannot_hold_in_one_line(tmp_path, capsys):
    """The same model through example.py: one line naming the scale and --dtype float32, exit status 2."""
    import cli
    import example

    hf_model = make_gpt2(n_embd=128, n_layer=1, n_head=4, n_positions=32)
    with torch.no_grad():
        hf_model.transformer.h[0].attn.c_proj.weight.mul_(1e-3)
    hf_model.save_pretrained(tmp_path / "tiny-weights")
    argv = ["--model-type", str(tmp_path / "tiny-weights"), "--quant-mode", "int8-weight-only", "--dtype", "float16"]
    argv += ["--backend", "torch", "--num-calibration-samples", "4", "--max-new-tokens", "2", "--input-text", "Hi"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: example.main(argv), "example.py")
    stderr = capsys.readouterr().err  # calibration's progress bars, then the error: it is found after calibrating
    assert exit_info.value.code == 2 and "Traceback" not in stderr, stderr
    line = stderr.splitlines()[-1]
    assert line.startswith("example.py: error: transformer.h.0.attn.c_proj.weight_scale has a scale of"), line
    assert line.endswith("(--dtype float32)"), line


@pytest.mark.parametrize("value", ["1", "ON", "yes", "True", "0", "no", "off", "false", "FALSE", "offline", ""])
def test_hf_hub_offline_is_read_as_huggingface_hub_reads_it(monkeypatch, value):
    """Read otherwise, HF_HUB_OFFLINE=no would make this example run the bundled model while transformers is online."""
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert hub_offline() == huggingface_hub.constants._is_true(value)
