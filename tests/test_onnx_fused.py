"""The ONNX Runtime flavor of the ONNX file (exports/onnx_fused.py) is the twin in ONNX Runtime's fused operators, and
ONNX Runtime runs it as the twin, its cache written in place.

Each weight-only mode is calibrated by ModelOpt once (module fixture) and loaded into the twin; the twin is the truth.
The file's weights are unpacked here with numpy from MatMulNBits' layout, independently of the exporter's packing,
and ONNX Runtime runs it for a batch of 2 over a prompt and cached steps (test_onnx.py's calls).
"""

import copy
import os
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch
from helpers import make_gpt2
from onnx import numpy_helper
from test_onnx import EXACT_TOLERANCE, PROMPT, STEPS, expected_with_value_fold, logits_of, max_error

import reference
from exports import onnx_export, onnx_fused, onnx_runtime
from measure.twin import load_twin
from quantization import modelopt_quantize
from reference import GPT

INT4_LM_HEAD = "int4-weight-only, int4 lm_head"
INT8_LM_HEAD = "int8-weight-only, int8 lm_head"
INT8_KV_CACHE = "int4-weight-only, int4 lm_head, int8 kv_cache"  # the fastest file (docs/benchmark.md)
MODES = [None, "int8-weight-only", "int4-weight-only", INT8_LM_HEAD, INT4_LM_HEAD, INT8_KV_CACHE]


@dataclass
class Fused:
    mode: str | None
    onnx_dir: str
    twin: GPT
    model: onnx.ModelProto


@pytest.fixture(scope="module", params=MODES)
def fused(request, calibration_file, tmp_path_factory) -> Fused:
    mode = request.param
    quant_mode, *extras = (mode or "").split(", ")
    quant_mode = quant_mode or None
    lm_head_mode = quant_mode if any(extra.endswith("lm_head") for extra in extras) else None
    kv_cache = "int8" if "int8 kv_cache" in extras else None
    if quant_mode is None:
        twin = load_twin(make_gpt2(), None)
    else:
        quantized = modelopt_quantize(
            make_gpt2(),
            quant_mode,
            dataset_name=calibration_file,
            num_samples=4,
            batch_size=4,
            kv_cache=kv_cache,
            lm_head_mode=lm_head_mode,
        )
        twin = load_twin(quantized, quant_mode, quantized, kv_cache=kv_cache, lm_head_mode=lm_head_mode)
    onnx_dir = str(tmp_path_factory.mktemp("onnx-ort"))
    onnx_fused.export_fused_onnx(twin, onnx_dir)
    return Fused(mode, onnx_dir, twin, onnx.load(os.path.join(onnx_dir, onnx_export.MODEL_FILE)))


def test_at_float32_math_the_ort_flavor_computes_the_twins_logits(fused):
    error = max_error(fused.onnx_dir, fused.twin, "float32")
    if fused.twin.config.kv_cache is None:
        assert error <= EXACT_TOLERANCE
    else:  # a key or value within 1e-6 of a rounding boundary may land one int8 step away (the next test counts them)
        assert error < 0.1 * int8_cache_effect(fused.twin), f"error {error:.3g}"


def int8_cache_effect(twin: GPT) -> float:
    """How far the int8 cache moves the twin's logits: the largest change from the same twin without it."""
    without = copy.deepcopy(twin)
    for block in without.transformer.h:
        block.attn.k_scale = block.attn.v_scale = None
    with torch.no_grad():
        return max((a - b).abs().max().item() for a, b in zip(logits_of(twin), logits_of(without), strict=True))


@pytest.mark.parametrize("fused", [INT8_KV_CACHE], indirect=True)
def test_an_int8_cache_holds_the_twins_rounded_keys_and_values_and_nothing_past_them(fused):
    """The buffers start as random int8s, which attention must not read: the logits are still the twin's, and after
    the prompt and the steps the buffers hold round(k / k_scale) and round(v / v_scale) of the twin's keys and values
    (the values computed with attn.c_proj's AWQ factor folded in, and scaled by it), the rest as it was."""
    model = onnx_runtime.OnnxGPT(onnx_runtime.session(fused.onnx_dir, "float32", threads=1, last_position_only=True))
    shape = (PROMPT.shape[0], model.num_heads, model.capacity, model.head_dim)
    generator = np.random.default_rng(0)
    arrays = [generator.integers(-128, 128, shape, dtype=np.int8) for _ in range(2 * model.num_layers)]
    garbage = [array.copy() for array in arrays]
    cache = onnx_runtime.SharedCache([onnx_runtime.ort.OrtValue.ortvalue_from_numpy(a) for a in arrays], 0)
    tokens = torch.cat([PROMPT, STEPS], dim=1)
    with torch.no_grad():
        logits, cache = model.run_shared(PROMPT, cache)
        for step in STEPS.split(1, dim=1):
            logits, cache = model.run_shared(step, cache)
        twin_logits, keys, values = fused.twin.forward_with_cache(tokens)
    assert (logits - twin_logits).abs().max().item() < 0.1 * int8_cache_effect(fused.twin)
    filled, stored, off_by_one = tokens.shape[1], 0, 0
    for layer in range(model.num_layers):
        attention = fused.twin.transformer.h[layer].attn
        for index, twin_cache, scale in (
            (2 * layer, keys, attention.k_scale),
            (2 * layer + 1, values, attention.v_scale),
        ):
            expected = torch.round(twin_cache[layer] / scale.detach()).clamp(-128, 127).numpy()
            difference = np.abs(arrays[index][:, :, :filled].astype(np.int32) - expected)
            assert difference.max() <= 1
            stored, off_by_one = stored + difference.size, off_by_one + int((difference == 1).sum())
            np.testing.assert_array_equal(arrays[index][:, :, filled:], garbage[index][:, :, filled:])
    assert off_by_one <= 1e-3 * stored, f"{off_by_one} of {stored} values one step away from the twin's"


