"""Generates from a folder written by exports/onnx_export.py with ONNX Runtime on the CPU, the twin's sampling on its
logits.

OnnxGPT offers the twin's calls, so the twin's own generation loop (reference.generate) runs it; greedy on the ONNX
Runtime flavor, generate runs a loop of its own with no torch between two runs (greedy_in_place).
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch

import reference
from exports import onnx_fused
from exports.onnx_export import MODEL_FILE

# `session.qdq_matmulnbits_accuracy_level`: 4 computes activations in int8 (ONNX Runtime's default), 1 in float32.
ACCURACY_LEVELS = {"int8": 4, "float32": 1}
EXACT = "exact"  # no graph optimization at all: every DequantizeLinear and MatMul as the file has them
# The ONNX Runtime flavor's inputs besides the cache (onnx_fused.make_model)
FLAVOR_INPUT_TYPES = {
    "input_ids": np.int64,
    "position_ids": np.int64,
    "seqlens_k": np.int32,
    "total_sequence_length": np.int32,
}


def session(
    onnx_dir: str, math: str = "int8", threads: int = 0, last_position_only: bool = False, profile: str | None = None
) -> ort.InferenceSession:
    """An ONNX Runtime CPU session on onnx_dir/model.onnx. `math`: "int8" (the default fused kernels), "float32"
    (fused, float math) or EXACT (unfused). threads 0 lets ONNX Runtime choose. `last_position_only`: the graph,
    edited in memory, computes the logits of the last position only (generation: the prompt pass skips the output
    layer on every other position). `profile`: a file name prefix for ONNX Runtime's per-operator profile."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # warnings about unused initializers and such are not the user's business
    # Its threads spin between the kernels of a run, then rest: Python's work between runs (sampling, another
    # session, another process) gets the cores (docs/benchmark.md)
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if math == EXACT:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    else:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(ACCURACY_LEVELS[math]))
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    model = onnx.load(os.path.join(onnx_dir, MODEL_FILE))
    if last_position_only:
        last_position_logits(model)
    if metadata(model).get("gpt2_flavor") == onnx_fused.FLAVOR:  # MatMulNBits in the file: their attribute decides
        set_accuracy_level(model, ACCURACY_LEVELS["float32" if math == EXACT else math])
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def set_accuracy_level(model: onnx.ModelProto, level: int) -> None:
    """The ONNX Runtime flavor's MatMulNBits nodes at `level` (4: int8 activations, 1: float32)."""
    for node in model.graph.node:
        for attribute in node.attribute:
            if node.op_type == "MatMulNBits" and attribute.name == "accuracy_level":
                attribute.i = level


