"""GPT-2 in Tripy (`nvtripy`, NVIDIA's Python front end to TensorRT), optionally with quantized weights.

reference.py is this file's PyTorch twin: the same classes in the same order, with the same attribute names, the
same `state_dict()` keys and shapes and the same math, so weight_loader.py fills both and the twin, which runs on any
CPU, checks what this model computes. Where the two must differ, a comment says why.

Quantized layers compute y = x @ dequantize(quantize(W, scale)) + b; the weight is a constant, so TensorRT can
quantize it once, when it builds the engine. tp.Linear does this for int8 (a scale per output channel) and float8
(one scale per tensor, and the input quantized too once its `input_scale` is set), `Int4Linear` below for int4
blocks, `SmoothQuantLinear` for int8 weights and inputs.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import nvtripy as tp
import torch

# The placeholder nvtripy's own modules (tp.Linear, tp.LayerNorm, tp.Embedding) use for a parameter the weight loader
# fills: it records the shape and dtype `load_state_dict` checks, and a module refuses to run while one is unset.
from nvtripy.frontend.module.parameter import DefaultParameter

from config import INT4_BLOCK_SIZE, GPTConfig, check_quant_mode, layer_quant_mode
from measure.sampling import sample_next_token


def gelu_tanh(x: tp.Tensor) -> tp.Tensor:
    """GPT-2's GELU: the tanh approximation (HF's `gelu_new`). tp.gelu is the exact erf form."""
    return 0.5 * x * (1.0 + tp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


class Int4Linear(tp.Module):
    """Block-wise int4 weights with AWQ's per-input-feature pre_quant_scale: y = (x * s) @ QDQ(W) + b.

    nvtripy's block-wise quantize takes a 2-D input [D0, D1] with a scale [D0 / block_size, D1]: its blocks run
    along dim 0. ModelOpt calibrates one scale per output row per `block_size` consecutive input features, so the
    weight is held [in, out], with scale [in / block_size, out], and multiplied without a transpose.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: tp.dtype, block_size: int = INT4_BLOCK_SIZE
    ):
        super().__init__()
        if in_features % block_size != 0:
            raise ValueError(
                f"int4 blocks of {block_size} need in_features divisible by {block_size}, got {in_features}"
            )
        self.dtype = dtype
        self.block_size = block_size
        self.weight = DefaultParameter((in_features, out_features), dtype)
        self.bias = DefaultParameter((out_features,), dtype) if bias else None
        self.weight_scale = DefaultParameter((in_features // block_size, out_features), dtype)
        self.pre_quant_scale = DefaultParameter((in_features,), dtype)

    def forward(self, x: tp.Tensor) -> tp.Tensor:
        quantized = tp.quantize(self.weight, self.weight_scale, tp.int4)
        weight = tp.dequantize(quantized, self.weight_scale, self.dtype)  # [in, out]
        out = (x * self.pre_quant_scale) @ weight
        if self.bias is not None:
            out = out + self.bias
        return out


class SmoothQuantLinear(tp.Module):
    """int8 W8A8 with SmoothQuant's per-input-feature factor: y = QDQ(x * s) @ QDQ(W)^T + b.

    The weight [out, in] is quantized per output channel (scale [out]), the smoothed input per tensor (scale []).
    quantize -> dequantize on both inputs of the matmul is the pattern TensorRT builds an int8 GEMM from. tp.Linear
    cannot hold the factor s, which multiplies the input before it is quantized.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: tp.dtype):
        super().__init__()
        self.dtype = dtype
        self.weight = DefaultParameter((out_features, in_features), dtype)
        self.bias = DefaultParameter((out_features,), dtype) if bias else None
        self.weight_scale = DefaultParameter((out_features,), dtype)
        self.input_scale = DefaultParameter((), dtype)
        self.pre_quant_scale = DefaultParameter((in_features,), dtype)

    def forward(self, x: tp.Tensor) -> tp.Tensor:
        quantized_weight = tp.quantize(self.weight, self.weight_scale, tp.int8, dim=0)
        weight = tp.dequantize(quantized_weight, self.weight_scale, self.dtype, dim=0)  # [out, in]
        quantized_input = tp.quantize(x * self.pre_quant_scale, self.input_scale, tp.int8)
        x = tp.dequantize(quantized_input, self.input_scale, self.dtype)
        out = x @ tp.transpose(weight, 0, 1)
        if self.bias is not None:
            out = out + self.bias
        return out


def linear_layer(
    config: GPTConfig, quant_mode: str | None, in_features: int, out_features: int, bias: bool
) -> tp.Module:
    """A linear layer in `quant_mode`, the layer's own format (`layer_quant_mode`): None or one of QUANT_MODES."""
    dtype = getattr(tp, config.dtype)
    if quant_mode is None:
        return tp.Linear(in_features, out_features, bias=bias, dtype=dtype)
    check_quant_mode(quant_mode)
    if quant_mode == "int8-weight-only":
        return tp.Linear(in_features, out_features, bias, dtype, quant_dtype=tp.int8, weight_quant_dim=0)
    if quant_mode == "int4-weight-only":
        return Int4Linear(in_features, out_features, bias, dtype)
    if quant_mode == "int8-smoothquant":
        return SmoothQuantLinear(in_features, out_features, bias, dtype)
    return tp.Linear(in_features, out_features, bias, dtype, quant_dtype=tp.float8, weight_quant_dim=None)


class CausalSelfAttention(tp.Module):
    def __init__(self, config: GPTConfig, name: str):
        super().__init__()
        self.num_heads = config.num_heads
        self.embedding_size = config.embedding_size
        embd, bias = config.embedding_size, config.bias
        self.c_attn = linear_layer(config, layer_quant_mode(config, f"{name}.c_attn"), embd, 3 * embd, bias)
        self.c_proj = linear_layer(config, layer_quant_mode(config, f"{name}.c_proj"), embd, embd, bias)
        # A quantized KV cache: one scale for all the keys this layer's attention reads, one for all its values.
        self.dtype = getattr(tp, config.dtype)
        self.kv_dtype = {"float8": tp.float8, "int8": tp.int8}.get(config.kv_cache)
        self.k_scale = DefaultParameter((), self.dtype) if config.kv_cache else None
        self.v_scale = DefaultParameter((), self.dtype) if config.kv_cache else None

    def forward(self, x, past_key=None, past_value=None):
        """x [batch, seq, embd]; past_key/past_value [batch, heads, past, head_dim] or None.

        Returns the output [batch, seq, embd] and the keys and values [batch, heads, past + seq, head_dim].
        """
        # While compiling, shapes are DimensionSize tensors whose values are known only at run time; the embedding
        # size comes from the config so that head_dim and the attention scale stay Python numbers.
        batch, seq, _ = x.shape
        embd = self.embedding_size
        head_dim = embd // self.num_heads
        qkv = self.c_attn(x)  # [batch, seq, 3 * embd]
        # NVIDIA's nanoGPT example casts qkv to float32 in int4 and float8 modes under float16 ("better accuracy and
        # avoid TRT compilation error"). Not done here: on the CPU executor it changed the largest logit error against
        # the float32 twin by under 5% of itself (int4 4.25e-3 both ways, float8 7.1e-2 vs 6.9e-2, bundled model),
        # and whether TensorRT 10 still fails to compile without it only a GPU can show: if it does, this is the fix.
        q, k, v = tp.split(qkv, 3, dim=2)  # tp.split takes the number of chunks, torch's split their size
        q = tp.transpose(tp.reshape(q, (batch, seq, self.num_heads, head_dim)), 1, 2)  # [batch, heads, seq, head_dim]
        k = tp.transpose(tp.reshape(k, (batch, seq, self.num_heads, head_dim)), 1, 2)
        v = tp.transpose(tp.reshape(v, (batch, seq, self.num_heads, head_dim)), 1, 2)
        if past_key is not None:
            k = tp.concatenate([past_key, k], dim=2)  # [batch, heads, past + seq, head_dim]
            v = tp.concatenate([past_value, v], dim=2)
        if self.k_scale is not None:
            # Where ModelOpt's k_bmm_quantizer and v_bmm_quantizer are: on all the keys and values attention reads,
            # past and new. A float8 cache would store tp.quantize(k, ...) itself, take the past in float8, quantize
            # only the new keys before the concatenate and dequantize after it: half of float16's memory, the same
            # values. nvtripy 0.1.7 cannot: tp.compile refuses a float8 InputInfo (it makes its tracing inputs with
            # tp.full, which has no float8), so the cache crosses between the two engines in config.dtype, holding
            # the rounded values (rounding them again changes none). A later nvtripy that compiles float8 inputs
            # needs only that change here and compile_model's cache InputInfo in tp.float8. An int8 cache takes the
            # same path: nvtripy 0.1.7's tp.full does make int8, so storing it in int8 may compile, but only a GPU
            # can show it, and both modes keep one path here until one does.
            k = tp.dequantize(tp.quantize(k, self.k_scale, self.kv_dtype), self.k_scale, self.dtype)
            v = tp.dequantize(tp.quantize(v, self.v_scale, self.kv_dtype), self.v_scale, self.dtype)
        past = k.shape[2] - seq

        att = (q @ tp.transpose(k, 2, 3)) * (1.0 / math.sqrt(head_dim))  # [batch, heads, seq, past + seq]
        # Query i sits at position past + i and may look at keys 0 .. past + i. (The twin's tril(..., diagonal=past)
        # cannot be used: tp.tril takes its diagonal as a Python int, and past is known only at run time.)
        query_pos = tp.unsqueeze(tp.arange(past, past + seq, dtype=tp.int32), 1)  # [seq, 1]
        key_pos = tp.unsqueeze(tp.arange(past + seq, dtype=tp.int32), 0)  # [1, past + seq]
        visible = key_pos <= query_pos  # [seq, past + seq]
        att = tp.masked_fill(att, ~visible, float("-inf"))
        att = tp.softmax(att, dim=-1)
        y = att @ v  # [batch, heads, seq, head_dim]
        y = tp.reshape(tp.transpose(y, 1, 2), (batch, seq, embd))
        return self.c_proj(y), k, v


class MLP(tp.Module):
    def __init__(self, config: GPTConfig, name: str):
        super().__init__()
        embd, bias = config.embedding_size, config.bias
        self.c_fc = linear_layer(config, layer_quant_mode(config, f"{name}.c_fc"), embd, 4 * embd, bias)
        self.c_proj = linear_layer(config, layer_quant_mode(config, f"{name}.c_proj"), 4 * embd, embd, bias)

    def forward(self, x):
        return self.c_proj(gelu_tanh(self.c_fc(x)))


class Block(tp.Module):
    def __init__(self, config: GPTConfig, name: str):
        """name: the block's path in the model, "transformer.h.<index>", which names its layers' formats."""
        super().__init__()
        dtype = getattr(tp, config.dtype)
        self.ln_1 = tp.LayerNorm(config.embedding_size, dtype=dtype, eps=1e-5)
        self.attn = CausalSelfAttention(config, f"{name}.attn")
        self.ln_2 = tp.LayerNorm(config.embedding_size, dtype=dtype, eps=1e-5)
        self.mlp = MLP(config, f"{name}.mlp")

    def forward(self, x, past_key=None, past_value=None):
        attn_out, key, value = self.attn(self.ln_1(x), past_key, past_value)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x))
        return x, key, value


