"""The ONNX file (exports/onnx_export.py) is the twin with its weights stored quantized, and ONNX Runtime runs it as
the twin.

Each mode, and a per-layer mix of them, is calibrated by ModelOpt once (module fixture) and loaded into the twin by
weight_loader; the twin is the truth. The file is read back with onnx (types, values, graph structure), checked
against TensorRT's rules for explicit quantization, and run by ONNX Runtime (exports/onnx_runtime.py) at exact math and
at its default, faster accuracy level, for a batch of 2 over a prompt and cached steps.
"""

import os
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import MIXED_LAYER_QUANT_MODES, make_gpt2
from onnx import TensorProto, numpy_helper

import reference
from config import AUTO_QUANT_MODE, INT4_BLOCK_SIZE, QUANT_MODES, layer_quant_mode
from exports import onnx_export, onnx_runtime
from measure.twin import load_twin
from quant.auto_quantize import Recipe, quantize_with_recipe
from quantization import modelopt_quantize
from reference import GPT

STORED_TYPE = {
    "int8-weight-only": TensorProto.INT8,
    "int4-weight-only": TensorProto.INT4,
    "float8": TensorProto.FLOAT8E4M3FN,
    "int8-smoothquant": TensorProto.INT8,
    None: TensorProto.FLOAT,
}
BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
PROMPT = torch.tensor([[464, 3290, 318, 257, 922, 1110, 13], [15496, 995, 11, 428, 318, 257, 1332]])  # [2, 7]
STEPS = torch.tensor([[11, 262, 3797], [290, 340, 318]])  # [2, 3]: the tokens fed one at a time after the prompt
EXACT_TOLERANCE = 1e-4


@dataclass
class Exported:
    mode: str
    onnx_dir: str
    twin: GPT
    model: onnx.ModelProto


INT4_LM_HEAD = "int4-weight-only, int4 lm_head"  # the output layer quantized too (config.lm_head_mode)


@pytest.fixture(scope="module")
def exports_by_mode() -> dict[str, Exported]:
    """Each mode's export once: a test that asks for one mode alone (indirect) makes pytest set `exported` up again."""
    return {}


@pytest.fixture(scope="module", params=[*QUANT_MODES, AUTO_QUANT_MODE, INT4_LM_HEAD])
def exported(request, exports_by_mode, calibration_file, tmp_path_factory) -> Exported:
    if request.param not in exports_by_mode:
        exports_by_mode[request.param] = export(request.param, calibration_file, tmp_path_factory)
    return exports_by_mode[request.param]


def export(mode: str, calibration_file: str, tmp_path_factory) -> Exported:
    """ModelOpt's model calibrated in `mode`, loaded into the twin, and the twin's ONNX file."""
    if mode == INT4_LM_HEAD:
        int4 = "int4-weight-only"
        quantized = modelopt_quantize(
            make_gpt2(), int4, dataset_name=calibration_file, num_samples=4, batch_size=4, lm_head_mode=int4
        )
        twin = load_twin(quantized, int4, quantized, lm_head_mode=int4)
    elif mode == AUTO_QUANT_MODE:  # every format and an unquantized layer, as AutoQuantize mixes them
        recipe = Recipe(MIXED_LAYER_QUANT_MODES, effective_bits=0.0)
        quantized = quantize_with_recipe(make_gpt2(), recipe, calibration_file, num_samples=4, batch_size=4)
        twin = load_twin(quantized, mode, quantized, layer_quant_modes=MIXED_LAYER_QUANT_MODES)
    else:
        quantized = modelopt_quantize(make_gpt2(), mode, dataset_name=calibration_file, num_samples=4, batch_size=4)
        twin = load_twin(quantized, mode, quantized)
    onnx_dir = str(tmp_path_factory.mktemp(f"onnx-{mode.replace(', ', '-').replace(' ', '_')}"))
    onnx_export.export_onnx(twin, onnx_dir)
    return Exported(mode, onnx_dir, twin, onnx.load(os.path.join(onnx_dir, onnx_export.MODEL_FILE)))


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {initializer.name: initializer for initializer in model.graph.initializer}


def block_linears(twin: GPT) -> list[str]:
    return [f"transformer.h.{i}.{layer}" for i in range(twin.config.num_layers) for layer in BLOCK_LINEARS]