def last_position_logits(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with a Slice of the last position between the final LayerNorm and the output layer's matmul:
    logits [batch, 1, vocab], as the twin's forward_with_cache returns them."""
    graph = model.graph
    head = next(node for node in graph.node if "logits" in node.output)
    if head.op_type not in ("MatMul", "MatMulNBits", "FusedMatMul"):
        raise ValueError(f"the logits come from a {head.op_type}, not the output layer's matmul")
    bounds = {"last.starts": -1, "last.ends": np.iinfo(np.int64).max, "last.axes": 1}
    graph.initializer.extend(onnx.numpy_helper.from_array(np.array([v], np.int64), k) for k, v in bounds.items())
    sliced = onnx.helper.make_node("Slice", [head.input[0], *bounds], ["last.hidden"], name="last_position")
    head.input[0] = "last.hidden"
    graph.node.insert(list(graph.node).index(head), sliced)
    logits = next(output for output in graph.output if output.name == "logits")
    logits.type.tensor_type.shape.dim[1].dim_value = 1  # [batch, 1, vocab]
    return model


def quantization(onnx_dir: str) -> dict:
    """What onnx_export recorded: {"quant_mode": ..., "layer_quant_modes": ...}, and the flavor's "kv_cache"."""
    model = onnx.load(os.path.join(onnx_dir, MODEL_FILE), load_external_data=False)
    return json.loads(metadata(model)["gpt2_quantization"])


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The file's metadata_props: gpt2_quantization, and gpt2_flavor in the ONNX Runtime flavor (onnx_fused.py)."""
    return {prop.key: prop.value for prop in model.metadata_props}


@dataclass
class SharedCache:
    """The ONNX Runtime flavor's keys and values (onnx_fused.py): per layer a key and a value buffer [batch, heads,
    n_positions, head_dim] that GroupQueryAttention reads and writes in place, and how many positions are filled.
    A step writes into the buffers of the cache it is given: that cache is used up, the one it returns is current."""

    buffers: list[ort.OrtValue]  # layer 0's key, layer 0's value, layer 1's key, ...
    length: int
    binding: ort.IOBinding | None = None  # the buffers bound as past and present by the first step, kept
    step_inputs: dict[str, np.ndarray] | None = None  # a one-token step's inputs, bound by address, rewritten


class OnnxGPT:
    """The ONNX graph behind the twin's calls: `model(idx)` for perplexity and `forward_with_cache` for generation,
    torch tensors in and out. The keys and values stay in ONNX Runtime's memory between steps: in the standard file
    as OrtValues that one call returns and the next one takes, in the ONNX Runtime flavor as buffers that every step
    fills further in place (SharedCache)."""

    def __init__(self, sess: ort.InferenceSession):
        self.session = sess
        inputs = {node.name: node for node in sess.get_inputs()}
        key = inputs["past_key_values.0.key"]
        self.num_layers = sum(name.startswith("past_key_values.") for name in inputs) // 2
        self.num_heads, self.capacity, self.head_dim = key.shape[1:]  # capacity: n_positions in the ORT flavor
        self.shared_cache = "seqlens_k" in inputs  # the ONNX Runtime flavor
        self.cache_dtype = np.int8 if key.type == "tensor(int8)" else np.float32  # int8: --kv-cache int8
        self.last_position_only = sess.get_outputs()[0].shape[1] == 1  # session(..., last_position_only=True)
        self.output_names = [output.name for output in sess.get_outputs()]
        self.vocab_size = sess.get_outputs()[0].shape[2]

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [batch, seq] -> logits [batch, seq, vocab] with no past: the twin's forward, for perplexity."""
        if self.last_position_only:
            raise ValueError("this session computes the last position's logits only: open it with the default")
        return self.run_shared(idx, None)[0] if self.shared_cache else self.run(idx, None, None)[0]

    def forward_with_cache(self, idx: torch.Tensor, past_keys=None, past_values=None):
        """The twin's forward_with_cache: idx [batch, seq] after the past whose keys and values are given (None at
        the prompt): one OrtValue per layer [batch, heads, past, head_dim], or in the ONNX Runtime flavor one
        SharedCache, given and returned as both. Returns the last position's logits [batch, 1, vocab] and the keys
        and values of past + seq, to pass to the next call."""
        if self.shared_cache:
            logits, cache = self.run_shared(idx, past_keys)
            return logits[:, -1:], cache, cache
        logits, keys, values = self.run(idx, past_keys, past_values)
        return logits[:, -1:], keys, values

    def run(self, idx: torch.Tensor, past_keys: list | None, past_values: list | None):
        """One session.run of the standard file: the logits as torch, the presents as OrtValues."""
        batch, seq = idx.shape
        if past_keys is None:
            empty = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, self.num_heads, 0, self.head_dim), np.float32))
            past_keys = past_values = [empty] * self.num_layers
        past_len = past_keys[0].shape()[2]
        feeds = {
            "input_ids": idx.numpy().astype(np.int64),
            "attention_mask": np.ones((batch, past_len + seq), np.int64),
            "position_ids": position_ids(batch, past_len, seq),
        }
        feeds = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in feeds.items()}
        for i in range(self.num_layers):
            feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = past_keys[i], past_values[i]
        logits, *presents = self.session.run_with_ort_values(self.output_names, feeds)
        return torch.from_numpy(logits.numpy()), presents[0::2], presents[1::2]

    def run_shared(self, idx: torch.Tensor, cache: SharedCache | None) -> tuple[torch.Tensor, SharedCache]:
        """One run of the ONNX Runtime flavor: each cache buffer bound as both the past and the present, so that
        GroupQueryAttention writes the new keys and values where they belong and nothing is copied."""
        batch, seq = idx.shape
        if cache is None:
            # Left as allocated: attention reads only the positions filled. ONNX Runtime's allocator, not numpy's,
            # whose large arrays ask for huge pages that the kernel must clear whole (seconds at batch 8).
            shape = (batch, self.num_heads, self.capacity, self.head_dim)
            new_buffer = ort.OrtValue.ortvalue_from_shape_and_type
            buffers = [new_buffer(shape, self.cache_dtype) for _ in self.output_names[1:]]
            cache = SharedCache(buffers, 0)
        total = cache.length + seq
        self.check_fits(total)
        binding = cache.binding or self.bind_cache(cache.buffers)  # bound once, kept from step to step
        inputs = flavor_inputs(idx.numpy(), cache.length)
        if seq > 1:  # a prompt: its arrays bound for this run
            for name, array in inputs.items():
                binding.bind_cpu_input(name, array.astype(FLAVOR_INPUT_TYPES[name]))
            step_inputs = None
        else:  # a step costs milliseconds, each call from Python tens of microseconds: a write, no binding
            step_inputs = cache.step_inputs or bind_by_address(binding, inputs)
            for name, array in inputs.items():
                step_inputs[name][...] = array
        # a new array each run: the last run's logits stay the caller's
        logits = ort.OrtValue.ortvalue_from_shape_and_type(
            (batch, 1 if self.last_position_only else seq, self.vocab_size), np.float32
        )
        binding.bind_ortvalue_output("logits", logits)
        self.session.run_with_iobinding(binding)
        return torch.from_numpy(logits.numpy()), SharedCache(cache.buffers, total, binding, step_inputs)

    def check_fits(self, positions: int) -> None:
        """Raises ValueError when the ONNX Runtime flavor's cache buffers cannot hold `positions`."""
        if positions > self.capacity:
            raise ValueError(f"{positions} positions do not fit the model's {self.capacity}")

    def bind_cache(self, buffers: list[ort.OrtValue]) -> ort.IOBinding:
        """A binding with each cache buffer as both past_key_values.N.* and present.N.*."""
        binding = self.session.io_binding()
        for name, buffer in zip(self.output_names[1:], buffers, strict=True):  # present.0.key, ...
            binding.bind_ortvalue_input(name.replace("present.", "past_key_values."), buffer)
            binding.bind_ortvalue_output(name, buffer)
        return binding


