"""Saving a calibrated model in mto.save's layout and restoring it as mto.restore does (save_restore.save_quantized and
load_quantized): the restored model has exactly the saved scales and logits, and a wrong file is a clear error.

The truth is the model that was saved: every quantizer buffer (amax, AWQ's pre_quant_scale) and the logits of the
restored model must be bit for bit those of the calibrated one, for ModelOpt's model and for the twin built from it.
"""

import copy
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import CALIBRATION_PARAGRAPHS, MIXED_LAYER_QUANT_MODES, REPO, make_gpt2, usage_error

import example
from config import AUTO_QUANT_MODE, QUANT_MODES
from measure.twin import load_twin
from quant.auto_quantize import Recipe, format_recipe, load_recipe, quantize_with_recipe, recipe_from_model
from quant.lm_head import lm_head_mode_of
from quant.save_restore import QuantizedCheckpointError, load_quantized, save_quantized
from quantization import modelopt_quantize


@pytest.fixture(scope="module")
def base():
    """A GPT-2 128 wide (one int4 block per row) with outlier features, so AWQ's pre_quant_scale is not all ones."""
    return make_gpt2(n_embd=128, n_layer=2, n_head=4, n_positions=64)


@pytest.fixture(scope="module")
def saved(base, calibration_file, tmp_path_factory) -> dict[str, tuple[torch.nn.Module, str]]:
    """quant_mode -> (the calibrated model, the file it was saved to)."""
    folder = tmp_path_factory.mktemp("saved")
    result = {}
    for mode in QUANT_MODES:
        model = modelopt_quantize(copy.deepcopy(base), mode, calibration_file, num_samples=4)
        path = str(folder / f"{mode}.pt")
        save_quantized(model, path)
        result[mode] = (model, path)
    return result


@pytest.fixture(scope="module")
def saved_mix(base, calibration_file, tmp_path_factory) -> tuple[torch.nn.Module, str]:
    """A per-layer mix of every format and an unquantized layer, calibrated by AutoQuantize (mtq.auto_quantize,
    without its search), and the file it was saved to."""
    recipe = Recipe(MIXED_LAYER_QUANT_MODES, effective_bits=0.0)
    model = quantize_with_recipe(copy.deepcopy(base), recipe, calibration_file, batch_size=4, num_samples=4)
    path = str(tmp_path_factory.mktemp("saved") / "mixed.pt")
    save_quantized(model, path)
    return model, path


