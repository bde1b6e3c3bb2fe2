"""What the Tripy GPT (model.py) and its PyTorch twin (reference.py) share: their config and the quantization modes."""

from dataclasses import dataclass
from typing import Any

QUANT_MODES = ("int8-weight-only", "int4-weight-only", "float8", "int8-smoothquant")
ACTIVATION_QUANT_MODES = ("float8", "int8-smoothquant")  # the modes that quantize layer inputs too
# A per-layer mix of QUANT_MODES and unquantized layers, searched by ModelOpt's AutoQuantize (quant/auto_quantize.py).
AUTO_QUANT_MODE = "auto"
# The effective bits (per block-linear weight, as AutoQuantize counts them) its formats reach: all int4 .. none.
EFFECTIVE_BITS_RANGE = (4.0, 16.0)
INT4_BLOCK_SIZE = 128  # consecutive input features that share one int4 scale, as ModelOpt calibrates them
# What ModelOpt's quantizers are in each mode: (the weight quantizer's num_bits, block-wise, input quantizer enabled).
LINEAR_QUANTIZERS = {
    "int8-weight-only": (8, False, False),
    "int4-weight-only": (4, True, False),
    "float8": ((4, 3), False, True),
    "int8-smoothquant": (8, False, True),  # W8A8: int8 weights and int8 inputs (SmoothQuant's smoothed ones)
}
# How the keys and values attention reads may be quantized, besides any mode: ModelOpt's k/v_bmm_quantizers, in float8
# (what serving engines store, docs/export.md) or int8 (what ONNX Runtime's GroupQueryAttention stores, docs/onnx.md).
KV_CACHE_MODES = ("float8", "int8")
# How the output layer may be quantized, besides any mode: on a CPU the largest matmul of a step (docs/benchmark.md).
LM_HEAD_MODES = ("int8-weight-only", "int4-weight-only")


def quant_mode_of(num_bits: int | tuple | list, block_wise: bool, input_quantized: bool) -> str | None:
    """The mode whose quantizers have these weight bits and blocks and this input quantizer (LINEAR_QUANTIZERS read
    backwards), or None.

    num_bits as ModelOpt holds it: 8, 4, or float8's (4, 3), which a saved state may hold as a list."""
    key = (tuple(num_bits) if isinstance(num_bits, list) else num_bits, block_wise, input_quantized)
    return next((mode for mode, quantizers in LINEAR_QUANTIZERS.items() if quantizers == key), None)


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the position embedding covers (HF's n_positions)
    vocab_size: int = 50257
    num_layers: int = 12
    num_heads: int = 12
    embedding_size: int = 768
    bias: bool = True  # bias in the linear layers
    seq_len: int = 1024  # longest sequence (prompt + new tokens) the compiled Tripy model accepts
    batch_size: int = 1  # batch size the compiled Tripy model accepts
    dtype: str = "float16"  # "float16" or "float32"; each backend maps it to its own dtype
    quant_mode: str | None = None  # None, one of QUANT_MODES for every block linear, or AUTO_QUANT_MODE
    # With AUTO_QUANT_MODE: each block linear's format by its name ("transformer.h.0.attn.c_attn"), None or one of
    # QUANT_MODES. Layers it does not name, lm_head among them, stay unquantized.
    layer_quant_modes: dict[str, str | None] | None = None
    # None, or one of KV_CACHE_MODES: the keys and values attention reads are quantized per tensor (k_scale, v_scale).
    kv_cache: str | None = None
    # None, or one of LM_HEAD_MODES: the output layer quantized in that format whatever the mode, held untied from
    # the input embedding, which stays as it is (it is a table lookup: nothing to gain from quantizing it).
    lm_head_mode: str | None = None


def check_quant_mode(quant_mode: str) -> None:
    """Raises ValueError unless `quant_mode` is one of QUANT_MODES."""
    if quant_mode not in QUANT_MODES:
        raise ValueError(f"Unknown quant_mode {quant_mode!r}; supported: {', '.join(QUANT_MODES)}")


def layer_quant_mode(config: GPTConfig, layer: str) -> str | None:
    """The format of the linear layer named `layer` as in Hugging Face's GPT-2 ("transformer.h.0.mlp.c_fc",
    "lm_head"): None (unquantized) or one of QUANT_MODES. One mode for the whole model quantizes lm_head only in
    float8, or in the config's lm_head_mode."""
    if layer == "lm_head" and config.lm_head_mode is not None:
        return config.lm_head_mode
    if config.quant_mode == AUTO_QUANT_MODE:
        if config.layer_quant_modes is None:
            raise ValueError(f"quant_mode {AUTO_QUANT_MODE!r} needs layer_quant_modes, each layer's format")
        return config.layer_quant_modes.get(layer)
    if layer == "lm_head" and config.quant_mode != "float8":
        return None
    return config.quant_mode


def config_from_hf_config(hf_config: Any, **overrides: Any) -> GPTConfig:
    """The GPTConfig of a Hugging Face GPT2Config; `overrides` sets the other fields (dtype, quant_mode, ...)."""
    return GPTConfig(
        block_size=hf_config.n_positions,
        vocab_size=hf_config.vocab_size,
        num_layers=hf_config.n_layer,
        num_heads=hf_config.n_head,
        embedding_size=hf_config.n_embd,
        **overrides,
    )
