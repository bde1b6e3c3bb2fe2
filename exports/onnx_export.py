"""Exports the PyTorch twin as an ONNX file with explicit quantization: weights stored quantized, Q/DQ in the graph.

The file is TensorRT's other front door (`trtexec --onnx`) and what ONNX Runtime runs on any CPU with quantized
kernels. Each quantized block linear's weight is an INT8, INT4 or FLOAT8E4M3FN initializer read by a standard
`DequantizeLinear` that feeds its `MatMul` directly, the pattern both TensorRT and ONNX Runtime look for:

    int8-weight-only   DQ(weight int8 [in, out], scale [out], axis=1)                    per output channel
    int4-weight-only   x * pre_quant_scale, DQ(weight int4 [in, out], scale [in/128, out], axis=0, block_size=128)
    float8             DQ(Q(x, input_scale)) on the input, DQ(weight float8 [in, out], scale [])  per tensor
    int8-smoothquant   DQ(Q(x * pre_quant_scale, input_scale)) on the input (int8, per tensor),
                       DQ(weight int8 [in, out], scale [out], axis=1)                    per output channel

How: `torch.onnx.export(dynamo=True)` traces a forward written over the twin's own parameters, in which each
quantized weight goes through a `torch.library.custom_op` whose eager code is the twin's arithmetic and whose
onnxscript translation is the standard ONNX operator. ONNX has INT4 but torch cannot hold it: int4 weights are traced
as int8 and retyped to INT4 afterwards (ml_dtypes.int4). One graph serves the prompt and every cached step, in the
names optimum and onnxruntime-genai use: inputs input_ids, attention_mask, position_ids, past_key_values.N.key/.value;
outputs logits, present.N.key/.value. lm_head, when unquantized, is GPT-2's tied wte: one copy in the file.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import ml_dtypes
import onnx
import torch
from onnxscript import opset21 as op
from torch import nn
from tqdm import tqdm

from config import INT4_BLOCK_SIZE
from reference import GPT, Int4Linear, QuantLinear, SmoothQuantLinear

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel

OPSET = 21  # the first with INT4 and blocked DequantizeLinear
MODEL_FILE = "model.onnx"
MAX_FILE_BYTES = 2**31 - 2**26  # protobuf's 2 GB limit on one message, less room for the graph itself
FLOAT8_MAX = 448.0


# --- the quantized weights as custom ops: the twin's arithmetic in PyTorch, standard operators in ONNX -------------


@torch.library.custom_op("gpt2_onnx::dequantize_per_channel", mutates_args=())
def dequantize_per_channel(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 [in, out] * scale [out] -> float [in, out]."""
    return weight.to(scale.dtype) * scale


@torch.library.custom_op("gpt2_onnx::dequantize_blocks", mutates_args=())
def dequantize_blocks(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int4 values held as int8 [in, out] * scale [in / 128, out], each scale row repeated for its 128 rows."""
    return weight.to(scale.dtype) * scale.repeat_interleave(INT4_BLOCK_SIZE, dim=0)


@torch.library.custom_op("gpt2_onnx::dequantize_per_tensor", mutates_args=())
def dequantize_per_tensor(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8 [in, out] * scale [] -> float [in, out]."""
    return weight.to(scale.dtype) * scale


@torch.library.custom_op("gpt2_onnx::quantize_dequantize_float8", mutates_args=())
def quantize_dequantize_float8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """An activation through float8 and back, saturating at +-448: the twin's quantize_dequantize."""
    return (x / scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale


@torch.library.custom_op("gpt2_onnx::quantize_dequantize_int8", mutates_args=())
def quantize_dequantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """An activation through int8 and back, rounding half to even and saturating: the twin's quantize_dequantize."""
    return torch.round(x / scale).clamp(-128, 127) * scale


CUSTOM_OPS = (
    dequantize_per_channel,
    dequantize_blocks,
    dequantize_per_tensor,
    quantize_dequantize_float8,
    quantize_dequantize_int8,
)
for custom_op in CUSTOM_OPS:
    custom_op.register_fake(lambda first, scale: torch.empty_like(first, dtype=scale.dtype))


# Plain functions, traced by the exporter into the graph itself: as onnxscript functions they would be ONNX functions,
# which the exporter's step from its own opset (18) up to OPSET cannot inline.
def _onnx_dequantize_per_channel(weight, scale):
    return op.DequantizeLinear(weight, scale, axis=1)


def _onnx_dequantize_blocks(weight, scale):
    return op.DequantizeLinear(weight, scale, axis=0, block_size=INT4_BLOCK_SIZE)


def _onnx_dequantize_per_tensor(weight, scale):
    return op.DequantizeLinear(weight, scale)


def _onnx_quantize_dequantize_float8(x, scale):
    zero_point = op.Cast(op.Constant(value_float=0.0), to=onnx.TensorProto.FLOAT8E4M3FN)
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point, saturate=1), scale)


