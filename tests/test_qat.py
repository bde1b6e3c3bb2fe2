"""Quantization-aware training (training.finetune on a ModelOpt-quantized model, qat.py): the weights train, the
calibrated scales stay, and the result goes through the rest of the pipeline unchanged: the twin built from it
computes what ModelOpt's quantized model computes, and mto.save / mto.restore carry it bit for bit.
"""

import copy

import pytest
import torch
from helpers import make_gpt2

from measure.twin import load_twin
from quant.save_restore import load_quantized, save_quantized
from quantization import modelopt_quantize
from training import finetune as training


@pytest.fixture(scope="module")
def base():
    return make_gpt2(n_embd=128, n_layer=2, n_head=4, n_positions=32)


@pytest.fixture(scope="module")
def tokens():
    """A short stream of real text: the first tokens of the bundled model's held-out split."""
    return training.validation_tokens()[:2000]


def quantizer_amax(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in model.named_buffers() if name.endswith("weight_quantizer._amax")}


@pytest.mark.parametrize("algorithm", [None, "max"])  # int4 with AWQ, and with plain max calibration
def test_qat_trains_the_weights_keeps_the_scales_and_the_twin_agrees(base, tokens, calibration_file, algorithm):
    quantized = modelopt_quantize(
        copy.deepcopy(base), "int4-weight-only", calibration_file, num_samples=4, algorithm=algorithm
    )
    amax, weight = quantizer_amax(quantized), quantized.transformer.h[0].mlp.c_fc.weight.detach().clone()
    losses = training.finetune(quantized, tokens, steps=3, lr=1e-3, batch_size=2)
    assert len(losses) == 3 and all(loss > 0 for loss in losses)

    assert not torch.equal(quantized.transformer.h[0].mlp.c_fc.weight, weight)  # the straight-through gradient
    after = quantizer_amax(quantized)
    assert after.keys() == amax.keys() and all(torch.equal(after[name], amax[name]) for name in amax)
    assert torch.equal(quantized.transformer.wte.weight, base.transformer.wte.weight)  # embeddings frozen

    # The deployed arithmetic (the twin: integer weights and scales) against ModelOpt's fake quantization.
    idx = tokens[:32].unsqueeze(0)
    with torch.no_grad():
        expected = quantized(idx).logits
        actual = load_twin(base, "int4-weight-only", quantized)(idx)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_qat_model_restores_onto_the_model_it_started_from(base, tokens, calibration_file, tmp_path):
    """The file holds the trained weights: restored onto the original checkpoint, they replace its weights."""
    quantized = modelopt_quantize(copy.deepcopy(base), "int4-weight-only", calibration_file, 4, algorithm="max")
    training.finetune(quantized, tokens, steps=2, lr=1e-3, batch_size=2)
    path = str(tmp_path / "qat.pt")
    save_quantized(quantized, path)
    restored, mode = load_quantized(copy.deepcopy(base), path)
    assert mode == "int4-weight-only"
    idx = tokens[:32].unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(restored(idx).logits, quantized(idx).logits)
        assert not torch.equal(restored(idx).logits, base(idx).logits)


def test_fine_tuning_stops_the_step_it_diverges(base, tokens):
    """A loss or weight that is no longer a number stops training (qat.py, train.py and evaluate.py then report the
    learning rate in one line and save nothing), instead of training on and saving a model of NaNs."""
    damaged = copy.deepcopy(base)
    with torch.no_grad():
        damaged.transformer.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    with pytest.raises(training.TrainingDivergedError, match="the loss became nan at step 1 of 3"):
        training.finetune(damaged, tokens, steps=3, lr=1e-4, batch_size=2)
    # After the last step no later loss would show it: the weights themselves are checked.
    with pytest.raises(training.TrainingDivergedError, match="the weights became inf or NaN at step 3, the last"):
        training.check_finite(damaged, loss=4.2, step=2, steps=3)
    training.check_finite(base, loss=4.2, step=2, steps=3)