def test_the_ort_flavors_fast_path_error_is_measured(fused):
    """MatMulNBits at accuracy level 4 multiplies int8 activations, as the standard file's fused kernels do: an
    error that must be there for a quantized file (the fast kernels ran) and stay small next to the logits."""
    error = max_error(fused.onnx_dir, fused.twin, "int8")
    if fused.mode is None:  # float32 MatMuls: nothing to quantize
        assert error <= EXACT_TOLERANCE
    else:
        assert EXACT_TOLERANCE < error < 0.1 * logits_of(fused.twin)[0].abs().max().item()


def test_the_ort_flavor_generates_the_twins_greedy_tokens(fused):
    """Greedy, onnx_runtime.generate runs its own loop (numpy between two runs, the step's inputs and logits bound
    once): it gives the twin's tokens and hands them to on_token one at a time, as reference.generate does on the
    same session."""
    model = onnx_runtime.OnnxGPT(onnx_runtime.session(fused.onnx_dir, "float32", threads=1, last_position_only=True))
    twins = reference.generate(fused.twin, PROMPT, 8, top_k=1)
    streamed = []
    assert torch.equal(onnx_runtime.generate(model, PROMPT, 8, top_k=1, on_token=streamed.append), twins)
    assert torch.equal(torch.cat(streamed, dim=1), twins[:, PROMPT.shape[1] :])
    with onnx_runtime.torch_threads(1):
        assert torch.equal(reference.generate(model, PROMPT, 8, top_k=1), twins)


@pytest.mark.parametrize("fused", ["int4-weight-only"], indirect=True)
def test_the_greedy_loop_refuses_more_tokens_than_the_cache_holds(fused):
    model = onnx_runtime.OnnxGPT(onnx_runtime.session(fused.onnx_dir, "float32", threads=1, last_position_only=True))
    fitting = model.capacity - PROMPT.shape[1] + 1  # the last new token is chosen, never fed
    assert onnx_runtime.generate(model, PROMPT, fitting, top_k=1).shape[1] == model.capacity + 1
    with pytest.raises(ValueError, match=f"{model.capacity + 1} positions do not fit the model's {model.capacity}"):
        onnx_runtime.generate(model, PROMPT, fitting + 1, top_k=1)


@pytest.mark.parametrize("fused", ["int4-weight-only"], indirect=True)
def test_the_cache_is_one_buffer_per_layer_written_in_place(fused):
    """Every step writes its keys and values into the buffers it was given, at their positions, and reads nothing
    past them: buffers full of NaN give the twin's logits, and after the prompt and the steps they hold the twin's
    keys and values in positions 0 .. past + seq, the rest untouched. The values carry attn.c_proj's AWQ factor,
    folded into c_attn's value columns."""
    model = onnx_runtime.OnnxGPT(onnx_runtime.session(fused.onnx_dir, "float32", threads=1, last_position_only=True))
    shape = (PROMPT.shape[0], model.num_heads, model.capacity, model.head_dim)
    arrays = [np.full(shape, np.nan, np.float32) for _ in range(2 * model.num_layers)]
    cache = onnx_runtime.SharedCache([onnx_runtime.ort.OrtValue.ortvalue_from_numpy(a) for a in arrays], 0)
    tokens = torch.cat([PROMPT, STEPS], dim=1)
    with torch.no_grad():
        logits, cache = model.run_shared(PROMPT, cache)
        twin_logits, keys, values = fused.twin.forward_with_cache(PROMPT)
        assert (logits[:, -1:] - twin_logits).abs().max().item() <= EXACT_TOLERANCE
        for step in STEPS.split(1, dim=1):
            logits, cache = model.run_shared(step, cache)
        _, keys, values = fused.twin.forward_with_cache(tokens)  # [layers, batch, heads, seq, head_dim]
    filled = tokens.shape[1]
    assert cache.length == filled
    for layer in range(model.num_layers):
        factor = fused.twin.transformer.h[layer].attn.c_proj.pre_quant_scale.detach()  # [embd]
        folded = values[layer] * factor.reshape(model.num_heads, 1, model.head_dim)  # [batch, heads, seq, head_dim]
        for array, twin_cache in ((arrays[2 * layer], keys[layer]), (arrays[2 * layer + 1], folded)):
            np.testing.assert_allclose(array[:, :, :filled], twin_cache.numpy(), atol=EXACT_TOLERANCE)
            assert np.isnan(array[:, :, filled:]).all()