def _onnx_quantize_dequantize_int8(x, scale):
    zero_point = op.Cast(op.Constant(value_int=0), to=onnx.TensorProto.INT8)  # int8 output; saturates by definition
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale)


TRANSLATIONS = {
    torch.ops.gpt2_onnx.dequantize_per_channel.default: _onnx_dequantize_per_channel,
    torch.ops.gpt2_onnx.dequantize_blocks.default: _onnx_dequantize_blocks,
    torch.ops.gpt2_onnx.dequantize_per_tensor.default: _onnx_dequantize_per_tensor,
    torch.ops.gpt2_onnx.quantize_dequantize_float8.default: _onnx_quantize_dequantize_float8,
    torch.ops.gpt2_onnx.quantize_dequantize_int8.default: _onnx_quantize_dequantize_int8,
}


# --- the exported model: the twin's forward, written for one graph with a cache of any length --------------------


class StoredLinear(nn.Module):
    """A twin linear layer as the ONNX file stores it: weight [in, out] in its quantized type, dequantized by the
    custom ops above right before its matmul (the pattern TensorRT and ONNX Runtime fuse)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        weight = layer.weight.detach()
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.pre_quant_scale = self.input_scale = self.quantize_input = None
        if isinstance(layer, Int4Linear):  # weight [in, out], scale [in / 128, out]
            scale = layer.weight_scale.detach()
            blocks = scale.repeat_interleave(layer.block_size, dim=0)  # [in, out]
            self.weight = nn.Parameter(torch.round(weight / blocks).clamp(-8, 7).to(torch.int8), requires_grad=False)
            self.weight_scale = nn.Parameter(scale.clone(), requires_grad=False)
            self.pre_quant_scale = pre_quant_scale_or_none(layer.pre_quant_scale)
            self.dequantize = dequantize_blocks
        elif isinstance(layer, SmoothQuantLinear) or (
            isinstance(layer, QuantLinear) and layer.quant_dtype == torch.int8
        ):
            scale = layer.weight_scale.detach()  # weight [out, in], scale [out]
            quantized = torch.round(weight / scale.unsqueeze(1)).clamp(-128, 127).to(torch.int8)
            self.weight = nn.Parameter(quantized.t().contiguous(), requires_grad=False)  # [in, out]
            self.weight_scale = nn.Parameter(scale.clone(), requires_grad=False)
            self.dequantize = dequantize_per_channel
            if isinstance(layer, SmoothQuantLinear):
                self.pre_quant_scale = pre_quant_scale_or_none(layer.pre_quant_scale)
                self.input_scale = nn.Parameter(layer.input_scale.detach().clone(), requires_grad=False)
                self.quantize_input = quantize_dequantize_int8
        elif isinstance(layer, QuantLinear) and layer.quant_dtype == torch.float8_e4m3fn:  # scale []
            scale = layer.weight_scale.detach()
            quantized = (weight / scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(torch.float8_e4m3fn)
            self.weight = nn.Parameter(quantized.t().contiguous(), requires_grad=False)  # [in, out]
            self.weight_scale = nn.Parameter(scale.clone(), requires_grad=False)
            self.input_scale = nn.Parameter(layer.input_scale.detach().clone(), requires_grad=False)
            self.quantize_input = quantize_dequantize_float8
            self.dequantize = dequantize_per_tensor
        elif isinstance(layer, nn.Linear):
            self.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)  # [in, out]
            self.dequantize = None
        else:
            raise TypeError(f"no ONNX form for a {type(layer).__name__}")

    def take_awq_scale(self) -> torch.Tensor | None:
        """AWQ's pre_quant_scale [in], removed from the layer for the caller to fold elsewhere; None for a layer that
        has none, or SmoothQuant's factor: it comes before a rounding to int8 that a fold could move."""
        scale = self.pre_quant_scale
        if scale is None or self.quantize_input is not None:
            return None
        self.pre_quant_scale = None
        return scale.detach()

    def scales_output_columns(self) -> bool:
        """Whether each output column has a scale of its own (or no scale at all) for a fold to multiply."""
        return self.dequantize in (None, dequantize_per_channel, dequantize_blocks)

    def scale_output_columns(self, columns: slice, factor: torch.Tensor) -> None:
        """Multiplies the outputs in `columns` by factor [len(columns)]: their scales (or float weights) and bias.
        The stored integers stay as they are."""
        with torch.no_grad():
            target = self.weight if self.dequantize is None else self.weight_scale
            target[..., columns] *= factor  # [in, out], [in / 128, out] or [out]
            if self.bias is not None:
                self.bias[columns] *= factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale  # AWQ's or SmoothQuant's factor: the input features scaled before the matmul
        if self.quantize_input is not None:
            x = self.quantize_input(x, self.input_scale)
        weight = self.weight if self.dequantize is None else self.dequantize(self.weight, self.weight_scale)
        out = x @ weight  # [..., out]
        return out if self.bias is None else out + self.bias


