"""What the Tripy GPT (model.py) and its PyTorch twin (reference.py) share: their config and the quantization modes."""

from dataclasses import dataclass

QUANT_MODES = ("int8-weight-only", "int4-weight-only", "float8")
INT4_BLOCK_SIZE = 128  # consecutive input features that share one int4 scale, as ModelOpt calibrates them
# What ModelOpt's weight quantizer is in each mode: (num_bits, block-wise).
WEIGHT_QUANTIZER = {"int8-weight-only": (8, False), "int4-weight-only": (4, True), "float8": ((4, 3), False)}


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
    quant_mode: str | None = None  # None or one of QUANT_MODES


def check_quant_mode(quant_mode: str) -> None:
    """Raises ValueError unless `quant_mode` is one of QUANT_MODES."""
    if quant_mode not in QUANT_MODES:
        raise ValueError(f"Unknown quant_mode {quant_mode!r}; supported: {', '.join(QUANT_MODES)}")
