"""The PyTorch twin of model.py: the same GPT-2, parameter for parameter and op for op, runnable on any CPU.

Every class here has a namesake in model.py with the same parameter names, shapes and math, so one weight loader
fills both, and what is proven here about the exported weights and scales holds for the Tripy model. Quantized
layers reproduce TensorRT's quantize/dequantize: divide by the scale, round half to even, clamp to the integer
range (FP8 E4M3: saturate at +-448), multiply back.
"""

import math
from collections.abc import Callable

import torch
from torch import nn

from config import INT4_BLOCK_SIZE, GPTConfig, check_quant_mode, layer_quant_mode
from measure.sampling import sample_next_token


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU: the tanh approximation (HF's `gelu_new`), not the exact erf form."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, quant_dtype: torch.dtype) -> torch.Tensor:
    """TensorRT's quantize followed by dequantize. `scale` broadcasts against `x`."""
    scaled = x / scale
    if quant_dtype == torch.float8_e4m3fn:
        max_value = torch.finfo(torch.float8_e4m3fn).max  # 448
        quantized = scaled.clamp(-max_value, max_value).to(torch.float8_e4m3fn).to(x.dtype)
    else:
        low, high = {torch.int8: (-128, 127), torch.int4: (-8, 7)}[quant_dtype]
        quantized = torch.round(scaled).clamp(low, high)  # torch.round rounds half to even
    return quantized * scale


class QuantLinear(nn.Module):
    """Twin of `tp.Linear(..., quant_dtype=..., weight_quant_dim=...)`: weight [out, in], y = x @ W^T + b.

    The weight is quantized per output channel (`weight_quant_dim=0`, scale [out]) or per tensor (scale []).
    When `quantize_input` is set, the input is quantized per tensor too: tp.Linear does so once its optional
    `input_scale` is assigned.
    """

    def __init__(self, in_features, out_features, bias, dtype, quant_dtype, weight_quant_dim, quantize_input):
        super().__init__()
        self.quant_dtype = quant_dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        scale_shape = (out_features,) if weight_quant_dim == 0 else ()
        self.weight_scale = nn.Parameter(torch.empty(scale_shape, dtype=dtype))
        self.input_scale = nn.Parameter(torch.empty((), dtype=dtype)) if quantize_input else None
        # The weight's compute form, made once after loading (TensorRT folds it into the engine the same way).
        self.register_buffer("dequantized_weight", None, persistent=False)
        self.register_load_state_dict_post_hook(QuantLinear._dequantize_weight)

    def _dequantize_weight(self, incompatible_keys=None) -> None:
        scale = self.weight_scale.unsqueeze(1) if self.weight_scale.dim() == 1 else self.weight_scale  # [out, 1]
        self.dequantized_weight = quantize_dequantize(self.weight.detach(), scale.detach(), self.quant_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = quantize_dequantize(x, self.input_scale, self.quant_dtype)
        out = x @ self.dequantized_weight.transpose(1, 0)
        if self.bias is not None:
            out = out + self.bias
        return out


class Int4Linear(nn.Module):
    """Block-wise int4 weights with AWQ's per-input-feature pre_quant_scale: y = (x * s) @ QDQ(W) + b.

    The weight is held [in, out] with scale [in / block_size, out], because Tripy quantizes blocks along dim 0
    and ModelOpt calibrates one scale per output row per `block_size` consecutive input features.
    """

    def __init__(self, in_features, out_features, bias, dtype, block_size=INT4_BLOCK_SIZE):
        super().__init__()
        if in_features % block_size != 0:
            raise ValueError(
                f"int4 blocks of {block_size} need in_features divisible by {block_size}, got {in_features}"
            )
        self.block_size = block_size
        self.weight = nn.Parameter(torch.empty(in_features, out_features, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        self.weight_scale = nn.Parameter(torch.empty(in_features // block_size, out_features, dtype=dtype))
        self.pre_quant_scale = nn.Parameter(torch.empty(in_features, dtype=dtype))
        self.register_buffer("dequantized_weight", None, persistent=False)
        self.register_load_state_dict_post_hook(Int4Linear._dequantize_weight)

    def _dequantize_weight(self, incompatible_keys=None) -> None:
        scale = self.weight_scale.detach().repeat_interleave(self.block_size, dim=0)  # [in, out]
        self.dequantized_weight = quantize_dequantize(self.weight.detach(), scale, torch.int4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = (x * self.pre_quant_scale) @ self.dequantized_weight
        if self.bias is not None:
            out = out + self.bias
        return out


class SmoothQuantLinear(nn.Module):
    """int8 W8A8 with SmoothQuant's per-input-feature factor: y = QDQ(x * s) @ QDQ(W)^T + b.

    The weight [out, in] is quantized per output channel (scale [out]), the smoothed input per tensor (scale []).
    """

    def __init__(self, in_features, out_features, bias, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=dtype))
        self.input_scale = nn.Parameter(torch.empty((), dtype=dtype))
        self.pre_quant_scale = nn.Parameter(torch.empty(in_features, dtype=dtype))
        self.register_buffer("dequantized_weight", None, persistent=False)
        self.register_load_state_dict_post_hook(SmoothQuantLinear._dequantize_weight)

    def _dequantize_weight(self, incompatible_keys=None) -> None:
        scale = self.weight_scale.detach().unsqueeze(1)  # [out, 1]
        self.dequantized_weight = quantize_dequantize(self.weight.detach(), scale, torch.int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = quantize_dequantize(x * self.pre_quant_scale, self.input_scale, torch.int8)
        out = x @ self.dequantized_weight.transpose(1, 0)
        if self.bias is not None:
            out = out + self.bias
        return out


def linear_layer(
    config: GPTConfig, quant_mode: str | None, in_features: int, out_features: int, bias: bool
) -> nn.Module:
    """A linear layer in `quant_mode`, the layer's own format (`layer_quant_mode`): None or one of QUANT_MODES."""
    dtype = getattr(torch, config.dtype)
    if quant_mode is None:
        return nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    check_quant_mode(quant_mode)
    if quant_mode == "int8-weight-only":
        return QuantLinear(in_features, out_features, bias, dtype, torch.int8, 0, quantize_input=False)
    if quant_mode == "int4-weight-only":
        return Int4Linear(in_features, out_features, bias, dtype)
    if quant_mode == "int8-smoothquant":
        return SmoothQuantLinear(in_features, out_features, bias, dtype)
    return QuantLinear(in_features, out_features, bias, dtype, torch.float8_e4m3fn, None, quantize_input=True)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, name: str):
        super().__init__()
        self.num_heads = config.num_heads
        embd, bias = config.embedding_size, config.bias
        self.c_attn = linear_layer(config, layer_quant_mode(config, f"{name}.c_attn"), embd, 3 * embd, bias)
        self.c_proj = linear_layer(config, layer_quant_mode(config, f"{name}.c_proj"), embd, embd, bias)
        # A quantized KV cache: one scale for all the keys this layer's attention reads, one for all its values.
        dtype = getattr(torch, config.dtype)
        self.kv_dtype = {"float8": torch.float8_e4m3fn, "int8": torch.int8}.get(config.kv_cache)
        self.k_scale = nn.Parameter(torch.empty((), dtype=dtype)) if config.kv_cache else None
        self.v_scale = nn.Parameter(torch.empty((), dtype=dtype)) if config.kv_cache else None

    def forward(self, x, past_key=None, past_value=None):
        """x [batch, seq, embd]; past_key/past_value [batch, heads, past, head_dim] or None.

        Returns the output [batch, seq, embd] and the keys and values [batch, heads, past + seq, head_dim].
        """
        batch, seq, embd = x.shape
        head_dim = embd // self.num_heads
        qkv = self.c_attn(x)  # [batch, seq, 3 * embd]
        q, k, v = qkv.split(embd, dim=2)
        q = q.reshape(batch, seq, self.num_heads, head_dim).transpose(1, 2)  # [batch, heads, seq, head_dim]
        k = k.reshape(batch, seq, self.num_heads, head_dim).transpose(1, 2)
        v = v.reshape(batch, seq, self.num_heads, head_dim).transpose(1, 2)
        if past_key is not None:
            k = torch.cat([past_key, k], dim=2)  # [batch, heads, past + seq, head_dim]
            v = torch.cat([past_value, v], dim=2)
        if self.k_scale is not None:
            # Where ModelOpt's k_bmm_quantizer and v_bmm_quantizer are: on all the keys and values attention reads,
            # past and new. The cache returned holds them as rounded (see model.py on storing it in float8).
            k = quantize_dequantize(k, self.k_scale, self.kv_dtype)
            v = quantize_dequantize(v, self.v_scale, self.kv_dtype)
        past = k.shape[2] - seq

        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))  # [batch, heads, seq, past + seq]
        # Query i sits at position past + i and may look at keys 0 .. past + i.
        visible = torch.tril(torch.ones(seq, past + seq, dtype=torch.bool, device=x.device), diagonal=past)
        att = att.masked_fill(~visible, float("-inf"))
        att = torch.softmax(att, dim=-1)
        y = att @ v  # [batch, heads, seq, head_dim]
        y = y.transpose(1, 2).reshape(batch, seq, embd)
        return self.c_proj(y), k, v


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, name: str):
        super().__init__()
        embd, bias = config.embedding_size, config.bias
        self.c_fc = linear_layer(config, layer_quant_mode(config, f"{name}.c_fc"), embd, 4 * embd, bias)
        self.c_proj = linear_layer(config, layer_quant_mode(config, f"{name}.c_proj"), 4 * embd, embd, bias)

    def forward(self, x):
        return self.c_proj(gelu_tanh(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, name: str):
        """name: the block's path in the model, "transformer.h.<index>", which names its layers' formats."""
        super().__init__()
        dtype = getattr(torch, config.dtype)
        self.ln_1 = nn.LayerNorm(config.embedding_size, eps=1e-5, dtype=dtype)
        self.attn = CausalSelfAttention(config, f"{name}.attn")
        self.ln_2 = nn.LayerNorm(config.embedding_size, eps=1e-5, dtype=dtype)
        self.mlp = MLP(config, f"{name}.mlp")

    def forward(self, x, past_key=None, past_value=None):
        attn_out, key, value = self.attn(self.ln_1(x), past_key, past_value)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x))
        return x, key, value


class Transformer(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        dtype = getattr(torch, config.dtype)
        self.wte = nn.Embedding(config.vocab_size, config.embedding_size, dtype=dtype)
        self.wpe = nn.Embedding(config.block_size, config.embedding_size, dtype=dtype)
        self.h = nn.ModuleList([Block(config, f"transformer.h.{i}") for i in range(config.num_layers)])
        self.ln_f = nn.LayerNorm(config.embedding_size, eps=1e-5, dtype=dtype)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        lm_head_mode = layer_quant_mode(config, "lm_head")  # float8 quantizes lm_head, which has no bias
        self.lm_head = linear_layer(config, lm_head_mode, config.embedding_size, config.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [batch, seq] token ids -> logits [batch, seq, vocab], recomputing the whole sequence.

        The twin's own, for perplexity and the comparison with Hugging Face: the Tripy model only ever runs
        forward_with_cache, the one method compile_model compiles."""
        x, _, _ = self.hidden_states(idx)
        return self.lm_head(x)  # [batch, seq, vocab]

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
        pos = torch.arange(past, past + seq, dtype=torch.long, device=idx.device)  # [seq]
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # [batch, seq, embd]
        keys, values = [], []
        for i, block in enumerate(self.transformer.h):
            past_key = None if past_keys is None else past_keys[i]
            past_value = None if past_values is None else past_values[i]
            x, key, value = block(x, past_key, past_value)
            keys.append(key)
            values.append(value)
        return self.transformer.ln_f(x), torch.stack(keys), torch.stack(values)


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Extends idx [batch, seq] by max_new_tokens sampled tokens; returns [batch, seq + max_new_tokens].

    With `use_cache` the prompt runs once and every later step feeds only the newest token, reusing the keys and
    values of the past; without it every step recomputes the whole sequence. Both give the same tokens.
    `on_token` is called with each new token [batch, 1] as soon as it is sampled (for streaming).
    """
    keys = values = None
    new_tokens = idx
    for _ in range(max_new_tokens):
        if use_cache:
            logits, keys, values = model.forward_with_cache(new_tokens, keys, values)
        else:
            logits, _, _ = model.forward_with_cache(idx)
        next_token = sample_next_token(logits[:, -1, :], temperature, top_k, generator)
        idx = torch.cat([idx, next_token], dim=1)
        new_tokens = next_token
        if on_token is not None:
            on_token(next_token)
    return idx