def pre_quant_scale_or_none(pre_quant_scale: torch.Tensor) -> nn.Parameter | None:
    """The factor as the file's parameter, or None where it is all ones (x * 1 is x: no Mul in the graph)."""
    if torch.all(pre_quant_scale == 1):
        return None
    return nn.Parameter(pre_quant_scale.detach().clone(), requires_grad=False)


def stored_block(block: nn.Module) -> tuple[nn.LayerNorm, nn.LayerNorm, dict[str, StoredLinear]]:
    """A twin block's LayerNorms and linear layers as the files store them, AWQ's pre_quant_scale folded wherever
    that is exact, so that the graph multiplies by it only before mlp.c_proj (after the GELU no fold is exact):
    c_attn's into ln_1's weight and bias (LayerNorm(x) * s is a LayerNorm with weight * s and bias * s), c_fc's
    into ln_2's, and attn.c_proj's into the value columns of c_attn (attention mixes positions, not features:
    (P @ V) * s = P @ (V * s)), whose per-column scales and bias take it while the stored integers stay the same."""
    ln_1, ln_2 = copy.deepcopy(block.ln_1), copy.deepcopy(block.ln_2)
    linears = {
        "attn.c_attn": StoredLinear(block.attn.c_attn),
        "attn.c_proj": StoredLinear(block.attn.c_proj),
        "mlp.c_fc": StoredLinear(block.mlp.c_fc),
        "mlp.c_proj": StoredLinear(block.mlp.c_proj),
    }
    with torch.no_grad():
        for norm, name in ((ln_1, "attn.c_attn"), (ln_2, "mlp.c_fc")):
            scale = linears[name].take_awq_scale()
            if scale is not None:
                norm.weight *= scale
                norm.bias *= scale
    c_attn = linears["attn.c_attn"]
    if c_attn.scales_output_columns():
        scale = linears["attn.c_proj"].take_awq_scale()
        if scale is not None:
            embd = scale.shape[0]
            c_attn.scale_output_columns(slice(2 * embd, 3 * embd), scale)  # [q | k | v]: the values' columns
    return ln_1, ln_2, linears


