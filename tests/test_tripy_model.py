"""The Tripy GPT against its PyTorch twin: the same parameters, the same logits, the same generated tokens.

With TensorRT (a GPU machine, README: "Installing nvtripy on a GPU machine") the compiled model runs on the GPU; without
it, nvtripy's frontend traces the same model.py and the CPU executor (tripy_cpu/) runs the traced graph with
PyTorch, so these tests run everywhere nvtripy is installed, CI included. The twin runs in float32 on the CPU as the
truth; the Tripy model runs each quantization mode in float32 and in float16.
"""

import importlib.util

import pytest
import torch
from helpers import make_gpt2

import config
import reference
import tripy_cpu
from measure.sampling import sample_next_token
from quantization import SHIPPED_CALIBRATION_TEXT as CALIBRATION_TEXT
from weight_loader import config_from_hf, load_quant_weights_from_hf, load_weights_from_hf

NVTRIPY_INSTALLED = importlib.util.find_spec("nvtripy") is not None
pytestmark = pytest.mark.skipif(not NVTRIPY_INSTALLED, reason="needs nvtripy (pip install --no-deps nvtripy==0.1.7)")
if NVTRIPY_INSTALLED:
    BACKEND = tripy_cpu.use()  # "tensorrt", or "cpu" where TensorRT is missing
    import nvtripy as tp

    import model
# The real backend needs a GPU to run what it compiles; the CPU executor needs none.
needs_gpu = pytest.mark.skipif(
    NVTRIPY_INSTALLED and BACKEND == "tensorrt" and not torch.cuda.is_available(), reason="needs a CUDA GPU"
)

MODES = (None, *config.QUANT_MODES)
SEQ_LEN = 32
# Logit difference allowed, relative to the largest logit. TensorRT may run float32 matmuls in TF32.
TOLERANCE = {"float32": 1e-2, "float16": 5e-2}
# Where sampled tokens may differ from the twin's: each must be among the twin's MAX_RANK likeliest. The small random
# model's logits are nearly flat, so float16 rounding reorders its top 20; a random token passes 10 steps with
# probability (100 / 50257) ** 10.
MAX_RANK = 100


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """All but one in a thousand logits within `tolerance` of the largest logit, and none ten times further.

    float8 quantizes activations: a rounding difference too small to matter elsewhere can carry a value across a
    step of float8's 3-bit mantissa, changing it by an eighth, and the few logits that depend on it with it.
    """
    error = (actual.float() - expected).abs() / expected.abs().max()
    assert error.max().item() < 10 * tolerance, f"largest error {error.max().item():.3g} of the largest logit"
    far = (error > tolerance).float().mean().item()
    assert far < 1e-3, f"{far:.2%} of the logits differ by more than {tolerance} of the largest logit"


def load(gpt, hf_model, quant_mode, dtype) -> None:
    if quant_mode is None:
        load_weights_from_hf(gpt, "test", dtype, hf_model=hf_model)
    else:
        load_quant_weights_from_hf(gpt, "test", dtype, quant_mode, quantized_model=hf_model)


@pytest.fixture(scope="module")
def quantized_gpt2():
    """quantized_gpt2(mode): the small random GPT-2, quantized and calibrated by ModelOpt once per mode."""
    models = {}

    def get(quant_mode):
        if quant_mode not in models:
            hf_model = make_gpt2()
            if quant_mode is not None:
                from quantization import modelopt_quantize

                modelopt_quantize(hf_model, quant_mode, CALIBRATION_TEXT, batch_size=4, num_samples=4)
            models[quant_mode] = hf_model
        return models[quant_mode]

    return get


@pytest.mark.parametrize("quant_mode", MODES, ids=str)
def test_state_dict_has_the_twins_names_and_shapes(quantized_gpt2, quant_mode):
    config = config_from_hf(quantized_gpt2(None), dtype="float32", quant_mode=quant_mode)
    twin = reference.GPT(config).state_dict()
    tripy = model.GPT(config).state_dict()
    # tp.Linear always has an input_scale, optional until set; the twin has one only where it is used (float8).
    optional = {name for name, value in tripy.items() if type(value).__name__ == "OptionalParameter"}
    assert set(twin) <= set(tripy) and set(tripy) - set(twin) <= optional
    for name, tensor in twin.items():
        # shape None: a per-tensor scale, which may be any scalar
        expected = () if tripy[name].shape is None else tuple(tripy[name].shape)
        assert tuple(tensor.shape) == expected, name