class Transformer(tp.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        dtype = getattr(tp, config.dtype)
        self.wte = tp.Embedding(config.vocab_size, config.embedding_size, dtype=dtype)
        self.wpe = tp.Embedding(config.block_size, config.embedding_size, dtype=dtype)
        # A tp.Module finds modules in lists.
        self.h = [Block(config, f"transformer.h.{i}") for i in range(config.num_layers)]
        self.ln_f = tp.LayerNorm(config.embedding_size, dtype=dtype, eps=1e-5)


class GPT(tp.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        lm_head_mode = layer_quant_mode(config, "lm_head")  # float8 quantizes lm_head, which has no bias
        self.lm_head = linear_layer(config, lm_head_mode, config.embedding_size, config.vocab_size, bias=False)

    def forward_with_cache(self, idx, past_keys=None, past_values=None):
        """Runs `idx` [batch, seq] after a past already seen, whose keys and values are given.

        past_keys/past_values: [layers, batch, heads, past, head_dim], or None when there is no past.
        Returns the logits of the last position only, [batch, 1, vocab] (the next token is all generation needs,
        and lm_head is the largest matmul), and the keys and values of past + seq, to pass to the next call.
        """
        x, keys, values = self.hidden_states(idx, past_keys, past_values)
        logits = self.lm_head(x[:, -1:, :])  # [batch, 1, vocab]
        return logits, keys, values

    def hidden_states(self, idx, past_keys=None, past_values=None):
        """The final LayerNorm's output [batch, seq, embd], and the keys and values of past + seq."""
        past = 0 if past_keys is None else past_keys.shape[3]
        seq = idx.shape[1]
        pos = tp.arange(past, past + seq, dtype=tp.int32)  # [seq]
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # [batch, seq, embd]
        keys, values = [], []
        for i, block in enumerate(self.transformer.h):
            past_key = None if past_keys is None else past_keys[i]
            past_value = None if past_values is None else past_values[i]
            x, key, value = block(x, past_key, past_value)
            keys.append(key)
            values.append(value)
        return self.transformer.ln_f(x), tp.stack(keys), tp.stack(values)


@dataclass
class CompiledGPT:
    """GPT.forward_with_cache compiled by TensorRT, once for each of the two shapes generation runs it in."""

    config: GPTConfig
    prefill: tp.Executable  # (idx [batch, 1..seq_len]) -> logits, keys, values
    decode: tp.Executable  # (idx [batch, 1], past_keys, past_values [layers, batch, heads, 1..seq_len-1, head_dim])


def compile_model(model: GPT, config: GPTConfig) -> CompiledGPT:
    """Compiles `model`, its weights loaded, for batches of config.batch_size and up to config.seq_len tokens.

    One executable takes the prompt, of any length from 1 to seq_len, with no past; the other takes one new token
    after a past of 1 to seq_len - 1 tokens. Each is compiled once: a dimension given as (min, opt, max) is dynamic,
    and TensorRT tunes its kernels for `opt`. The past is never empty, so no dimension ever needs to be zero.
    """
    if not 2 <= config.seq_len <= config.block_size:
        raise ValueError(
            f"seq_len must be between 2 (a prompt token and a new one) and block_size ({config.block_size}), "
            f"got {config.seq_len}"
        )
    unset = [name for name, value in model.state_dict().items() if isinstance(value, DefaultParameter)]
    if unset:
        raise ValueError(f"Load the weights before compiling; not loaded: {', '.join(unset)}")
    dtype = getattr(tp, config.dtype)
    batch = config.batch_size
    head_dim = config.embedding_size // config.num_heads
    seq = (1, config.seq_len // 2, config.seq_len)  # (min, opt, max)
    prefill = tp.compile(model.forward_with_cache, args=[tp.InputInfo((batch, seq), dtype=tp.int32)])

    # The keys and values share their past length: naming the dimension tells TensorRT they are equal.
    past = tp.NamedDimension("past", 1, config.seq_len // 2, config.seq_len - 1)
    cache = tp.InputInfo((config.num_layers, batch, config.num_heads, past, head_dim), dtype=dtype)
    decode = tp.compile(model.forward_with_cache, args=[tp.InputInfo((batch, 1), dtype=tp.int32), cache, cache])
    return CompiledGPT(config, prefill, decode)


def run(executable: tp.Executable, *inputs: tp.Tensor) -> tuple[torch.Tensor, tp.Tensor, tp.Tensor]:
    """Runs a compiled forward_with_cache: the last position's logits [batch, 1, vocab] as a CPU torch tensor, and
    the keys and values, left in GPU memory for the next call."""
    logits, keys, values = executable(*inputs)
    executable.stream.synchronize()  # executables run asynchronously, on Tripy's own CUDA stream
    return torch.from_dlpack(logits).cpu(), keys, values


def gpu_tokens(idx: torch.Tensor) -> tp.Tensor:
    """Token ids [batch, seq] as the int32 tensor in GPU memory that the executables take."""
    return tp.Tensor(idx.tolist(), device=tp.device("gpu"))  # Python ints become int32


def generate(
    compiled: CompiledGPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Extends idx [batch, seq] by max_new_tokens sampled tokens; returns [batch, seq + max_new_tokens].

    The prompt runs once, through the prefill executable; every later step feeds only the newest token through the
    decode executable, with the keys and values of the past. Sampling is the twin's, `sampling.sample_next_token`, on
    the CPU, so the same seed makes the same choices from the same logits. `on_token` is called with each new token
    [batch, 1] as soon as it is sampled (for streaming).
    """
    config = compiled.config
    batch, prompt_len = idx.shape
    if batch != config.batch_size:
        raise ValueError(f"idx has batch size {batch}, but the model was compiled for {config.batch_size}")
    if prompt_len < 1 or prompt_len + max_new_tokens > config.seq_len:
        raise ValueError(
            f"the prompt ({prompt_len} tokens, at least 1) plus max_new_tokens ({max_new_tokens}) must fit in the "
            f"seq_len ({config.seq_len}) the model was compiled for"
        )
    keys = values = None
    new_tokens = idx
    for _ in range(max_new_tokens):
        if keys is None:
            logits, keys, values = run(compiled.prefill, gpu_tokens(new_tokens))
        else:
            logits, keys, values = run(compiled.decode, gpu_tokens(new_tokens), keys, values)
        next_token = sample_next_token(logits[:, -1, :], temperature, top_k, generator)
        idx = torch.cat([idx, next_token], dim=1)
        new_tokens = next_token
        if on_token is not None:
            on_token(next_token)
    return idx