def logits_of(model: GPT | onnx_runtime.OnnxGPT, cached: GPT | onnx_runtime.OnnxGPT | None = None):
    """The logits for the prompt [2, 7, vocab] (the full forward), its last position [2, 1, vocab] and each cached
    step's [2, 1, vocab] (forward_with_cache of `cached`, by default `model`): the same calls on the twin and on
    ONNX Runtime's model."""
    cached = cached or model
    with torch.no_grad():
        prompt_logits, keys, values = cached.forward_with_cache(PROMPT)
        logits = [model(PROMPT), prompt_logits]
        for step in STEPS.split(1, dim=1):
            step_logits, keys, values = cached.forward_with_cache(step, keys, values)
            logits.append(step_logits)
    return logits


def onnx_logits(onnx_dir: str, math: str) -> list[torch.Tensor]:
    """The same calls through ONNX Runtime, forward_with_cache on a session with the last position's logits only."""
    full = onnx_runtime.OnnxGPT(onnx_runtime.session(onnx_dir, math, threads=1))
    return logits_of(
        full, onnx_runtime.OnnxGPT(onnx_runtime.session(onnx_dir, math, threads=1, last_position_only=True))
    )


def max_error(onnx_dir: str, twin: GPT, math: str) -> float:
    return max(
        (ours - theirs).abs().max().item()
        for ours, theirs in zip(onnx_logits(onnx_dir, math), logits_of(twin), strict=True)
    )


def test_onnx_checker_passes_in_full(exported):
    onnx.checker.check_model(os.path.join(exported.onnx_dir, onnx_export.MODEL_FILE), full_check=True)


@pytest.mark.parametrize("math", [onnx_runtime.EXACT, "float32"])
def test_onnx_runtime_at_exact_math_computes_the_twins_logits(exported, math):
    assert max_error(exported.onnx_dir, exported.twin, math) <= EXACT_TOLERANCE


def test_onnx_runtimes_fast_path_error_is_measured(exported):
    """At its default accuracy level ONNX Runtime computes the int8/int4 matmuls on int8 activations: an error the
    twin does not have, which must be there (the fast kernels ran) and stay small next to the logits (about 4% of
    the largest on these models; evaluate.py measures what it costs in perplexity)."""
    error = max_error(exported.onnx_dir, exported.twin, "int8")
    print(f"{exported.mode}: max logit error at the default accuracy level {error:.3g}")
    largest = logits_of(exported.twin)[0].abs().max().item()
    if exported.mode == "float8":  # no CPU kernel takes float8: nothing is fused, the math stays float32
        assert error <= EXACT_TOLERANCE
    elif exported.mode == "int8-smoothquant":  # the activations are int8 already: integer math changes nothing
        assert error <= EXACT_TOLERANCE
    else:
        assert EXACT_TOLERANCE < error < 0.1 * largest


