"""The ONNX Runtime flavor of the ONNX file: the twin's GPT-2 written in ONNX Runtime's own fused operators, for the
fastest generation on a CPU (`--export-onnx DIR --onnx-flavor ort`).

The standard file (onnx_export.py) is made of standard operators, so TensorRT and every ONNX runtime read it; ONNX
Runtime fuses what it can of it when it loads, and runs about 40 small nodes per block beside the weights' kernels,
with a cache that every step copies whole (optimum's layout: present = Concat(past, new)). This file is written
directly in the `com.microsoft` operators those fusions would aim at, eight nodes per block:

    SkipLayerNormalization   the residual add and ln_1 (AWQ's pre_quant_scale for c_attn folded into its weight)
    MatMulNBits              c_attn: the int4 or int8 weights as stored, the bias added in the kernel
    GroupQueryAttention      causal attention on a cache buffer that past and present share: a step writes its own
                             keys and values in place, so a step's cost does not grow with the cache's copy
    MatMulNBits              attn.c_proj
    SkipLayerNormalization   the residual add and ln_2
    MatMulNBits, FastGelu    c_fc and GPT-2's tanh GELU, then (a Mul by AWQ's pre_quant_scale and) mlp.c_proj

TensorRT cannot read these operators: this file is an ONNX Runtime-only flavor, written beside the standard one,
never instead of it. It holds the weight-only modes (int8, int4, a mix of them, and the quantized output layer);
int8-smoothquant and float8 quantize activations too, which it has no operator for here: they export as standard.
With an int8 KV cache (--kv-cache int8) GroupQueryAttention stores the keys and values as round(x / scale) in int8,
with the twin's k_scale and v_scale, and reads them back times the scale: a step reads a quarter of float32's cache.
Inputs: input_ids and position_ids [batch, seq], seqlens_k [batch] (positions filled after this step, less one),
total_sequence_length []; past_key_values.N.key/.value [batch, heads, n_positions, head_dim] (float32 or int8);
outputs: logits [batch, seq, vocab] and present.N.key/.value, bound to the same buffers as the past by
exports/onnx_runtime.py.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from config import INT4_BLOCK_SIZE
from exports.onnx_export import (
    StoredLinear,
    check_size,
    check_twin,
    dequantize_blocks,
    export_onnx,
    save_folder,
    stored_block,
)
from reference import GPT, QuantLinear, SmoothQuantLinear

FLAVOR = "ort"  # metadata_props["gpt2_flavor"]: how exports/onnx_runtime.py tells the two files apart
MS_DOMAIN = "com.microsoft"
OPSET = 21
INT8_BLOCK_SIZE = 128  # MatMulNBits takes blocks only: an int8 per-channel scale is repeated over blocks of 128
KV_SCALES = ("k_scale", "v_scale")  # on each attention layer with an int8 KV cache
ACCURACY_INT8 = 4  # MatMulNBits' accuracy_level: 4 quantizes the activations to int8 in the kernel, as the standard
# file's fused kernels do by default (docs/quality.md measures the cost); onnx_runtime.session can set 1 (float32)


class Graph:
    """Nodes and initializers, appended in the order the model computes them."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(
        self, op_type: str, inputs: list[str], name: str, outputs: int = 1, domain: str = "", **attrs
    ) -> list[str]:
        """Adds a node named `name`; its outputs are named name.0, name.1, ... and returned as a list."""
        names = [f"{name}.{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, domain=domain, **attrs))
        return names


def export_fused_onnx(twin: GPT, out_dir: str) -> str:
    """Writes `twin` (float32, weight-only modes) to out_dir/model.onnx in ONNX Runtime's fused operators, next to
    the Hugging Face files the standard export writes. Returns the one-line summary."""
    check_twin(twin, "export_fused_onnx", kv_caches=(None, "int8"))
    check_fusable(twin)
    model = fused_model(twin)
    check_size(model)
    onnx.checker.check_model(model)  # the standard operators' part; ONNX's checker has no com.microsoft schemas
    return save_folder(model, twin.config, out_dir)


def check_fusable(twin: GPT) -> None:
    """Raises ValueError for a twin with layers this flavor cannot hold, naming what can."""
    for name, layer in twin.named_modules():
        if isinstance(layer, SmoothQuantLinear) or (isinstance(layer, QuantLinear) and layer.input_scale is not None):
            raise ValueError(
                f"the ONNX Runtime flavor holds weight-only layers (int8, int4) and {name} quantizes its input too "
                "(int8-smoothquant, float8): export the standard flavor"
            )


# The file each flavor names (cli/example_args.py's ONNX_FLAVORS) and the function that writes it.
WRITERS = {"standard": export_onnx, FLAVOR: export_fused_onnx}


def fused_model(twin: GPT) -> onnx.ModelProto:
    """The graph: embeddings, the blocks, ln_f and the output layer."""
    config = twin.config
    graph, transformer = Graph(), twin.transformer
    wte = graph.constant("transformer.wte.weight", transformer.wte.weight.detach().numpy())  # [vocab, embd]
    wpe = graph.constant("transformer.wpe.weight", transformer.wpe.weight.detach().numpy())  # [n_positions, embd]
    (tokens,) = graph.node("Gather", [wte, "input_ids"], "transformer.wte")  # [batch, seq, embd]
    (positions,) = graph.node("Gather", [wpe, "position_ids"], "transformer.wpe")
    delta, residual = tokens, positions  # each block adds its two outputs to the residual stream
    for i, block in enumerate(transformer.h):
        delta, residual = fused_block(graph, block, f"transformer.h.{i}", delta, residual, config.num_heads)
    x, _ = skip_layer_norm(graph, transformer.ln_f, "transformer.ln_f", delta, residual)
    lm_head = twin.lm_head
    if isinstance(lm_head, nn.Linear) and torch.equal(lm_head.weight, transformer.wte.weight):  # tied: wte's copy
        graph.node("FusedMatMul", [x, wte], "lm_head", domain=MS_DOMAIN, transB=1)  # x @ wte^T
    else:
        linear(graph, StoredLinear(lm_head), "lm_head", x)
    graph.nodes[-1].output[0] = "logits"  # [batch, seq, vocab]
    return make_model(graph, config)


def fused_block(graph: Graph, block: nn.Module, name: str, delta: str, residual: str, num_heads: int):
    """One GPT-2 block after `residual` + `delta`; returns its own (delta, residual) for the next one."""
    ln_1, ln_2, linears = stored_block(block)  # AWQ's pre_quant_scale folded where exact, as in the standard file
    x, residual = skip_layer_norm(graph, ln_1, f"{name}.ln_1", delta, residual)
    qkv = linear(graph, linears["attn.c_attn"], f"{name}.attn.c_attn", x)  # [batch, seq, 3 * embd]
    index = name.rsplit(".", 1)[1]
    past = [f"past_key_values.{index}.key", f"past_key_values.{index}.value"]
    inputs, int8_cache = [qkv, "", "", *past, "seqlens_k", "total_sequence_length"], {}
    if block.attn.k_scale is not None:  # an int8 cache: inputs 12 and 13 are its scales, per channel
        scales = cache_scales(block, linears["attn.c_proj"])
        scales = [graph.constant(f"{name}.attn.{kind}", scale) for kind, scale in zip(KV_SCALES, scales, strict=True)]
        inputs += ["", "", "", "", "", *scales]  # cos/sin caches, position ids, attention bias, head sink: none
        int8_cache = dict(kv_cache_bit_width=8, k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL")
    (attention,) = graph.node(
        "GroupQueryAttention", inputs, f"{name}.attn", domain=MS_DOMAIN, num_heads=num_heads,
        kv_num_heads=num_heads, **int8_cache,
    )  # fmt: skip
    graph.nodes[-1].output.extend([f"present.{index}.key", f"present.{index}.value"])  # [batch, heads, max, dim]
    delta = linear(graph, linears["attn.c_proj"], f"{name}.attn.c_proj", attention)
    x, residual = skip_layer_norm(graph, ln_2, f"{name}.ln_2", delta, residual)
    hidden = linear(graph, linears["mlp.c_fc"], f"{name}.mlp.c_fc", x)  # [batch, seq, 4 * embd]
    (hidden,) = graph.node("FastGelu", [hidden], f"{name}.mlp.gelu", domain=MS_DOMAIN)
    return linear(graph, linears["mlp.c_proj"], f"{name}.mlp.c_proj", hidden), residual


def cache_scales(block: nn.Module, stored_c_proj: StoredLinear) -> tuple[np.ndarray, np.ndarray]:
    """An int8 cache's scales per channel [embd]: the twin's k_scale and v_scale (one per tensor), the values' times
    attn.c_proj's AWQ factor where stored_block folded it into them: round(v * s / (v_scale * s)) stores what the
    twin's round(v / v_scale) does."""
    attention = block.attn
    embd = block.ln_1.weight.shape[0]
    key_scale = np.full(embd, attention.k_scale.item(), np.float32)
    value_scale = np.full(embd, attention.v_scale.item(), np.float32)
    factor = getattr(attention.c_proj, "pre_quant_scale", None)
    if factor is not None and stored_c_proj.pre_quant_scale is None:  # folded into the value columns
        value_scale = value_scale * factor.detach().numpy()
    return key_scale, value_scale


def skip_layer_norm(graph: Graph, norm: nn.LayerNorm, name: str, delta: str, residual: str) -> tuple[str, str]:
    """LayerNorm(residual + delta) and the sum itself, from one kernel."""
    gamma = graph.constant(f"{name}.weight", norm.weight.detach().numpy())
    beta = graph.constant(f"{name}.bias", norm.bias.detach().numpy())
    (normed,) = graph.node(
        "SkipLayerNormalization", [delta, residual, gamma, beta], name, domain=MS_DOMAIN, epsilon=norm.eps
    )
    total = f"{name}.sum"
    graph.nodes[-1].output.extend(["", "", total])  # the mean and inverse deviation are for training
    return normed, total


def linear(graph: Graph, stored: StoredLinear, name: str, x: str) -> str:
    """x @ W + b: MatMulNBits on the weights as stored (int4 or int8), MatMul for a float layer."""
    if stored.pre_quant_scale is not None:  # AWQ's, where no fold reaches it (after the GELU)
        scale = graph.constant(f"{name}.pre_quant_scale", stored.pre_quant_scale.detach().numpy())
        (x,) = graph.node("Mul", [x, scale], f"{name}.pre_quant_scale_mul")
    bias = [] if stored.bias is None else [graph.constant(f"{name}.bias", stored.bias.detach().numpy())]
    weight = stored.weight.detach().numpy()  # [in, out]
    if stored.dequantize is None:
        (out,) = graph.node("MatMul", [x, graph.constant(f"{name}.weight", weight)], name)
        return graph.node("Add", [out, *bias], f"{name}.bias_add")[0] if bias else out
    bits, block_size = (4, INT4_BLOCK_SIZE) if stored.dequantize is dequantize_blocks else (8, INT8_BLOCK_SIZE)
    packed, scales = nbits_weight(weight, stored.weight_scale.detach().numpy(), bits, block_size)
    inputs = [x, graph.constant(f"{name}.weight", packed), graph.constant(f"{name}.weight_scale", scales)]
    inputs += ["", "", *bias] if bias else []  # zero_points and g_idx omitted
    in_features, out_features = weight.shape
    return graph.node(
        "MatMulNBits", inputs, name, domain=MS_DOMAIN, K=in_features, N=out_features, bits=bits,
        block_size=block_size, accuracy_level=ACCURACY_INT8,
    )[0]  # fmt: skip


def nbits_weight(values: np.ndarray, scale: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' layout of a weight: values [in, out] (signed integers) -> packed [out, blocks, bytes per block]
    uint8 and scales [out, blocks] from scale [in / block_size, out] (int4) or [out] (int8, the same for each block).

    MatMulNBits stores unsigned values and subtracts a zero point, 2^(bits - 1) when none is given: a signed value
    v is stored as v + 2^(bits - 1). Four-bit values go two to a byte, the first in the low nibble. in is padded up to
    whole blocks with zeros, stored as the zero point itself."""
    in_features, out_features = values.shape
    blocks = -(-in_features // block_size)
    padded = np.zeros((blocks * block_size, out_features), np.int32)
    padded[:in_features] = values
    stored = (padded + 2 ** (bits - 1)).astype(np.uint8).T.reshape(out_features, blocks, block_size)
    if bits == 4:
        stored = stored[..., 0::2] | (stored[..., 1::2] << 4)
    scales = scale.T if scale.ndim == 2 else np.repeat(scale[:, None], blocks, axis=1)
    return stored, np.ascontiguousarray(scales, np.float32)


def make_model(graph: Graph, config) -> onnx.ModelProto:
    """The graph's inputs and outputs, opsets and the metadata exports/onnx_runtime.py reads."""
    head_dim = config.embedding_size // config.num_heads
    cache = ["batch", config.num_heads, config.block_size, head_dim]  # one buffer holds every position
    cache_type = TensorProto.INT8 if config.kv_cache == "int8" else TensorProto.FLOAT
    kv = [f"{i}.{kind}" for i in range(config.num_layers) for kind in ("key", "value")]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ] + [helper.make_tensor_value_info(f"past_key_values.{name}", cache_type, cache) for name in kv]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", config.vocab_size])]
    outputs += [helper.make_tensor_value_info(f"present.{name}", cache_type, cache) for name in kv]
    onnx_graph = helper.make_graph(graph.nodes, "gpt2_ort", inputs, outputs, graph.initializers)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
    model = helper.make_model(onnx_graph, opset_imports=opsets, producer_name="gpt2 example")
    quantization = {
        "quant_mode": config.quant_mode,
        "layer_quant_modes": config.layer_quant_modes,
        "kv_cache": config.kv_cache,
    }
    helper.set_model_props(model, {"gpt2_quantization": json.dumps(quantization), "gpt2_flavor": FLAVOR})
    return model