class ExportBlock(nn.Module):
    def __init__(self, block: nn.Module, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.ln_1, self.ln_2, linears = stored_block(block)
        # ModuleDicts keep the twin's (and Hugging Face's) names in the file: transformer.h.0.attn.c_attn.weight
        self.attn = nn.ModuleDict({"c_attn": linears["attn.c_attn"], "c_proj": linears["attn.c_proj"]})
        self.mlp = nn.ModuleDict({"c_fc": linears["mlp.c_fc"], "c_proj": linears["mlp.c_proj"]})

    def forward(self, x, past_key, past_value, hidden_mask):
        """x [batch, seq, embd]; past_key/past_value [batch, heads, past, head_dim]; hidden_mask [batch, 1, seq,
        past + seq], True where a query may not look. Returns x and the keys and values of past + seq."""
        batch, seq, embd = x.shape
        head_dim = embd // self.num_heads
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(embd, dim=2)  # [batch, seq, embd] each
        q = q.reshape(batch, seq, self.num_heads, head_dim).transpose(1, 2)  # [batch, heads, seq, head_dim]
        k = k.reshape(batch, seq, self.num_heads, head_dim).transpose(1, 2)
        v = v.reshape(batch, seq, self.num_heads, head_dim).transpose(1, 2)
        k = torch.cat([past_key, k], dim=2)  # [batch, heads, past + seq, head_dim]
        v = torch.cat([past_value, v], dim=2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))  # [batch, heads, seq, past + seq]
        # The lowest float, not -inf: a padding query that sees nothing gets a uniform row instead of NaN, and
        # exp(lowest - max) is 0 exactly, as exp(-inf) is, for every other row.
        att = att.masked_fill(hidden_mask, torch.finfo(att.dtype).min)
        y = torch.softmax(att, dim=-1) @ v  # [batch, heads, seq, head_dim]
        x = x + self.attn.c_proj(y.transpose(1, 2).reshape(batch, seq, embd))
        x = x + self.mlp.c_proj(gelu_tanh_fusable(self.mlp.c_fc(self.ln_2(x))))
        return x, k, v


def gelu_tanh_fusable(x: torch.Tensor) -> torch.Tensor:
    """reference.gelu_tanh in the form ONNX Runtime fuses into one FastGelu kernel (x cubed as a Pow, the half taken
    of x first): the same function, 8 nodes fewer per layer."""
    return (0.5 * x) * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


class ExportGPT(nn.Module):
    """The twin's forward_with_cache as one graph for the prompt and every cached step, in optimum's layout:
    positions and a padding mask come in, the logits of every position go out."""

    def __init__(self, twin: GPT):
        super().__init__()
        wte = twin.transformer.wte
        blocks = nn.ModuleList([ExportBlock(block, twin.config.num_heads) for block in twin.transformer.h])
        self.transformer = nn.ModuleDict(
            {"wte": wte, "wpe": twin.transformer.wpe, "h": blocks, "ln_f": twin.transformer.ln_f}
        )
        lm_head = twin.lm_head
        tied = isinstance(lm_head, nn.Linear) and torch.equal(lm_head.weight, wte.weight)
        self.lm_head = None if tied else StoredLinear(lm_head)

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        """input_ids, position_ids [batch, seq]; attention_mask [batch, past + seq] (1 = a real token, 0 = padding);
        past_key_values: per layer a key and a value [batch, heads, past, head_dim], past 0 for the prompt.
        Returns logits [batch, seq, vocab] and per layer the key and value [batch, heads, past + seq, head_dim]."""
        seq, past = input_ids.shape[1], past_key_values[0].shape[2]
        transformer = self.transformer
        x = transformer.wte(input_ids) + transformer.wpe(position_ids)  # [batch, seq, embd]
        # Query i sits at position past + i and may look at keys 0 .. past + i that are not padding.
        key_index = torch.arange(past + seq, device=input_ids.device)
        query_index = torch.arange(seq, device=input_ids.device) + past
        future = key_index[None, :] > query_index[:, None]  # [seq, past + seq]
        hidden_mask = future[None, None] | (attention_mask[:, None, None, :] == 0)  # [batch, 1, seq, past + seq]
        presents = []
        for i, block in enumerate(transformer.h):
            x, key, value = block(x, past_key_values[2 * i], past_key_values[2 * i + 1], hidden_mask)
            presents += [key, value]
        x = transformer.ln_f(x)
        logits = x @ transformer.wte.weight.t() if self.lm_head is None else self.lm_head(x)  # [batch, seq, vocab]
        return logits, *presents


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """The input and output names, in the layout of optimum and onnxruntime-genai."""
    kv = [f"{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{name}" for name in kv]
    return inputs, ["logits"] + [f"present.{name}" for name in kv]