def optimized_graph(onnx_dir: str, tmp_path) -> onnx.ModelProto:
    """The graph ONNX Runtime runs after its optimizations (fusions included), as it saves it."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(os.path.join(onnx_dir, onnx_export.MODEL_FILE), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath)


@pytest.mark.parametrize("exported", ["int8-smoothquant"], indirect=True)
def test_onnx_runtime_runs_smoothquant_layers_on_its_integer_kernels(exported, tmp_path):
    """ONNX Runtime's QDQ fusion turns each Q/DQ'd activation, DQ'd int8 weight and MatMul into MatMulIntegerToFloat:
    int8 times int8, accumulated in int32 (as TensorRT's int8 GEMM does), then scaled back to float."""
    optimized = optimized_graph(exported.onnx_dir, tmp_path)
    fused = [node for node in optimized.graph.node if node.op_type == "MatMulIntegerToFloat"]
    assert len(fused) == len(block_linears(exported.twin))


def test_onnx_runtime_generates_the_twins_greedy_tokens(exported):
    session = onnx_runtime.session(exported.onnx_dir, "float32", threads=1, last_position_only=True)
    with onnx_runtime.torch_threads(1):
        ours = reference.generate(onnx_runtime.OnnxGPT(session), PROMPT, 8, top_k=1)
    assert torch.equal(ours, reference.generate(exported.twin, PROMPT, 8, top_k=1))


def test_every_block_linear_weight_is_stored_in_its_quantized_type(exported):
    stored = initializers(exported.model)
    for layer in block_linears(exported.twin):
        expected = STORED_TYPE[layer_quant_mode(exported.twin.config, layer)]
        actual = stored[f"{layer}.weight"].data_type
        assert actual == expected, f"{layer}.weight is {TensorProto.DataType.Name(actual)}"


def test_stored_weights_dequantize_to_the_twins_weights(exported):
    """The file's integers times its scales, computed here with numpy, are the weights the twin multiplies."""
    stored = initializers(exported.model)
    twin_layers = dict(exported.twin.named_modules())
    for layer in block_linears(exported.twin):
        twin_layer = twin_layers[layer]
        if getattr(twin_layer, "dequantized_weight", None) is None:
            continue  # an unquantized layer of the mix
        weight = numpy_helper.to_array(stored[f"{layer}.weight"]).astype(np.float32)  # [in, out]
        scale = numpy_helper.to_array(stored[f"{layer}.weight_scale"])
        if scale.ndim == 2:  # int4: one scale per 128 input features of each output column
            scale = np.repeat(scale, INT4_BLOCK_SIZE, axis=0)
        expected = twin_layer.dequantized_weight
        expected = expected if isinstance(twin_layer, reference.Int4Linear) else expected.t()  # [in, out]
        expected = expected_with_value_fold(exported.twin, layer, expected).numpy()
        np.testing.assert_allclose(weight * scale, expected, rtol=1e-6, atol=0)  # (q * s) * f against q * (s * f)


def value_fold(twin: GPT, layer: str) -> torch.Tensor | None:
    """attn.c_proj's AWQ pre_quant_scale [embd] where the export folds it into c_attn's value columns (a c_proj in
    int4, a c_attn with a scale per output column or none, not float8's one per tensor); None elsewhere."""
    layers = dict(twin.named_modules())
    block = layer.rsplit(".", 2)[0]  # transformer.h.N
    c_attn, c_proj = layers[f"{block}.attn.c_attn"], layers[f"{block}.attn.c_proj"]
    per_tensor = isinstance(c_attn, reference.QuantLinear) and c_attn.weight_scale.dim() == 0
    return c_proj.pre_quant_scale.detach() if isinstance(c_proj, reference.Int4Linear) and not per_tensor else None


def expected_with_value_fold(twin: GPT, layer: str, weight: torch.Tensor) -> torch.Tensor:
    """The twin's weight [in, out] of `layer` as the file holds it: c_attn's value columns times value_fold."""
    factor = value_fold(twin, layer) if layer.endswith("attn.c_attn") else None
    if factor is None:
        return weight
    embd = factor.shape[0]
    return torch.cat([weight[:, : 2 * embd], weight[:, 2 * embd :] * factor], dim=1)


def test_awqs_pre_quant_scale_is_folded_where_exact_and_multiplied_elsewhere(exported):
    """x * pre_quant_scale is what an int4 layer multiplies: the step that makes AWQ's int4 weights right. Where an
    exact fold exists the file has no Mul: c_attn's and c_fc's factors are in ln_1's and ln_2's weight and bias,
    attn.c_proj's in c_attn's value columns (test_stored_weights_dequantize_to_the_twins_weights); mlp.c_proj,
    after the GELU, multiplies its input by it."""
    stored, made_by = initializers(exported.model), producers(exported.model)
    parameters = {name: p.detach() for name, p in exported.twin.named_parameters()}
    for layer in block_linears(exported.twin):
        if layer_quant_mode(exported.twin.config, layer) != "int4-weight-only":
            continue
        twin_scale = parameters[f"{layer}.pre_quant_scale"]
        assert not torch.all(twin_scale == 1)  # AWQ scaled the outliers: dropping the factor would change the logits
        block, name = layer.split(".", 3)[:3], layer.split(".", 3)[3]
        norm = {"attn.c_attn": "ln_1", "mlp.c_fc": "ln_2"}.get(name)
        if norm is not None or (name == "attn.c_proj" and value_fold(exported.twin, layer) is not None):
            assert f"{layer}.pre_quant_scale" not in stored, layer
            if norm is not None:
                prefix = f"{'.'.join(block)}.{norm}"
                (layer_norm,) = consumers(exported.model, f"{prefix}.weight")  # its bias may be stored under any name
                for kind, stored_name in zip(("weight", "bias"), layer_norm.input[1:], strict=True):
                    expected = (parameters[f"{prefix}.{kind}"] * twin_scale).numpy()
                    np.testing.assert_array_equal(numpy_helper.to_array(stored[stored_name]), expected)
            continue
        np.testing.assert_array_equal(numpy_helper.to_array(stored[f"{layer}.pre_quant_scale"]), twin_scale.numpy())
        (dequantize,) = consumers(exported.model, f"{layer}.weight")
        (matmul,) = consumers(exported.model, dequantize.output[0])
        multiply = made_by[matmul.input[0]]
        assert multiply.op_type == "Mul" and f"{layer}.pre_quant_scale" in multiply.input


def test_smoothquant_layers_quantize_their_smoothed_input_to_int8(exported):
    """Mul(x, pre_quant_scale) -> QuantizeLinear(int8, input_scale) -> DequantizeLinear is the MatMul's input: the
    smoothing factor and the input scale are both in the graph, with the twin's values. A factor of ones (the MLP's
    c_proj, left unsmoothed) needs no Mul."""
    stored, made_by = initializers(exported.model), producers(exported.model)
    twin_parameters = dict(exported.twin.named_parameters())
    for layer in block_linears(exported.twin):
        if layer_quant_mode(exported.twin.config, layer) != "int8-smoothquant":
            continue
        (dequantize_weight,) = consumers(exported.model, f"{layer}.weight")
        (matmul,) = consumers(exported.model, dequantize_weight.output[0])
        dequantize_input = made_by[matmul.input[0]]
        quantize = made_by[dequantize_input.input[0]]
        assert (dequantize_input.op_type, quantize.op_type) == ("DequantizeLinear", "QuantizeLinear"), layer
        assert stored[quantize.input[2]].data_type == TensorProto.INT8
        scale = numpy_helper.to_array(stored[quantize.input[1]])
        np.testing.assert_array_equal(scale, twin_parameters[f"{layer}.input_scale"].detach().numpy())
        twin_scale = twin_parameters[f"{layer}.pre_quant_scale"].detach()
        if layer.endswith("mlp.c_proj"):
            assert torch.all(twin_scale == 1) and f"{layer}.pre_quant_scale" not in stored
            continue
        assert not torch.all(twin_scale == 1)  # smoothed: dropping the Mul would change the logits
        multiply = made_by[quantize.input[0]]
        assert multiply.op_type == "Mul" and f"{layer}.pre_quant_scale" in multiply.input, layer
        np.testing.assert_array_equal(numpy_helper.to_array(stored[f"{layer}.pre_quant_scale"]), twin_scale.numpy())


def test_lm_head_is_tied_to_wte_unless_quantized(exported):
    stored = initializers(exported.model)
    vocab, embd = exported.twin.config.vocab_size, exported.twin.config.embedding_size
    vocab_sized = [name for name, tensor in stored.items() if vocab in tensor.dims and name.endswith(".weight")]
    if layer_quant_mode(exported.twin.config, "lm_head") is None:
        assert vocab_sized == ["transformer.wte.weight"]
    else:
        assert sorted(vocab_sized) == ["lm_head.weight", "transformer.wte.weight"]
        assert list(stored["lm_head.weight"].dims) == [embd, vocab]


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in model.graph.node for output in node.output}