def quantizer_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every buffer of every ModelOpt quantizer: _amax, _pre_quant_scale, ..."""
    return {name: tensor for name, tensor in model.named_buffers() if "_quantizer." in name}


def assert_same_quantizer_buffers(restored: torch.nn.Module, calibrated: torch.nn.Module, awq: bool) -> None:
    """Every quantizer buffer (amax, AWQ's pre_quant_scale) restored exactly; with `awq`, some of the scales differ
    from one, so that dropping them could not pass unseen."""
    expected = quantizer_buffers(calibrated)
    assert any(name.endswith("weight_quantizer._amax") for name in expected)
    if awq:
        scales = [t for name, t in expected.items() if name.endswith("_pre_quant_scale")]
        assert scales and not all(torch.all(scale == 1) for scale in scales)
    actual = quantizer_buffers(restored)
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


@pytest.mark.parametrize("mode", QUANT_MODES)
def test_restored_model_has_the_saved_scales_and_logits(base, saved, mode):
    calibrated, path = saved[mode]
    restored, restored_mode = load_quantized(copy.deepcopy(base), path)
    assert restored_mode == mode

    assert_same_quantizer_buffers(restored, calibrated, awq=mode == "int4-weight-only")

    idx = torch.randint(0, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(restored(idx).logits, calibrated(idx).logits)
        assert torch.equal(load_twin(base, mode, restored)(idx), load_twin(base, mode, calibrated)(idx))


def test_restored_mix_has_the_saved_formats_scales_and_logits(base, saved_mix):
    """ModelOpt records AutoQuantize as its "auto_quantize" mode, not "quantize": the mix is restored all the same,
    and each layer's format is read back from the restored quantizers."""
    calibrated, path = saved_mix
    restored, restored_mode = load_quantized(copy.deepcopy(base), path)
    assert restored_mode == AUTO_QUANT_MODE
    layers = recipe_from_model(restored).layers
    assert layers == recipe_from_model(calibrated).layers == MIXED_LAYER_QUANT_MODES

    assert_same_quantizer_buffers(restored, calibrated, awq=True)  # the mix's int4 layers are AWQ's

    idx = torch.randint(0, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(restored(idx).logits, calibrated(idx).logits)
        twin = load_twin(base, AUTO_QUANT_MODE, restored, layer_quant_modes=layers)
        calibrated_twin = load_twin(base, AUTO_QUANT_MODE, calibrated, layer_quant_modes=MIXED_LAYER_QUANT_MODES)
        assert torch.equal(twin(idx), calibrated_twin(idx))


@pytest.mark.parametrize(
    "mode, lm_head_mode",
    [
        ("int8-weight-only", "int8-weight-only"),
        ("int8-weight-only", "int4-weight-only"),
        ("int4-weight-only", "int4-weight-only"),
        ("int8-smoothquant", "int4-weight-only"),
    ],
)
def test_a_quantized_output_layer_is_restored_apart_from_the_embedding(
    base, calibration_file, tmp_path, mode, lm_head_mode
):
    """--lm-head: the file holds the output layer in its own format, untied; restored onto GPT-2 (whose lm_head is
    wte), it is untied again first, so the embedding stays the model's and the logits are the saved model's."""
    calibrated = modelopt_quantize(
        copy.deepcopy(base), mode, calibration_file, num_samples=4, lm_head_mode=lm_head_mode
    )
    path = str(tmp_path / "with-head.pt")
    save_quantized(calibrated, path)
    restored, restored_mode = load_quantized(copy.deepcopy(base), path)
    assert (restored_mode, lm_head_mode_of(restored)) == (mode, lm_head_mode)
    assert_same_quantizer_buffers(restored, calibrated, awq=mode == "int4-weight-only")
    assert torch.equal(restored.transformer.wte.weight, base.transformer.wte.weight)
    idx = torch.randint(0, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(restored(idx).logits, calibrated(idx).logits)
        # The twin holds the head ModelOpt rounded (a twin of the calibrated model rounds its 6.4 million weights
        # itself, and a few ties apart: tests/test_quantization.py)
        head = load_twin(base, mode, restored).lm_head
        fake_quantized = calibrated.lm_head.weight_quantizer(calibrated.lm_head.weight)  # [vocab, in]
        twin_head = head.dequantized_weight.t() if lm_head_mode == "int4-weight-only" else head.dequantized_weight
        torch.testing.assert_close(twin_head, fake_quantized, rtol=1e-6, atol=1e-7)


def test_a_mix_and_a_single_mode_are_not_mistaken_for_each_other(base, saved, saved_mix):
    with pytest.raises(QuantizedCheckpointError, match="holds a model quantized in auto, not float8"):
        load_quantized(copy.deepcopy(base), saved_mix[1], "float8")
    with pytest.raises(QuantizedCheckpointError, match="holds a model quantized in int8-weight-only, not auto"):
        load_quantized(copy.deepcopy(base), saved["int8-weight-only"][1], AUTO_QUANT_MODE)


def test_restoring_does_not_calibrate(base, saved, capsys):
    load_quantized(copy.deepcopy(base), saved["int8-weight-only"][1])
    assert "Calibrat" not in capsys.readouterr().out


def test_a_file_that_is_not_a_modelopt_checkpoint(base, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(QuantizedCheckpointError, match="is not a ModelOpt checkpoint written by mto.save"):
        load_quantized(copy.deepcopy(base), str(text))
    weights = tmp_path / "weights.pt"
    torch.save(base.state_dict(), weights)  # a plain state dict: torch's format, but no ModelOpt state
    with pytest.raises(QuantizedCheckpointError, match="no modelopt_state and model_state_dict in it"):
        load_quantized(copy.deepcopy(base), str(weights))


def drop_metadata(checkpoint: dict) -> None:
    del checkpoint["modelopt_state"]["modelopt_state_dict"][-1][1]["metadata"]


def drop_disabled(checkpoint: dict) -> None:
    quantizers = checkpoint["modelopt_state"]["modelopt_state_dict"][-1][1]["metadata"]["quantizer_state"]
    for state in quantizers.values():
        del state["_disabled"]


@pytest.mark.parametrize(
    "damage, expected",
    [
        (drop_metadata, "holds a ModelOpt state of another layout than mto.save writes (KeyError: 'metadata')"),
        (drop_disabled, "(KeyError: '_disabled')"),
        (lambda checkpoint: checkpoint.update(modelopt_state=[]), "(AttributeError: 'list' object has no attr"),
        (lambda checkpoint: checkpoint.update(model_state_dict=[1]), "its model_state_dict is not a dictionary"),
    ],
    ids=["no metadata", "no _disabled", "state a list", "weights a list"],
)
def test_a_damaged_modelopt_state_is_named(base, saved, tmp_path, damage, expected):
    """A file mto.save wrote, edited by hand or by another tool: one error, not a KeyError from deep in the reader."""
    checkpoint = torch.load(saved["int8-weight-only"][1], weights_only=True)
    damage(checkpoint)
    path = tmp_path / "damaged.pt"
    torch.save(checkpoint, path)
    with pytest.raises(QuantizedCheckpointError, match=re.escape(expected)):
        load_quantized(copy.deepcopy(base), str(path))


def test_a_file_saved_without_quantization(base, tmp_path):
    import modelopt.torch.opt as mto

    path = tmp_path / "plain.pt"
    mto.save(base, path)
    with pytest.raises(QuantizedCheckpointError, match="holds no quantized model"):
        load_quantized(copy.deepcopy(base), str(path))


def test_a_file_saved_in_another_mode(base, saved):
    with pytest.raises(QuantizedCheckpointError, match="holds a model quantized in float8, not int4-weight-only"):
        load_quantized(copy.deepcopy(base), saved["float8"][1], "int4-weight-only")


@pytest.mark.parametrize(
    "other, mismatch",
    [
        (dict(n_embd=256), "transformer.wte.weight is shape [50257, 128], the model's is [50257, 256]"),
        (dict(n_layer=3), "transformer.h.2.ln_1.weight is missing"),
        (dict(n_positions=32), "transformer.wpe.weight is shape [64, 128], the model's is [32, 128]"),
    ],
)
def test_a_file_saved_for_another_model(saved, other, mismatch):
    shape = dict(n_embd=128, n_layer=2, n_head=4, n_positions=64) | other
    with pytest.raises(QuantizedCheckpointError, match="was saved for another model") as error:
        load_quantized(make_gpt2(**shape), saved["int4-weight-only"][1])
    assert mismatch in str(error.value)


# example.py, run the way users run it: calibrate and save, then restore and generate. Each test's runs follow one
# another, in the background from the start of the session (conftest.py); the tests check what they printed.
PROMPT = "The town council voted"


def start_cli_runs(background, tmp_path_factory) -> dict:
    """test name -> Future of (the paths it names, its runs by name)."""
    tmp = tmp_path_factory.mktemp("example-runs")
    checkpoint = str(tmp / "gpt2-128")
    make_gpt2(n_embd=128, n_layer=2, n_head=4, n_positions=64).save_pretrained(checkpoint)  # base()
    calibration = str(tmp / "calibration.txt")
    with open(calibration, "w") as file:
        file.write("\n\n".join(CALIBRATION_PARAGRAPHS) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf-home"), "OMP_NUM_THREADS": "1"}
    samples = ["--calibration-data", calibration, "--num-calibration-samples", "4"]

    def run_example(arguments: list[str]) -> subprocess.CompletedProcess:
        generate = ["--backend", "torch", "--input-text", PROMPT, "--max-new-tokens", "8", "--seed", "5"]
        command = [sys.executable, "example.py", *generate, *arguments]
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    def restore_int4() -> tuple[str, dict]:
        path = str(tmp / "int4.pt")
        calibrate = ["--model-type", checkpoint, "--quant-mode", "int4-weight-only", *samples]
        calibrated = run_example([*calibrate, "--save-quantized", path])
        restored = run_example(["--model-type", checkpoint, "--load-quantized", path, "--verbose"])
        return path, {"calibrated": calibrated, "restored": restored}

    def output_layer() -> tuple[tuple[str, str], dict]:
        path, export_dir = str(tmp / "head.pt"), str(tmp / "export")
        calibrate = ["--model-type", checkpoint, "--quant-mode", "int8-weight-only", "--lm-head", "int8-weight-only"]
        calibrate += samples
        runs = {"calibrated": run_example([*calibrate, "--save-quantized", path, "--export-dir", export_dir])}
        runs["restored"] = run_example(["--model-type", checkpoint, "--load-quantized", path])
        runs["from export"] = run_example(["--model-type", export_dir])
        runs["unquantized head"] = run_example([*calibrate[:4], "--calibration-data", calibration])
        return (path, export_dir), runs

    def restore_a_mix() -> tuple[tuple[str, str], dict]:
        path, recipe = str(tmp / "mixed.pt"), str(tmp / "recipe.json")
        search = ["--quant-mode", "auto", "--effective-bits", "6", "--recipe-out", recipe, "--save-quantized", path]
        runs = {"searched": run_example(["--model-type", checkpoint, "--top-k", "1", *search, *samples])}
        restore = ["--model-type", checkpoint, "--top-k", "1", "--load-quantized", path]
        runs["restored"] = run_example(restore)
        runs["restored as auto"] = run_example([*restore, "--quant-mode", "auto"])
        return (path, recipe), runs

    def bundled_int4() -> tuple[str, dict]:
        path = str(tmp / "bundled-int4.pt")
        bundled = ["--model-type", "bundled_model"]
        calibrated = run_example([*bundled, "--quant-mode", "int4-weight-only", "--save-quantized", path])
        return path, {"calibrated": calibrated, "restored": run_example([*bundled, "--load-quantized", path])}

    return {
        "output layer": background.submit(output_layer),
        "mix": background.submit(restore_a_mix),
        "bundled int4": background.submit(bundled_int4),
        "int4": background.submit(restore_int4),
    }


@pytest.fixture
def example_runs(cli_runs) -> dict:
    return cli_runs.of(__name__)


def generated_text(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.split(example.SEPARATOR)[1]


@pytest.fixture(scope="module")
def checkpoint(base, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("gpt2-128")
    base.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory) -> str:
    """A GPT-2 of another width than `base`, for a file saved for another model."""
    path = tmp_path_factory.mktemp("gpt2-256")
    make_gpt2(n_embd=256, n_layer=2, n_head=4, n_positions=64).save_pretrained(path)
    return str(path)


def test_restore_then_generate_prints_what_calibrate_then_generate_prints(example_runs):
    path, runs = example_runs["int4"].result()
    calibrated, restored = runs["calibrated"], runs["restored"]
    assert f"Saved the quantized model to {path}" in calibrated.stdout
    assert f"Restored int4-weight-only from {path}" in restored.stdout
    assert "Calibrated" not in restored.stdout and "Calibrating" not in restored.stderr
    assert generated_text(restored) == generated_text(calibrated)
    # --verbose: ModelOpt's summary, one line per quantizer; c_attn's weight quantizer is on, 4 bits in blocks.
    summary = [line for line in restored.stdout.splitlines() if "transformer.h.0.attn.c_attn.weight_quantizer" in line]
    assert len(summary) == 1 and "4 bit" in summary[0] and "block_sizes" in summary[0], restored.stdout
    assert "TensorQuantizers found in model" in restored.stdout


def test_an_output_layer_calibrated_saved_exported_and_restored_generates_one_text(example_runs):
    """example.py --lm-head int8-weight-only with --save-quantized and --export-dir, then --load-quantized and
    --model-type EXPORT: the same text three times, the output layer quantized each time."""
    (path, _), runs = example_runs["output layer"].result()
    calibrated, restored = runs["calibrated"], runs["restored"]
    assert "Calibrated int8-weight-only with an int8-weight-only output layer" in calibrated.stdout
    assert f"Restored int8-weight-only with an int8-weight-only output layer from {path}" in restored.stdout
    assert generated_text(restored) == generated_text(calibrated) == generated_text(runs["from export"])
    assert generated_text(runs["unquantized head"]) != generated_text(calibrated)  # the flag reached the model


def test_restore_an_autoquantize_mix_then_generate_prints_what_the_search_printed(example_runs):
    """The command lines of the report: search and save, then restore with and without --quant-mode auto. The restored
    run prints the search's table of formats and, greedy (--top-k 1), the same text."""
    (path, recipe), runs = example_runs["mix"].result()
    searched = runs["searched"]
    assert f"Saved the quantized model to {path}" in searched.stdout, searched.stderr
    searched_formats = load_recipe(recipe)
    assert len(set(searched_formats.layers.values())) > 1  # a mix, not one format everywhere
    table = format_recipe(searched_formats)
    assert table in searched.stdout
    for restored in (runs["restored"], runs["restored as auto"]):
        assert f"Restored auto from {path}" in restored.stdout, restored.stderr
        assert "Calibrated" not in restored.stdout and "Calibrating" not in restored.stderr
        assert table in restored.stdout
        assert generated_text(restored) == generated_text(searched)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("text file", "is not a ModelOpt checkpoint written by mto.save"),
        ("other mode", "holds a model quantized in int4-weight-only, not float8"),
        ("other model", "was saved for another model: its transformer.wte.weight is shape [50257, 128]"),
        ("missing file", "--load-quantized: no such file: no/such/file.pt"),
        ("save without quantizing", "--save-quantized needs --quant-mode"),
        ("verbose without quantizing", "--verbose prints the quantizers: it needs --quant-mode or --load-quantized"),
        ("search and restore", "--load-quantized restores a calibrated model: --effective-bits does not apply"),
    ],
)
def test_bad_load_quantized_is_one_line_and_exit_status_2(
    saved, checkpoint, wide_checkpoint, tmp_path, capsys, name, expected
):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    int4 = saved["int4-weight-only"][1]
    arguments = {
        "text file": ["--model-type", checkpoint, "--load-quantized", str(text)],
        "other mode": ["--model-type", checkpoint, "--load-quantized", int4, "--quant-mode", "float8"],
        "other model": ["--model-type", wide_checkpoint, "--load-quantized", int4],
        "missing file": ["--load-quantized", "no/such/file.pt"],
        "save without quantizing": ["--save-quantized", str(tmp_path / "out.pt")],
        "verbose without quantizing": ["--verbose"],
        "search and restore": ["--load-quantized", int4, "--quant-mode", "auto", "--effective-bits", "6"],
    }[name]
    argv = ["--backend", "torch", "--max-new-tokens", "8", *arguments]
    assert expected in usage_error(example.main, argv, "example.py", capsys)  # in this process: no imports to wait for


def test_bundled_model_saved_in_int4_is_no_larger_than_its_float16_checkpoint_and_restores_its_text(example_runs):
    """mto.save stored the float32 weights: twice the bundled model's 15.3 MB. The saved file holds no more bytes
    than the float16 checkpoint it came from, and the restored model prints the calibrated model's text."""
    path, runs = example_runs["bundled int4"].result()
    assert generated_text(runs["restored"]) == generated_text(runs["calibrated"])
    assert os.path.getsize(path) <= os.path.getsize(os.path.join(REPO, "bundled_model", "model.safetensors"))