def generate(
    model: OnnxGPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """reference.generate on ONNX Runtime, with torch on one thread while it runs (torch_threads). Greedy on the
    ONNX Runtime flavor, it is greedy_in_place's loop, which calls no torch between two runs."""
    with torch_threads(1):
        if top_k == 1 and model.shared_cache:
            return greedy_in_place(model, idx, max_new_tokens, on_token)
        return reference.generate(model, idx, max_new_tokens, temperature, top_k, generator, on_token=on_token)


def greedy_in_place(
    model: OnnxGPT, idx: torch.Tensor, max_new_tokens: int, on_token: Callable[[torch.Tensor], None] | None = None
) -> torch.Tensor:
    """reference.generate's greedy tokens on the ONNX Runtime flavor, idx [batch, seq] -> [batch, seq + new], with
    numpy alone between two runs: after the prompt pass, each step writes the newest tokens and their position into
    inputs bound once by address, and takes the argmax of logits that ONNX Runtime writes into one bound array.
    A run leaves the caches cold, so every Python call between two runs costs microseconds: reference.generate's
    torch calls and run_shared's new arrays were a tenth of a step (docs/benchmark.md)."""
    batch, prompt_len = idx.shape
    model.check_fits(prompt_len + max_new_tokens - 1)  # the last token is chosen, never fed
    logits, cache = model.run_shared(idx, None)  # the prompt pass: [batch, 1 or seq, vocab]
    new_tokens = np.empty((batch, max_new_tokens), np.int64)  # max_new_tokens >= 1
    new_tokens[:, 0] = logits[:, -1].numpy().argmax(axis=-1)
    inputs = bind_by_address(cache.binding, flavor_inputs(new_tokens[:, :1], prompt_len))
    step_logits = np.empty((batch, 1, model.vocab_size), np.float32)
    cache.binding.bind_output("logits", "cpu", 0, np.float32, list(step_logits.shape), step_logits.ctypes.data)
    for i in range(max_new_tokens):
        if i > 0:  # feed token i - 1 at position prompt_len + i - 1
            inputs["input_ids"][:, 0] = new_tokens[:, i - 1]
            inputs["position_ids"][:] = prompt_len + i - 1
            inputs["seqlens_k"][:] = prompt_len + i - 1
            inputs["total_sequence_length"][...] = prompt_len + i
            model.session.run_with_iobinding(cache.binding)
            new_tokens[:, i] = step_logits[:, 0].argmax(axis=-1)
        if on_token is not None:
            on_token(torch.from_numpy(new_tokens[:, i : i + 1]))
    return torch.cat([idx, torch.from_numpy(new_tokens)], dim=1)


def bind_by_address(binding: ort.IOBinding, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Copies of `inputs`, each bound by its address: ONNX Runtime reads whatever they hold at each run, so the
    next step writes its own values into them and binds nothing."""
    arrays = {name: np.array(array, FLAVOR_INPUT_TYPES[name]) for name, array in inputs.items()}
    for name, array in arrays.items():
        binding.bind_input(name, "cpu", 0, array.dtype.type, list(array.shape), array.ctypes.data)
    return arrays


def flavor_inputs(idx: np.ndarray, past: int) -> dict[str, np.ndarray]:
    """The ONNX Runtime flavor's inputs besides the cache, for tokens idx [batch, seq] after `past` positions."""
    batch, seq = idx.shape
    return {
        "input_ids": idx,
        "position_ids": position_ids(batch, past, seq),
        "seqlens_k": np.full(batch, past + seq - 1, np.int32),  # GroupQueryAttention's convention: filled, less one
        "total_sequence_length": np.array(past + seq, np.int32),
    }


def position_ids(batch: int, past: int, seq: int) -> np.ndarray:
    """[batch, seq]: positions past .. past + seq - 1 in every row."""
    return np.ascontiguousarray(np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (batch, seq)))


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count` inside, restored after. On a small CPU torch's idle threads spin
    beside ONNX Runtime's and halve its speed (docs/benchmark.md): the generation loop around ONNX Runtime
    (generate: reference.generate's sampling and concatenation are torch ops) runs inside torch_threads(1)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def example_generator(onnx_dir: str, prompt_len: int, args: argparse.Namespace) -> Callable[..., torch.Tensor]:
    """example.py --model-type ONNX_DIR: generate(idx, max_new_tokens, temperature, top_k, generator, on_token) with
    ONNX Runtime at its default accuracy level (docs/quality.md measures what its int8 activations cost), after
    checking that the prompt and the new tokens fit the model."""
    from transformers import GPT2Config

    from cli.example_args import check_model_fits

    # quantized already: only the context is checked
    check_model_fits(args, onnx_dir, GPT2Config.from_pretrained(onnx_dir), None, prompt_len)
    start = time.perf_counter()
    model = OnnxGPT(session(onnx_dir, last_position_only=True))
    recorded = quantization(onnx_dir)
    mode = recorded["quant_mode"] or "unquantized"
    if recorded.get("kv_cache"):  # the ONNX Runtime flavor's record; the standard file's has none
        mode += f", {recorded['kv_cache']} KV cache"
    kind = "ONNX, ONNX Runtime flavor" if model.shared_cache else "ONNX"
    print(f"Model: {onnx_dir} ({kind}, {mode}), loaded into ONNX Runtime in {time.perf_counter() - start:.1f} s")

    def run(idx, max_new_tokens, temperature, top_k, generator, on_token):
        return generate(model, idx, max_new_tokens, temperature, top_k, generator, on_token)

    return run
