"""Saving a calibrated model with mto.save and restoring it with mto.restore (quantization.save_quantized and
load_quantized): the restored model has exactly the saved scales and logits, and a wrong file is a clear error.

The truth is the model that was saved: every quantizer buffer (amax, AWQ's pre_quant_scale) and the logits of the
restored model must be bit for bit those of the calibrated one, for ModelOpt's model and for the twin built from it.
"""

import copy

import pytest
import torch
from conftest import CALIBRATION_TEXT, make_gpt2

import reference
from quantization import QuantizedCheckpointError, load_quantized, modelopt_quantize, save_quantized
from weight_loader import load_twin


@pytest.fixture(scope="module")
def base():
    """A GPT-2 128 wide (one int4 block per row) with outlier features, so AWQ's pre_quant_scale is not all ones."""
    return make_gpt2(n_embd=128, n_layer=2, n_head=4, n_positions=64)


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory) -> dict[str, tuple[torch.nn.Module, str]]:
    """quant_mode -> (the calibrated model, the file it was saved to)."""
    folder = tmp_path_factory.mktemp("saved")
    result = {}
    for mode in reference.QUANT_MODES:
        model = modelopt_quantize(copy.deepcopy(base), mode, CALIBRATION_TEXT, num_samples=4)
        path = str(folder / f"{mode}.pt")
        save_quantized(model, path)
        result[mode] = (model, path)
    return result


def quantizer_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every buffer of every ModelOpt quantizer: _amax, _pre_quant_scale, ..."""
    return {name: tensor for name, tensor in model.named_buffers() if "_quantizer." in name}


@pytest.mark.parametrize("mode", reference.QUANT_MODES)
def test_restored_model_has_the_saved_scales_and_logits(base, saved, mode):
    calibrated, path = saved[mode]
    restored, restored_mode = load_quantized(copy.deepcopy(base), path)
    assert restored_mode == mode

    expected = quantizer_buffers(calibrated)
    assert any(name.endswith("weight_quantizer._amax") for name in expected)
    if mode == "int4-weight-only":
        scales = [t for name, t in expected.items() if name.endswith("_pre_quant_scale")]
        assert scales and not all(torch.all(scale == 1) for scale in scales)  # AWQ did scale some features
    actual = quantizer_buffers(restored)
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name

    idx = torch.randint(0, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(restored(idx).logits, calibrated(idx).logits)
        assert torch.equal(load_twin(base, mode, restored)(idx), load_twin(base, mode, calibrated)(idx))


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


def test_a_file_saved_without_quantization(base, tmp_path):
    import modelopt.torch.opt as mto

    path = tmp_path / "plain.pt"
    mto.save(base, path)
    with pytest.raises(QuantizedCheckpointError, match="holds no quantized model"):
        load_quantized(copy.deepcopy(base), str(path))


def test_a_file_saved_in_another_mode(base, saved):
    with pytest.raises(QuantizedCheckpointError, match="holds a float8 model, not int4-weight-only"):
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
