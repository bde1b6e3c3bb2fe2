"""The twin's key/value cache changes nothing but the speed, in every quantization mode.

Full recomputation (`model(idx)`, and `generate(..., use_cache=False)`) is the truth the cache is checked against:
step by step, the logits of `forward_with_cache` fed one token at a time must match the logits of one pass over the
whole sequence, and generation must pick the same tokens for the same seed. Each mode's twin is loaded by
weight_loader from a ModelOpt-quantized GPT-2, calibrated once for the whole module.
"""

import pytest
import torch
from helpers import make_gpt2

import reference
from config import QUANT_MODES
from measure.twin import load_twin
from quantization import modelopt_quantize
from reference import GPT, generate

MODES = (None, *QUANT_MODES)
PROMPT_LEN = 5


@pytest.fixture(scope="module")
def twins(calibration_file) -> dict[str | None, GPT]:
    """The twin in each mode, float32, loaded from the same random GPT-2 (quantized by ModelOpt for each mode)."""
    twins = {}
    for mode in MODES:
        hf_model = make_gpt2()
        quantized = None
        if mode is not None:
            quantized = modelopt_quantize(hf_model, mode, calibration_file, batch_size=4, num_samples=4)
        twins[mode] = load_twin(hf_model, mode, quantized)
    return twins


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))  # [batch, seq]


@pytest.mark.parametrize("mode", MODES, ids=str)
@torch.no_grad()
def test_cached_logits_match_full_recomputation_step_by_step(twins, tokens, mode):
    """Within 1e-4; int8-smoothquant within 2% of the largest logit: its inputs are int8 steps of 1/127 of their
    amax, and a matmul over 5 tokens sums in another order than over 16, which moves a value on a rounding boundary
    by one step now and then, and every later logit a little with it (seen: 0.03 of a largest logit of 2). A wrong
    cache, mask or position is off by the size of the logits."""
    twin = twins[mode]
    full_logits = twin(tokens)  # [batch, seq, vocab]
    atol = 2e-2 * full_logits.abs().max().item() if mode == "int8-smoothquant" else 1e-4
    logits, keys, values = twin.forward_with_cache(tokens[:, :PROMPT_LEN])  # the prompt's last position only
    torch.testing.assert_close(logits, full_logits[:, PROMPT_LEN - 1 : PROMPT_LEN], atol=atol, rtol=1e-4)
    for position in range(PROMPT_LEN, tokens.shape[1]):
        logits, keys, values = twin.forward_with_cache(tokens[:, position : position + 1], keys, values)
        torch.testing.assert_close(logits[:, 0], full_logits[:, position], atol=atol, rtol=1e-4)
    config = twin.config
    head_dim = config.embedding_size // config.num_heads
    assert keys.shape == values.shape == (config.num_layers, 2, config.num_heads, tokens.shape[1], head_dim)


@pytest.mark.parametrize("mode", MODES, ids=str)
def test_generate_picks_the_same_tokens_with_and_without_cache(twins, tokens, mode):
    """Sampled (not greedy) at a temperature that leaves many candidates: the draws depend on the exact logits."""
    prompt = tokens[:, :PROMPT_LEN]
    generated = {
        use_cache: generate(
            twins[mode],
            prompt,
            8,
            temperature=2.0,
            top_k=50,
            generator=torch.Generator().manual_seed(3),
            use_cache=use_cache,
        )
        for use_cache in (True, False)
    }
    assert generated[True].shape == (2, PROMPT_LEN + 8)
    assert torch.equal(generated[True], generated[False])


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_with_cache_feeds_only_the_new_token(twins, tokens, use_cache, monkeypatch):
    """With the cache, the prompt runs once and each later step runs one token; without it, the whole sequence."""
    twin = twins[None]
    fed_lengths = []
    forward_with_cache = twin.forward_with_cache

    def recording_forward_with_cache(idx, *args, **kwargs):
        fed_lengths.append(idx.shape[1])
        return forward_with_cache(idx, *args, **kwargs)

    monkeypatch.setattr(twin, "forward_with_cache", recording_forward_with_cache)
    generate(twin, tokens[:, :PROMPT_LEN], 4, top_k=1, use_cache=use_cache)
    assert fed_lengths == (
        [PROMPT_LEN, 1, 1, 1] if use_cache else [PROMPT_LEN, PROMPT_LEN + 1, PROMPT_LEN + 2, PROMPT_LEN + 3]
    )


@pytest.mark.parametrize("mode", QUANT_MODES)
@torch.no_grad()
def test_weights_are_quantized_once_at_load_not_on_every_forward(twins, tokens, mode, monkeypatch):
    """A forward pass quantizes activations only: float8 and int8-smoothquant quantize each linear layer's input,
    weight-only modes none."""
    twin = twins[mode]
    calls = []
    quantize_dequantize = reference.quantize_dequantize

    def counting_quantize_dequantize(x, scale, quant_dtype):
        calls.append(tuple(x.shape))
        return quantize_dequantize(x, scale, quant_dtype)

    monkeypatch.setattr(reference, "quantize_dequantize", counting_quantize_dequantize)
    twin(tokens)
    quantized_inputs = [m for m in twin.modules() if getattr(m, "input_scale", None) is not None]
    assert len(calls) == len(quantized_inputs)
    assert all(shape[:2] == tuple(tokens.shape) for shape in calls)  # activations [batch, seq, in], no weight
    layers = 4 * twin.config.num_layers
    expected = {"float8": layers + 1, "int8-smoothquant": layers}  # float8 quantizes lm_head's input too
    assert len(quantized_inputs) == expected.get(mode, 0)