def export_onnx(twin: GPT, out_dir: str) -> str:
    """Writes `twin` (float32, any mode or AutoQuantize mix) to out_dir/model.onnx with its weights stored quantized,
    next to config.json, generation_config.json and GPT-2's tokenizer files. Returns the one-line summary."""
    check_twin(twin, "export_onnx")
    os.makedirs(out_dir, exist_ok=True)
    # Closed however the export ends: a message after it (a full disk, SIGTERM) starts on a line of its own.
    with tqdm(total=3, desc="ONNX export", unit="step", file=sys.stderr) as steps:
        steps.set_postfix_str("tracing")
        model = onnx_model(twin)
        check_size(model)
        steps.update()
        steps.set_postfix_str("checking")
        onnx.checker.check_model(model, full_check=True)
        steps.update()
        steps.set_postfix_str("saving")
        written = save_folder(model, twin.config, out_dir)
        steps.update()
    return written


def check_twin(twin: GPT, writer: str, kv_caches: tuple[str | None, ...] = (None,)) -> None:
    """Raises ValueError, naming `writer`, for a twin that no ONNX file here holds (this one or onnx_fused.py's):
    not float32, or with a KV cache other than `kv_caches` (None: float32)."""
    if twin.transformer.wte.weight.dtype != torch.float32:
        raise ValueError(f"{writer} takes a float32 twin, got {twin.transformer.wte.weight.dtype}")
    kv_cache = twin.config.kv_cache
    if kv_cache not in kv_caches:
        held = " or ".join(mode or "float32" for mode in kv_caches)
        raise ValueError(f"{writer} writes a {held} KV cache: a twin with a {kv_cache} one is not exported")


def check_size(model: onnx.ModelProto) -> None:
    """Raises ValueError for weights beyond what one protobuf file holds."""
    stored_bytes = sum(len(initializer.raw_data) for initializer in model.graph.initializer)
    if stored_bytes >= MAX_FILE_BYTES:
        raise ValueError(
            f"the ONNX file would hold {stored_bytes / 1e9:.1f} GB of weights; a single file holds under 2 GB: "
            "quantize the model (int4 or int8) or export a smaller one"
        )


def save_folder(model: onnx.ModelProto, config, out_dir: str) -> str:
    """out_dir/model.onnx and the Hugging Face files beside it (write_hf_files); returns the one-line summary."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MODEL_FILE)
    onnx.save_model(model, path)
    write_hf_files(config, out_dir)
    return summary(model, path)


def export_step(
    model_type: str,
    hf_model: GPT2LMHeadModel | None,
    quant_mode: str | None,
    layer_quant_modes: dict[str, str | None] | None,
    out_dir: str,
    overwrite: bool = False,
    write: Callable[[GPT, str], str] = export_onnx,
) -> None:
    """example.py --export-onnx: the model it loaded (a Hugging Face GPT-2, calibrated or restored in `quant_mode`,
    or with hf_model None the exports/checkpoint.py checkpoint `model_type`) into a float32 twin, written to out_dir
    by `write`: export_onnx (the default) or exports/onnx_fused.py's export_fused_onnx, which holds an int8 KV cache."""
    from cli import UsageError
    from cli.example_args import onnx_kv_cache_refusal
    from cli.outputs import output_folder
    from measure.twin import load_export_twin, load_twin
    from quant.kv_cache import kv_cache_in

    kv_cache = kv_cache_in(model_type, hf_model)
    # Restored or exported with one (--kv-cache itself is refused before calibrating where the writer has no room).
    if kv_cache is not None and (write is export_onnx or kv_cache != "int8"):
        raise onnx_kv_cache_refusal(model_type, kv_cache)
    if hf_model is None:
        twin = load_export_twin(model_type)
    else:
        quantized = hf_model if quant_mode else None
        twin = load_twin(hf_model, quant_mode, quantized, layer_quant_modes, kv_cache)
    try:
        # Written into a new folder that becomes out_dir whole, and only if no other run's is there by then.
        with output_folder(out_dir, "--export-onnx", overwrite) as folder:
            written = write(twin, folder)
    except ValueError as error:  # a model too large for one file, or in a format the writer does not hold
        raise UsageError(f"--export-onnx: {error}") from None
    print(written.replace(folder, out_dir))  # the summary names the file where it now is