def consumers(model: onnx.ModelProto, name: str) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if name in node.input]


def attribute(node: onnx.NodeProto, name: str):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def test_graph_follows_tensorrts_explicit_quantization_rules(exported):
    """Each row of docs/onnx.md's table of onnx-tensorrt's rules (TensorRT 10), as the page writes it:
    - int8 weight: INT8 [in, out] -> DequantizeLinear(scale [out], axis=1), zero point 0 or none -> MatMul;
    - int4 weight: INT4 [in, out] -> DequantizeLinear(scale [in/128, out], axis=0, block_size=128) -> MatMul;
    - float8 weight: FLOAT8E4M3FN [in, out] -> DequantizeLinear(scale []) -> MatMul;
    - float8 activation: QuantizeLinear(x, scale [], zero point FLOAT8E4M3FN 0, saturate=1) -> DequantizeLinear with
      the same scale -> the MatMul's input, beside its float8 weight; int8-smoothquant's likewise in INT8, beside its
      int8 weight; no QuantizeLinear anywhere else (the weight-only modes have none);
    - each DequantizeLinear of a weight feeds exactly its MatMul, as the MatMul's weight operand;
    - everything else float32; opset 21, the standard domain only, no functions.
    (AWQ's pre_quant_scale row: test_int4_layers_multiply_their_input_by_awqs_pre_quant_scale.)"""
    model, stored = exported.model, initializers(exported.model)
    made_by = producers(model)
    assert [(opset.domain, opset.version) for opset in model.opset_import] == [("", 21)] and not model.functions
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    quantized_types = {TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN}
    weights = {
        name for name, tensor in stored.items() if tensor.data_type in quantized_types and name.endswith(".weight")
    }
    assert weights, "no quantized weight in the graph"
    dequantized_weights = set()
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            check_activation_quantize(model, stored, node)
        elif node.op_type == "DequantizeLinear" and node.input[0] in stored:
            check_weight_dequantize(model, stored, node)
            dequantized_weights.add(node.input[0])
        elif node.op_type == "DequantizeLinear":  # an activation's: made by the QuantizeLinear checked above
            assert made_by[node.input[0]].op_type == "QuantizeLinear", node.name
    assert dequantized_weights == weights
    for name, tensor in stored.items():  # the rest is float32 (and int64 shapes and indices)
        zero_point = name in {node.input[2] for node in model.graph.node if node.op_type == "QuantizeLinear"}
        if name not in weights and not zero_point:
            assert tensor.data_type in (TensorProto.FLOAT, TensorProto.INT64), (name, tensor.data_type)


