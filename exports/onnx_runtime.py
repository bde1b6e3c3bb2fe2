"""Generates from a folder written by exports/onnx_export.py with ONNX Runtime on the CPU, the twin's sampling on its
logits.

ONNX Runtime's graph optimizations fuse each weight's DequantizeLinear and MatMul into its `MatMulNBits` kernel,
which reads the int8 or int4 weights as they are stored. How the kernel multiplies is its accuracy level: by default
(4) it quantizes the activations to int8 too and multiplies in integers, which is where the speed comes from and
adds an error the twin does not have; level 1 keeps float32 math and matches the twin to 1e-5. float8 has no CPU
kernel: its weights are dequantized at every step.
"""

import argparse
import json
import os
import time
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch

from exports.onnx_export import MODEL_FILE
from measure.sampling import sample_next_token

# `session.qdq_matmulnbits_accuracy_level`: 4 computes activations in int8 (ONNX Runtime's default), 1 in float32.
ACCURACY_LEVELS = {"int8": 4, "float32": 1}
EXACT = "exact"  # no graph optimization at all: every DequantizeLinear and MatMul as the file has them


def session(onnx_dir: str, math: str = "int8", threads: int = 0) -> ort.InferenceSession:
    """An ONNX Runtime CPU session on onnx_dir/model.onnx. `math`: "int8" (the default fused kernels), "float32"
    (fused, float math) or EXACT (unfused). threads 0 lets ONNX Runtime choose."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # warnings about unused initializers and such are not the user's business
    if math == EXACT:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    else:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(ACCURACY_LEVELS[math]))
    return ort.InferenceSession(os.path.join(onnx_dir, MODEL_FILE), options, providers=["CPUExecutionProvider"])


def quantization(onnx_dir: str) -> dict:
    """What onnx_export recorded: {"quant_mode": ..., "layer_quant_modes": ...}."""
    model = onnx.load(os.path.join(onnx_dir, MODEL_FILE), load_external_data=False)
    props = {prop.key: prop.value for prop in model.metadata_props}
    return json.loads(props["gpt2_quantization"])


class OnnxGPT:
    """The ONNX graph behind the twin's forward_with_cache: the same call, numpy in and out of ONNX Runtime."""

    def __init__(self, sess: ort.InferenceSession):
        self.session = sess
        inputs = {node.name: node for node in sess.get_inputs()}
        key = inputs["past_key_values.0.key"]
        self.num_layers = sum(name.startswith("past_key_values.") for name in inputs) // 2
        self.num_heads, self.head_dim = key.shape[1], key.shape[3]

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [batch, seq] -> logits [batch, seq, vocab] with no past: the twin's forward, for perplexity."""
        return self.forward(idx, None, 0)[0]

    def forward(self, idx: torch.Tensor, past: list[np.ndarray] | None, past_len: int) -> tuple[torch.Tensor, list]:
        """idx [batch, seq] after past_len tokens whose keys and values are `past` (None at the prompt).
        Returns the logits [batch, seq, vocab] and the keys and values of past + seq."""
        batch, seq = idx.shape
        if past is None:
            past = [np.zeros((batch, self.num_heads, 0, self.head_dim), np.float32)] * (2 * self.num_layers)
        feeds = {
            "input_ids": idx.numpy().astype(np.int64),
            "attention_mask": np.ones((batch, past_len + seq), np.int64),
            "position_ids": np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)),
        }
        for i in range(self.num_layers):
            feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        logits, *presents = self.session.run(None, feeds)
        return torch.from_numpy(logits), presents


@torch.no_grad()
def generate(
    model: OnnxGPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """reference.generate with the ONNX graph: the prompt once, then one token at a time on the cache."""
    past, new_tokens = None, idx
    for _ in range(max_new_tokens):
        past_len = idx.shape[1] - new_tokens.shape[1]
        logits, past = model.forward(new_tokens, past, past_len)
        next_token = sample_next_token(logits[:, -1, :], temperature, top_k, generator)
        idx = torch.cat([idx, next_token], dim=1)
        new_tokens = next_token
        if on_token is not None:
            on_token(next_token)
    return idx


def example_generator(onnx_dir: str, prompt_len: int, args: argparse.Namespace) -> Callable[..., torch.Tensor]:
    """example.py --model-type ONNX_DIR: generate(idx, max_new_tokens, temperature, top_k, generator, on_token) with
    ONNX Runtime at its default accuracy level (docs/quality.md measures what its int8 activations cost), after
    checking that the prompt and the new tokens fit the model."""
    from transformers import GPT2Config

    from cli.example_args import check_model_fits

    # quantized already: only the context is checked
    check_model_fits(args, onnx_dir, GPT2Config.from_pretrained(onnx_dir), None, prompt_len)
    start = time.perf_counter()
    model = OnnxGPT(session(onnx_dir))
    mode = quantization(onnx_dir)["quant_mode"] or "unquantized"
    print(f"Model: {onnx_dir} (ONNX, {mode}), loaded into ONNX Runtime in {time.perf_counter() - start:.1f} s")

    def run(idx, max_new_tokens, temperature, top_k, generator, on_token):
        return generate(model, idx, max_new_tokens, temperature, top_k, generator, on_token)

    return run