def onnx_model(twin: GPT) -> onnx.ModelProto:
    """The traced graph, int4 weights retyped to INT4, the twin's quantization recorded in metadata_props."""
    config = twin.config
    batch, seq, past = 2, 3, 5  # any sizes above 1: torch.export specializes on 0 and 1
    head_dim = config.embedding_size // config.num_heads
    past_kv = [torch.zeros(batch, config.num_heads, past, head_dim) for _ in range(2 * config.num_layers)]
    example = (
        torch.zeros(batch, seq, dtype=torch.long),
        torch.ones(batch, past + seq, dtype=torch.long),
        torch.arange(past, past + seq).expand(batch, seq),
        past_kv,
    )
    dynamic = torch.export.Dim.DYNAMIC
    dynamic_shapes = (
        {0: dynamic, 1: dynamic},
        {0: dynamic, 1: dynamic},
        {0: dynamic, 1: dynamic},
        [{0: dynamic, 2: dynamic}] * len(past_kv),
    )
    input_names, output_names = io_names(config.num_layers)
    # The exporter's notes on torchvision's ops (not installed, not used) and torch.export's own deprecations.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        program = torch.onnx.export(
            ExportGPT(twin).eval(),
            example,
            dynamo=True,
            opset_version=OPSET,
            custom_translation_table=TRANSLATIONS,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
        )
    model = program.model_proto
    retype_int4_weights(model)
    quantization = {"quant_mode": config.quant_mode, "layer_quant_modes": config.layer_quant_modes}
    onnx.helper.set_model_props(model, {"gpt2_quantization": json.dumps(quantization)})
    return model


def retype_int4_weights(model: onnx.ModelProto) -> None:
    """Stores the weights of blocked DequantizeLinear nodes (traced as int8 holding -8..7) as ONNX INT4."""
    blocked = {
        node.input[0]
        for node in model.graph.node
        if node.op_type == "DequantizeLinear" and _attribute(node, "block_size")
    }
    for index, initializer in enumerate(model.graph.initializer):
        if initializer.name in blocked:
            values = onnx.numpy_helper.to_array(initializer)
            int4 = onnx.numpy_helper.from_array(values.astype(ml_dtypes.int4), initializer.name)
            model.graph.initializer[index].CopyFrom(int4)
    stale = [info for info in model.graph.value_info if info.name in blocked]  # the traced int8 types
    for info in stale:
        model.graph.value_info.remove(info)


def _attribute(node: onnx.NodeProto, name: str):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def write_hf_files(config, out_dir: str) -> None:
    """config.json and generation_config.json as Hugging Face writes them for gpt2, and GPT-2's tokenizer files."""
    from transformers import GenerationConfig, GPT2Config

    from sources.tokenizer import END_OF_TEXT, gpt2_tokenizer

    hf_config = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.embedding_size,
        n_layer=config.num_layers,
        n_head=config.num_heads,
        architectures=["GPT2LMHeadModel"],
    )
    hf_config.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=END_OF_TEXT, eos_token_id=END_OF_TEXT).save_pretrained(out_dir)
    gpt2_tokenizer().save_pretrained(out_dir)


def summary(model: onnx.ModelProto, path: str) -> str:
    """One line: the file's size, its weights' bytes by stored type, and what its graph is made of."""
    stored = Counter()
    for initializer in model.graph.initializer:
        stored[onnx.TensorProto.DataType.Name(initializer.data_type)] += len(initializer.raw_data)
    weights = ", ".join(f"{name} {size / 1e6:.1f}" for name, size in stored.most_common())
    ops = ", ".join(
        f"{count} {name}" for name, count in Counter(node.op_type for node in model.graph.node).most_common()
    )
    return f"Wrote {path}: {os.path.getsize(path) / 1e6:.1f} MB (MB by stored type: {weights}); nodes: {ops}"
