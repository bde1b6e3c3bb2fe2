"""Generates from a folder written by exports/onnx_export.py with ONNX Runtime on the CPU, the twin's sampling on its
logits.

OnnxGPT offers the twin's calls, so the twin's own generation loop (reference.generate) runs it.
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
    """The ONNX graph behind the twin's calls: `model(idx)` and `forward_with_cache`, numpy in and out of ONNX
    Runtime, so that reference.generate and measure/perplexity.py run it as they run the twin."""

    def __init__(self, sess: ort.InferenceSession):
        self.session = sess
        inputs = {node.name: node for node in sess.get_inputs()}
        key = inputs["past_key_values.0.key"]
        self.num_layers = sum(name.startswith("past_key_values.") for name in inputs) // 2
        self.num_heads, self.head_dim = key.shape[1], key.shape[3]

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [batch, seq] -> logits [batch, seq, vocab] with no past: the twin's forward, for perplexity."""
        return self.run(idx, None, None)[0]

    def forward_with_cache(
        self, idx: torch.Tensor, past_keys: torch.Tensor | None = None, past_values: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The twin's forward_with_cache: idx [batch, seq] after a past whose keys and values are past_keys and
        past_values [layers, batch, heads, past, head_dim] (None: no past). Returns the logits of the last position
        [batch, 1, vocab] and the keys and values of past + seq."""
        logits, keys, values = self.run(idx, past_keys, past_values)
        return logits[:, -1:, :], keys, values

    def run(
        self, idx: torch.Tensor, past_keys: torch.Tensor | None, past_values: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One session.run: the logits of every position [batch, seq, vocab], and the keys and values of past + seq."""
        batch, seq = idx.shape
        if past_keys is None:
            past_keys = past_values = torch.zeros(self.num_layers, batch, self.num_heads, 0, self.head_dim)
        past_len = past_keys.shape[3]
        feeds = {
            "input_ids": idx.numpy().astype(np.int64),
            "attention_mask": np.ones((batch, past_len + seq), np.int64),
            "position_ids": np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)),
        }
        for i in range(self.num_layers):
            feeds[f"past_key_values.{i}.key"] = past_keys[i].numpy()
            feeds[f"past_key_values.{i}.value"] = past_values[i].numpy()
        logits, *presents = self.session.run(None, feeds)  # presents: key 0, value 0, key 1, ...
        keys, values = torch.from_numpy(np.stack(presents[0::2])), torch.from_numpy(np.stack(presents[1::2]))
        return torch.from_numpy(logits), keys, values


def example_generator(onnx_dir: str, prompt_len: int, args: argparse.Namespace) -> Callable[..., torch.Tensor]:
    """example.py --model-type ONNX_DIR: generate(idx, max_new_tokens, temperature, top_k, generator, on_token) with
    ONNX Runtime at its default accuracy level (docs/quality.md measures what its int8 activations cost), after
    checking that the prompt and the new tokens fit the model."""
    from transformers import GPT2Config

    import reference
    from cli.example_args import check_model_fits

    # quantized already: only the context is checked
    check_model_fits(args, onnx_dir, GPT2Config.from_pretrained(onnx_dir), None, prompt_len)
    start = time.perf_counter()
    model = OnnxGPT(session(onnx_dir))
    mode = quantization(onnx_dir)["quant_mode"] or "unquantized"
    print(f"Model: {onnx_dir} (ONNX, {mode}), loaded into ONNX Runtime in {time.perf_counter() - start:.1f} s")

    def run(idx, max_new_tokens, temperature, top_k, generator, on_token):
        return reference.generate(model, idx, max_new_tokens, temperature, top_k, generator, on_token=on_token)

    return run