def unpack_matmul_nbits(model: onnx.ModelProto, layer: str) -> np.ndarray:
    """The float weight [in, out] a MatMulNBits node multiplies by, from its packed bytes and scales: unsigned
    values, 4-bit ones two to a byte (low nibble first), minus the default zero point 2^(bits - 1), times the
    scale of their block of the input dimension (blocks as the packed shape has them, padding cut off at K)."""
    (node,) = [node for node in model.graph.node if node.name == layer]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    stored = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    packed, scales = stored[node.input[1]], stored[node.input[2]]  # [out, blocks, bytes], [out, blocks]
    bits, in_features = attributes["bits"], attributes["K"]
    if bits == 4:
        packed = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:2], -1)
    values = packed.astype(np.float32) - 2 ** (bits - 1)  # [out, blocks, block_size]
    weight = (values * scales[:, :, None]).reshape(packed.shape[0], -1)[:, :in_features]
    return weight.T  # [in, out]


def test_stored_weights_unpack_to_the_twins_weights(fused):
    """What each MatMulNBits multiplies by is the twin's dequantized weight; c_attn's value columns also carry
    attn.c_proj's AWQ pre_quant_scale, folded there (attention mixes positions, not features)."""
    layers = dict(fused.twin.named_modules())
    quantized = [name for name, layer in layers.items() if getattr(layer, "dequantized_weight", None) is not None]
    assert len(quantized) == {None: 0}.get(fused.mode, 8 + ("lm_head" in (fused.mode or "")))
    for name in quantized:
        twin_layer = layers[name]
        expected = twin_layer.dequantized_weight
        expected = expected if isinstance(twin_layer, reference.Int4Linear) else expected.t()  # [in, out]
        expected = expected_with_value_fold(fused.twin, name, expected).numpy()
        np.testing.assert_allclose(unpack_matmul_nbits(fused.model, name), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused", ["int4-weight-only"], indirect=True)
def test_awqs_pre_quant_scale_is_folded_into_layernorm_and_multiplied_only_after_the_gelu(fused):
    """ln_1 and ln_2 carry c_attn's and c_fc's factor in their weight and bias; only mlp.c_proj keeps a Mul."""
    stored = {i.name: numpy_helper.to_array(i) for i in fused.model.graph.initializer}
    parameters = {name: p.detach().numpy() for name, p in fused.twin.named_parameters()}
    for i in range(fused.twin.config.num_layers):
        block = f"transformer.h.{i}"
        for norm, layer in (("ln_1", "attn.c_attn"), ("ln_2", "mlp.c_fc")):
            scale = parameters[f"{block}.{layer}.pre_quant_scale"]
            assert not np.all(scale == 1)  # AWQ scaled the outliers: a fold left out would change the logits
            for kind in ("weight", "bias"):
                expected = parameters[f"{block}.{norm}.{kind}"] * scale
                np.testing.assert_allclose(stored[f"{block}.{norm}.{kind}"], expected, rtol=1e-6)
    multiplied = sorted(node.name for node in fused.model.graph.node if node.op_type == "Mul")
    expected = [f"transformer.h.{i}.mlp.c_proj.pre_quant_scale_mul" for i in range(fused.twin.config.num_layers)]
    assert multiplied == expected


def test_the_graph_is_onnx_runtimes_fused_operators(fused):
    """Per block two SkipLayerNormalization, one GroupQueryAttention, one FastGelu and four matmuls: no standard
    DequantizeLinear, no Concat of the cache; the past's buffers hold every position the model has."""
    layers = fused.twin.config.num_layers
    ops = [node.op_type for node in fused.model.graph.node]
    assert ops.count("SkipLayerNormalization") == 2 * layers + 1
    assert ops.count("GroupQueryAttention") == ops.count("FastGelu") == layers
    matmul = "MatMul" if fused.mode is None else "MatMulNBits"
    assert ops.count(matmul) == 4 * layers + ("lm_head" in (fused.mode or ""))
    assert "DequantizeLinear" not in ops and "Concat" not in ops
    past = next(i for i in fused.model.graph.input if i.name == "past_key_values.0.key")
    assert [d.dim_value for d in past.type.tensor_type.shape.dim][1:] == [4, 128, 64]  # heads, n_positions, head_dim


@pytest.mark.parametrize("quant_mode", ["int8-smoothquant", "float8"])
def test_the_ort_flavor_refuses_layers_that_quantize_their_input(quant_mode, calibration_file, tmp_path):
    quantized = modelopt_quantize(make_gpt2(), quant_mode, dataset_name=calibration_file, num_samples=4, batch_size=4)
    with pytest.raises(ValueError, match=f"transformer.h.0.attn.c_attn quantizes its input too .*{quant_mode}"):
        onnx_fused.export_fused_onnx(load_twin(quantized, quant_mode, quantized), str(tmp_path))