def test_compile_refuses_a_model_without_weights():
    config = reference.GPTConfig(num_layers=1, num_heads=2, embedding_size=8, vocab_size=16, block_size=8, seq_len=8)
    with pytest.raises(ValueError, match="Load the weights before compiling"):
        model.compile_model(model.GPT(config), config)


@pytest.fixture(scope="module", params=[(d, m) for d in ("float32", "float16") for m in MODES], ids=str)
def twin_and_compiled(request, quantized_gpt2):
    """(the float32 twin, the compiled Tripy GPT in the dtype under test), with the same weights."""
    dtype, quant_mode = request.param
    hf_model = quantized_gpt2(quant_mode)
    twin_config = config_from_hf(hf_model, seq_len=SEQ_LEN, batch_size=1, dtype="float32", quant_mode=quant_mode)
    twin = reference.GPT(twin_config).eval()
    load(twin, hf_model, quant_mode, torch.float32)
    config = config_from_hf(hf_model, seq_len=SEQ_LEN, batch_size=1, dtype=dtype, quant_mode=quant_mode)
    gpt = model.GPT(config)
    load(gpt, hf_model, quant_mode, getattr(tp, dtype))
    return twin, model.compile_model(gpt, config)


@needs_gpu
def test_logits_match_twin_with_and_without_cache(twin_and_compiled):
    twin, compiled = twin_and_compiled
    config = compiled.config
    idx = torch.randint(0, 50257, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = twin(idx)  # [1, 12, vocab]
    prompt_logits, keys, values = model.run(compiled.prefill, model.gpu_tokens(idx[:, :8]))  # position 7's
    step_logits = [prompt_logits]
    for i in range(8, 12):  # the rest one token at a time, through the KV cache
        logits, keys, values = model.run(compiled.decode, model.gpu_tokens(idx[:, i : i + 1]), keys, values)
        step_logits.append(logits)
    assert tuple(keys.shape) == (config.num_layers, 1, config.num_heads, 12, config.embedding_size // config.num_heads)
    assert_logits_close(torch.cat(step_logits, dim=1), expected[:, 7:], TOLERANCE[config.dtype])
    uncached, _, _ = model.run(compiled.prefill, model.gpu_tokens(idx))
    assert_logits_close(uncached, expected[:, -1:], TOLERANCE[config.dtype])


@needs_gpu
def test_generation_matches_uncached_and_twin(twin_and_compiled):
    """Generating through the KV cache picks the tokens that recomputing the whole sequence picks, and the twin's.

    Exactly so in float32 weight-only modes. In float16, and where activations are quantized (float8's 3-bit
    mantissa, int8-smoothquant's 255 levels), a
    difference in the last bits between the cached and uncached computations can change a later sampled token, as
    it does between any two implementations: there, every token must be among the twin's MAX_RANK likeliest after
    the same prefix, which a wrong cache, mask or scale breaks.
    """
    twin, compiled = twin_and_compiled
    idx = torch.randint(0, 50257, (1, 6), generator=torch.Generator().manual_seed(2))
    cached = model.generate(compiled, idx, 10, top_k=20, generator=torch.Generator().manual_seed(3))

    if compiled.config.dtype != "float32" or compiled.config.quant_mode in ("float8", "int8-smoothquant"):
        with torch.no_grad():
            twin_logits = twin(cached)[0, 5:-1]  # [10, vocab]: after each prefix
        chosen = twin_logits.gather(1, cached[0, 6:, None])  # [10, 1]
        ranks = (twin_logits > chosen).sum(dim=1)  # how many tokens the twin prefers to each chosen one
        assert ranks.max().item() < MAX_RANK, f"ranks in the twin's logits: {ranks.tolist()}"
        return
    uncached, generator = idx, torch.Generator().manual_seed(3)
    for _ in range(10):  # the whole sequence every step, through the prefill executable
        logits, _, _ = model.run(compiled.prefill, model.gpu_tokens(uncached))
        uncached = torch.cat([uncached, sample_next_token(logits[:, -1, :], 1.0, 20, generator)], dim=1)
    twin_tokens = reference.generate(twin, idx, 10, top_k=20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, twin_tokens)


@needs_gpu
def test_generate_rejects_prompts_longer_than_compiled(twin_and_compiled):
    _, compiled = twin_and_compiled
    with pytest.raises(ValueError, match="must fit in the seq_len"):
        model.generate(compiled, torch.zeros(1, SEQ_LEN, dtype=torch.long), 1)