def check_weight_dequantize(model: onnx.ModelProto, stored: dict, node: onnx.NodeProto) -> None:
    """A stored weight's DequantizeLinear: the scale layout of its type's row, zero point 0, feeding only its MatMul
    as the weight operand."""
    weight, scale = stored[node.input[0]], stored[node.input[1]]
    rows, columns = weight.dims  # [in, out]
    axis, block_size = attribute(node, "axis"), attribute(node, "block_size") or None  # 0 is none, as unset
    if weight.data_type == TensorProto.INT8:
        assert (list(scale.dims), axis, block_size) == ([columns], 1, None), node.input[0]
    elif weight.data_type == TensorProto.INT4:
        expected = ([rows // INT4_BLOCK_SIZE, columns], 0, INT4_BLOCK_SIZE)
        assert (list(scale.dims), axis, block_size) == expected, node.input[0]
    else:
        assert weight.data_type == TensorProto.FLOAT8E4M3FN and list(scale.dims) == [] and not block_size
    if len(node.input) > 2 and node.input[2]:
        assert not numpy_helper.to_array(stored[node.input[2]]).astype(np.float32).any()
    (matmul,) = consumers(model, node.output[0])
    assert matmul.op_type == "MatMul" and list(matmul.input).index(node.output[0]) == 1, node.input[0]


def check_activation_quantize(model: onnx.ModelProto, stored: dict, quantize: onnx.NodeProto) -> None:
    """An activation's per-tensor Q/DQ (float8's, or int8-smoothquant's int8) with zero point 0 of its type,
    saturating in float8, into the MatMul of a weight stored in the same type."""
    scale, zero_point = stored[quantize.input[1]], stored[quantize.input[2]]
    assert list(scale.dims) == [] and zero_point.data_type in (TensorProto.FLOAT8E4M3FN, TensorProto.INT8)
    if zero_point.data_type == TensorProto.FLOAT8E4M3FN:
        assert attribute(quantize, "saturate") == 1, quantize.name
    assert not numpy_helper.to_array(zero_point).astype(np.float32).any()
    (dequantize,) = consumers(model, quantize.output[0])
    assert dequantize.op_type == "DequantizeLinear" and dequantize.input[1] == quantize.input[1], quantize.name
    (matmul,) = consumers(model, dequantize.output[0])
    assert matmul.op_type == "MatMul" and list(matmul.input).index(dequantize.output[0]) == 0
    weight_dequantize = producers(model)[matmul.input[1]]
    assert stored[weight_dequantize.input[0]].data_type == zero_point.data_type, matmul.name


@pytest.mark.parametrize("exported", [INT4_LM_HEAD], indirect=True)
def test_onnx_runtime_fuses_a_quantized_output_layer_into_its_int4_kernel(exported, tmp_path):
    """The output layer stored behind its own blocked DequantizeLinear becomes a MatMulNBits in the graph ONNX
    Runtime runs (docs/benchmark.md: on a CPU it was half of a step in float32), the input embedding a float table."""
    assert layer_quant_mode(exported.twin.config, "lm_head") == "int4-weight-only"
    assert initializers(exported.model)["transformer.wte.weight"].data_type == TensorProto.FLOAT
    assert producers(optimized_graph(exported.onnx_dir, tmp_path))["logits"].op_type == "MatMulNBits"
