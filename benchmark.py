"""How fast the PyTorch twin generates, with and without its key/value cache, next to Hugging Face's `generate`.

The three run in one process, on the same weights, the same prompts and the same torch threads, greedily (the twin's
top_k=1 is greedy) in float32 on the CPU. The benchmark prints:
  - tokens per second at batch 1 and batch 8, and the peak memory of the tensors each one allocates;
  - the time per token as the sequence grows, at positions 32 .. 512.
The weights are a random GPT-2 in the real shapes (`GPT2Config()`: gpt2, 124M parameters) copied into the twin with
weight_loader, so nothing is downloaded; random weights take exactly as long to multiply as trained ones.

    python benchmark.py                                   # the gpt2 (124M) shape: a few minutes on 2 cores
    python benchmark.py --chart                           # and a chart of time per token, in out/
    python benchmark.py --tiny                            # a 2-layer, 64-wide GPT-2: seconds
    python benchmark.py --backend tripy                   # on a GPU: the Tripy engine against transformers on CUDA
    python benchmark.py --backend tripy --tiny            # without one: the CPU executor, a smoke test, not speed
    python benchmark.py --backend onnx                    # ONNX Runtime on the ONNX files of each mode and flavor
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import pairwise
from typing import TYPE_CHECKING

from cli import ArgumentParser, UsageError, checks, make_out_dir, run
from cli.outputs import output_file
from config import INT4_BLOCK_SIZE
from sources.hub import GPT2_HEADS, GPT2_LAYERS, GPT2_VOCAB_SIZE, GPT2_WIDTH, HUB_CONTEXT_LENGTH

if TYPE_CHECKING:
    import torch
    from tqdm import tqdm
    from transformers import GPT2LMHeadModel

    from reference import GPT

# Only the standard library is imported up here, so that --help and a mistake on the command line answer at once;
# each function imports the torch and transformers code it uses.

STEPS_PER_POSITION = 5  # the time per token at position p is the median of the steps at p .. p + 4
BLOCK_SIZE = HUB_CONTEXT_LENGTH  # 1024: the longest sequence GPT-2's position embedding covers
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 64, "prompt_len": 8, "new_tokens": 8, "positions": "8,16,32", "repeats": 1}
DEFAULT_CHART = os.path.join("out", "time_per_token.png")
TINY_ONNX = {**TINY, "n_embd": INT4_BLOCK_SIZE}  # int4 needs whole blocks of 128 input features

# (prompt [batch, seq], number of new tokens, callback for each new token [batch, 1]) -> tokens [batch, seq + new]
Generate = Callable[["torch.Tensor", int, Callable[["torch.Tensor"], None]], "torch.Tensor"]


@dataclass
class Contender:
    name: str
    generate: Generate
    uses_cache: bool
    exact: bool = True  # computes the float32 model: greedy, it must pick transformers' tokens
    torch_memory: bool = True  # allocates through torch, where torch.profiler sees it (ONNX Runtime does not)
    onnx_dir: str | None = None  # --backend onnx: the folder of the file it runs


@dataclass
class Results:
    tokens_per_second: dict[int, dict[str, float]]  # batch size -> contender -> tokens/s
    peak_memory_mb: dict[int, dict[str, float]]  # batch size -> contender -> MB
    ms_per_token: dict[str, dict[int, float]]  # contender -> position -> milliseconds
    same_tokens: bool  # whether all the exact contenders generated the same tokens
    file_mb: dict[str, float] = field(default_factory=dict)  # --backend onnx: contender -> its ONNX file's MB
    onnx_dirs: dict[str, str] = field(default_factory=dict)  # --backend onnx: contender -> its file's folder
    llama_cpp: dict[str, dict[int, float]] = field(default_factory=dict)  # llama.cpp format -> batch -> tokens/s


def main(argv: list[str] | None = None) -> Results:
    args = parse_args(argv)
    import torch  # the arguments are good: now the imports that take seconds
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # generate's notes about its settings are not results
    print(
        f"GPT-2, {args.n_layer} layers, {args.n_head} heads, {args.n_embd} wide, random weights, float32; "
        f"torch {torch.__version__}, {args.threads} threads"
    )
    with tempfile.TemporaryDirectory() as onnx_folder:  # --backend onnx: its files, until the profiles are taken
        results = run_benchmark(args, onnx_folder)
        print_results(results, args)
        if args.profile:
            print_profiles(results, args.threads)
    if args.chart is not None:
        save_chart(results, args.chart)
        print(f"Saved the chart to {args.chart}")
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.backend == "tripy" and not tripy_on_gpu() and not args.tiny:
        raise UsageError(
            "--backend tripy without a CUDA GPU and TensorRT runs the CPU executor, which shows that the benchmark "
            "runs, not how fast Tripy is: add --tiny"
        )
    if args.tiny:  # tiny sizes become the defaults: an option given on the command line still counts
        parser.set_defaults(**(TINY_ONNX if args.backend == "onnx" else TINY))
        args = parser.parse_args(argv)
    check_sizes(args)
    if args.profile and args.backend != "onnx":
        raise UsageError("--profile profiles ONNX Runtime: add --backend onnx")
    checks.check_fits_in_memory("a GPT-2 of these sizes and the batches", benchmark_bytes(args))
    if args.chart is not None:
        make_out_dir(args.chart)
        checks.check_chart(args.chart)
    return args


def build_parser() -> ArgumentParser:
    """benchmark.py's flags, in the order --help lists them."""
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_measurement_args(parser)
    add_model_size_args(parser)
    add_run_args(parser)
    return parser


def add_measurement_args(parser: argparse.ArgumentParser) -> None:
    """What is timed: the prompt, the tokens, the batches and the positions, and how often."""
    parser.add_argument(
        "--prompt-len", metavar="N", type=int, default=32, help="prompt tokens for tokens/s and memory (default: 32)"
    )
    parser.add_argument(
        "--new-tokens", metavar="N", type=int, default=32, help="tokens generated for tokens/s and memory (default: 32)"
    )
    parser.add_argument(
        "--batch-sizes",
        metavar="B,B",
        default="1,8",
        help="comma-separated batch sizes for tokens/s and memory (default: %(default)s)",
    )
    parser.add_argument(
        "--positions",
        metavar="P,P",
        default="32,64,128,256,512",
        help="ascending positions to time a token at (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        metavar="N",
        type=int,
        default=3,
        help="timed runs for tokens/s, the fastest counts; rounds of the time-per-token runs, the median counts "
        "(default: 3)",
    )
    parser.add_argument(
        "--threads", metavar="N", type=int, default=os.cpu_count(), help="torch threads (default: all cores)"
    )


def add_model_size_args(parser: argparse.ArgumentParser) -> None:
    """The GPT-2 measured: gpt2's sizes, or --tiny for tests."""
    parser.add_argument(
        "--n-layer",
        metavar="N",
        type=int,
        default=GPT2_LAYERS,
        help="transformer blocks (default: 12, gpt2's)",
    )
    parser.add_argument(
        "--n-head", metavar="N", type=int, default=GPT2_HEADS, help="attention heads (default: 12, gpt2's)"
    )
    parser.add_argument(
        "--n-embd", metavar="N", type=int, default=GPT2_WIDTH, help="model width (default: 768, gpt2's)"
    )
    tiny = ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in TINY.items())
    parser.add_argument(
        "--tiny",
        action="store_true",
        help=f"a tiny GPT-2 and short runs, for tests: {tiny}; an option given on the command line still counts",
    )


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """The seed, the chart, and what runs the model."""
    parser.add_argument("--seed", type=checks.seed, default=0, help="0 to 2**64 - 1 (default: 0)")
    parser.add_argument(
        "--chart",
        metavar="PNG",
        nargs="?",
        const=DEFAULT_CHART,
        help=f"also save a chart of time per token against position, to PNG (without one: {DEFAULT_CHART})",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="--backend onnx: also print ONNX Runtime's per-operator profile of a decode step of each quantized file",
    )
    parser.add_argument(
        "--backend",
        choices=("torch", "tripy", "onnx"),
        default="torch",
        help="torch: the twin with and without its cache against transformers, on the CPU; tripy: model.py "
        "compiled against transformers, with TensorRT on a CUDA GPU, or without one on the CPU executor (tripy_cpu/), "
        "only with --tiny, as a smoke test; onnx: ONNX Runtime on exports/onnx_export.py's files (float32, int8, "
        "int8 W8A8, int4; int8 and int4 also with the output layer quantized) and exports/onnx_fused.py's (int4, "
        "with and without), against the twin and transformers, and llama.cpp when measure/build_llama_cpp.sh has "
        "built it, on the CPU (default: torch)",
    )


def check_sizes(args: argparse.Namespace) -> None:
    """The counts, lengths and model sizes; --batch-sizes and --positions become lists of integers."""
    args.batch_sizes = integer_list(args.batch_sizes, "--batch-sizes")
    args.positions = integer_list(args.positions, "--positions")
    checks.check_at_least(args, 1, "prompt_len", "new_tokens", "repeats", "threads", "n_layer", "n_head", "n_embd")
    if min(args.batch_sizes) < 1:
        raise UsageError(f"--batch-sizes must each be at least 1, got {args.batch_sizes}")
    if len(set(args.batch_sizes)) < len(args.batch_sizes):  # one column per batch size: a repeat would be measured
        raise UsageError(f"--batch-sizes lists a size twice: {args.batch_sizes}")
    if args.prompt_len + args.new_tokens > BLOCK_SIZE:
        raise UsageError(
            f"--prompt-len + --new-tokens must be at most {BLOCK_SIZE}, GPT-2's longest sequence, got "
            f"{args.prompt_len} + {args.new_tokens}"
        )
    if args.positions != sorted(set(args.positions)) or args.positions[0] < 1:
        raise UsageError(f"--positions must be ascending positive integers, got {args.positions}")
    if args.positions[-1] + STEPS_PER_POSITION >= BLOCK_SIZE:
        raise UsageError(f"--positions must stay below {BLOCK_SIZE - STEPS_PER_POSITION}: GPT-2's longest sequence")
    if args.threads > os.cpu_count():
        raise UsageError(f"--threads must be from 1 to {os.cpu_count()}, this machine's cores, got {args.threads}")
    if args.n_embd % args.n_head:
        raise UsageError(f"--n-embd ({args.n_embd}) must be a multiple of --n-head ({args.n_head})")
    if args.backend == "onnx" and args.n_embd % INT4_BLOCK_SIZE:
        raise UsageError(
            f"--backend onnx races int4 in blocks of {INT4_BLOCK_SIZE}: --n-embd must be a multiple of it, got "
            f"{args.n_embd}"
        )


def integer_list(text: str, flag: str) -> list[int]:
    """A comma-separated list of integers, such as 1,8."""
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integers, such as 1,8, got {text!r}") from None


def benchmark_bytes(args: argparse.Namespace) -> int:
    """A floor on the float32 bytes a run holds: the weights (twice: Hugging Face's model and the twin), a key/value
    cache and the logits of the largest batch's prompt."""
    vocab, width, batch = GPT2_VOCAB_SIZE, args.n_embd, max(args.batch_sizes)
    weights = (vocab + BLOCK_SIZE) * width + args.n_layer * 12 * width * width
    sequence = max(args.prompt_len + args.new_tokens, args.positions[-1] + STEPS_PER_POSITION + 1)
    cache = 2 * args.n_layer * batch * sequence * width
    return 4 * (2 * weights + cache + batch * args.prompt_len * vocab)


def build_models(n_layer: int, n_head: int, n_embd: int, seed: int) -> tuple[GPT2LMHeadModel, GPT]:
    """A random Hugging Face GPT-2 and the twin holding the same weights, both float32."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from measure.twin import load_twin

    torch.manual_seed(seed)
    hf_model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd)).eval()
    return hf_model, load_twin(hf_model)


def twin_generate(twin: GPT, use_cache: bool) -> Generate:
    """reference.generate on the twin, or on any model with its calls (ONNX Runtime's OnnxGPT)."""
    from reference import generate

    def run(prompt, new_tokens, on_token):
        return generate(twin, prompt, new_tokens, top_k=1, use_cache=use_cache, on_token=on_token)

    return run


class CallbackStreamer:
    """Hands each new token to a callback, as a transformers streamer (put, end). `generate` puts the prompt first:
    that one is not a new token."""

    def __init__(self, on_token: Callable[[torch.Tensor], None]):
        self.on_token = on_token
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.on_token(value)
        self.prompt_seen = True

    def end(self) -> None:
        pass


def hf_generate(hf_model: GPT2LMHeadModel) -> Generate:
    import torch

    from sources.tokenizer import END_OF_TEXT

    device = hf_model.device

    def run(prompt, new_tokens, on_token):
        prompt = prompt.to(device)
        with torch.no_grad():
            tokens = hf_model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,  # never stop early at end-of-text: all three do the same work
                pad_token_id=END_OF_TEXT,
                use_cache=True,
                streamer=CallbackStreamer(on_token),
            )
        return tokens.cpu()

    return run


def tripy_on_gpu() -> bool:
    """Whether --backend tripy runs TensorRT on a GPU; otherwise it runs the CPU executor, on the CPU."""
    import torch

    import tripy_cpu

    return tripy_cpu.use() == "tensorrt" and torch.cuda.is_available()


def tripy_generate(hf_model: GPT2LMHeadModel, batch_sizes: list[int], seq_len: int) -> Generate:
    """model.py compiled once per batch size (a compiled batch is fixed), greedy, in float32 like the others."""
    import tripy_cpu

    tripy_cpu.use()
    tripy_cpu.fast_stack_info()  # as example.py does on both Tripy backends: the same stacks, faster tracing
    import nvtripy as tp

    import model
    from weight_loader import config_from_hf, load_weights_from_hf

    compiled = {}
    for batch in batch_sizes:
        config = config_from_hf(hf_model, seq_len=seq_len, batch_size=batch, dtype="float32")
        gpt = model.GPT(config)
        load_weights_from_hf(gpt, None, tp.float32, hf_model=hf_model)
        compiled[batch] = model.compile_model(gpt, config)

    def run(prompt, new_tokens, on_token):
        return model.generate(compiled[prompt.shape[0]], prompt, new_tokens, top_k=1, on_token=on_token)

    return run


# label -> (mode, the output layer's own format or None: tied to the input embedding, float32; the KV cache's: None
# for float32 or int8; the file's flavor: "standard" from exports/onnx_export.py, "ort" from exports/onnx_fused.py,
# ONNX Runtime's fused operators, the only one that stores an int8 cache)
ONNX_FILES = {
    "float32": (None, None, None, "standard"),
    "int8": ("int8-weight-only", None, None, "standard"),
    "int8, int8 output layer": ("int8-weight-only", "int8-weight-only", None, "standard"),
    "int8 W8A8": ("int8-smoothquant", None, None, "standard"),
    "int4": ("int4-weight-only", None, None, "standard"),
    "int4, int4 output layer": ("int4-weight-only", "int4-weight-only", None, "standard"),
    "int4, ORT flavor": ("int4-weight-only", None, None, "ort"),
    "int4, int4 output layer, ORT flavor": ("int4-weight-only", "int4-weight-only", None, "ort"),
    "int4, int4 output layer, int8 KV cache, ORT flavor": ("int4-weight-only", "int4-weight-only", "int8", "ort"),
}  # no float8: ONNX Runtime has no CPU kernel for it (it dequantizes every weight at every step); a GPU format
KV_SCALE = 1 / 16  # an int8 cache's k_scale and v_scale on random weights: the values they give, not the time


def weight_max_twin(twin: GPT, quant_mode: str, lm_head_mode: str | None = None, kv_cache: str | None = None) -> GPT:
    """The twin in an int8 or int4 `quant_mode` (and its output layer in `lm_head_mode`, its KV cache in `kv_cache`)
    with scales from each weight's own largest magnitude (what max calibration gives a weight) and AWQ's
    pre_quant_scale ones: a calibration changes the values, not the time. int8-smoothquant gets a smoothing factor
    of a quarter where the mode smooths (every layer but the MLP's c_proj, whose factor of ones the ONNX file leaves
    out) and int8 input scales of 1 / 127: the graph the mode exports. An int8 cache gets KV_SCALE."""
    import torch

    from reference import GPT, Int4Linear, QuantLinear, SmoothQuantLinear

    config = replace(twin.config, quant_mode=quant_mode, lm_head_mode=lm_head_mode, kv_cache=kv_cache)
    quantized = GPT(config).eval()
    state = twin.state_dict()
    if kv_cache is not None:
        for name in quantized.state_dict():
            if name.endswith(("attn.k_scale", "attn.v_scale")):
                state[name] = torch.tensor(KV_SCALE)
    for name, layer in quantized.named_modules():
        if not isinstance(layer, (QuantLinear, Int4Linear, SmoothQuantLinear)):
            continue
        weight = state[f"{name}.weight"]  # [out, in]
        if isinstance(layer, Int4Linear):
            weight = weight.t().contiguous()  # [in, out], blocks of 128 input features
            amax = weight.abs().reshape(-1, INT4_BLOCK_SIZE, weight.shape[1]).amax(dim=1)  # [in / 128, out]
            state[f"{name}.weight_scale"] = amax.clamp(min=1e-8) / 7
            state[f"{name}.pre_quant_scale"] = torch.ones(weight.shape[0])
        elif isinstance(layer, SmoothQuantLinear):
            state[f"{name}.weight_scale"] = weight.abs().amax(dim=1).clamp(min=1e-8) / 127  # [out]
            state[f"{name}.input_scale"] = torch.tensor(1.0 / 127)
            smoothed = not name.endswith("mlp.c_proj")
            state[f"{name}.pre_quant_scale"] = torch.full((weight.shape[1],), 0.25 if smoothed else 1.0)
        else:  # int8, per output channel
            state[f"{name}.weight_scale"] = weight.abs().amax(dim=1).clamp(min=1e-8) / 127  # [out]
        state[f"{name}.weight"] = weight
    quantized.load_state_dict(state)
    return quantized


def onnx_contenders(
    hf_model: GPT2LMHeadModel, twin: GPT, threads: int, folder: str
) -> tuple[list[Contender], dict[str, float]]:
    """ONNX Runtime on the file of each of ONNX_FILES, written under `folder` (fast kernels: its default accuracy
    level), the standard int4 also at float32 math; and each file's MB."""
    from exports import onnx_export, onnx_runtime
    from exports.onnx_fused import WRITERS

    contenders, file_mb = [], {}
    for label, (quant_mode, lm_head_mode, kv_cache, flavor) in ONNX_FILES.items():
        print(f"Exporting the {label} ONNX file", flush=True)
        onnx_dir = os.path.join(folder, label.replace(", ", "-").replace(" ", "_"))
        quantized = twin if quant_mode is None else weight_max_twin(twin, quant_mode, lm_head_mode, kv_cache)
        WRITERS[flavor](quantized, onnx_dir)
        name = f"ONNX Runtime {label}"
        file_mb[name] = os.path.getsize(os.path.join(onnx_dir, onnx_export.MODEL_FILE)) / 1e6
        maths = ["int8", "float32"] if label == "int4" else ["int8"]
        for math in maths:
            # the last position's logits only, ONNX Runtime on `threads`, torch on one while it runs (onnx_runtime)
            session = onnx_runtime.session(onnx_dir, math, threads, last_position_only=True)
            contender = name if math == "int8" else f"{name}, float32 math"
            runner = onnx_generate(onnx_runtime.OnnxGPT(session))
            exact = quant_mode is None
            contenders.append(Contender(contender, runner, True, exact, torch_memory=False, onnx_dir=onnx_dir))
            if math == "float32":
                file_mb[contender] = file_mb[name]
    return contenders, file_mb


def onnx_generate(model) -> Generate:
    from exports import onnx_runtime

    def run(prompt, new_tokens, on_token):
        return onnx_runtime.generate(model, prompt, new_tokens, top_k=1, on_token=on_token)

    return run


def timed_run(run: Generate, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float, list[float]]:
    """Generates once; returns the tokens, the total seconds, and the seconds each new token took.

    step_seconds[0] covers the prompt pass; step_seconds[i] (i >= 1) is the step that fed the token at position
    prompt_len + i - 1 and chose the next one.
    """
    stamps = [time.perf_counter()]
    tokens = run(prompt, new_tokens, lambda token: stamps.append(time.perf_counter()))
    total = time.perf_counter() - stamps[0]
    return tokens, total, [after - before for before, after in pairwise(stamps)]


@contextmanager
def stderr_silenced() -> Iterator[None]:
    """torch.profiler's C++ side writes a log line to stderr as it starts and stops, and no setting turns them off."""
    saved_stderr = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)


def peak_memory_mb(run: Generate, prompt: torch.Tensor, new_tokens: int) -> float:
    """The most memory that tensors allocated while generating held at once: KV cache, activations, logits.

    torch.profiler records every tensor allocation and free, and their running sum peaks here. The weights, allocated
    before, are not counted. It is a separate, untimed run: profiling slows every op down.
    """
    from torch.profiler import ProfilerActivity, profile

    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with stderr_silenced():  # only its start and stop: the progress bar shares stderr
        profiler.start()
    try:
        run(prompt, new_tokens, lambda token: None)
    finally:
        with stderr_silenced():
            profiler.stop()
    in_use = peak = 0
    for event in sorted(profiler.events(), key=lambda event: event.time_range.start):
        in_use += event.self_cpu_memory_usage
        peak = max(peak, in_use)
    return peak / 2**20


def measure_throughput(
    contenders: list[Contender],
    prompt: torch.Tensor,
    new_tokens: int,
    repeats: int,
    self_timed: dict[str, Callable[[int], float]],
) -> tuple[dict[str, float], dict[str, float], dict[str, torch.Tensor], dict[str, float]]:
    """Tokens per second (the fastest of `repeats` runs, which the contenders take turns at), peak memory (MB) and
    the tokens generated, by contender; and the fastest tokens per second of each `self_timed` run (name -> a run at
    a batch size that times itself: llama.cpp's), which takes its turn after the contenders in every round, so that
    a slow minute of the machine falls on it as on them. Every timed run comes right after an untimed one-token run
    of its own, as llama-batched-bench warms up before it times."""
    batch = prompt.shape[0]
    best_seconds = {contender.name: float("inf") for contender in contenders}
    best_rates = {name: 0.0 for name in self_timed}
    tokens = {}
    for _ in range(repeats):
        for contender in contenders:
            # Untimed, right before: each run starts warm, as llama-batched-bench's runs do after its own warm-up
            # decode of 16 tokens, rather than on caches that the contender before it filled
            contender.generate(prompt, 1, lambda token: None)
            tokens[contender.name], seconds, _ = timed_run(contender.generate, prompt, new_tokens)
            best_seconds[contender.name] = min(best_seconds[contender.name], seconds)
        for name, run_at in self_timed.items():
            best_rates[name] = max(best_rates[name], run_at(batch))
    tokens_per_second = {name: batch * new_tokens / seconds for name, seconds in best_seconds.items()}
    peak_memory = {c.name: peak_memory_mb(c.generate, prompt, new_tokens) for c in contenders if c.torch_memory}
    return tokens_per_second, peak_memory, tokens, best_rates


def measure_ms_per_token(contenders: list[Contender], sequence: torch.Tensor, positions: list[int], rounds: int):
    """Milliseconds per token at each position, at batch 1: the median of the steps at positions p .. p + 4, over
    `rounds` rounds in which each contender times every position in turn, so that a slow minute of these cores falls
    on all of a contender's positions alike rather than on one.

    Each position gets a short run of its own, from a prompt that ends at it. With a cache, the prompt of p tokens
    runs once and the five steps after it feed positions p .. p + 4, each on a cache of everything before it: what a
    long run passing p would time, without generating every token in between. Without one, a step costs a full pass
    over the sequence so far, from a prompt of p + 1 tokens on. `sequence` [1, positions[-1] + 1] supplies the prompts.
    """
    steps_at = {(contender.name, p): [] for contender in contenders for p in positions}
    for _ in range(rounds):
        for contender in contenders:
            for p in positions:
                if contender.uses_cache:  # [0] is the prompt pass
                    steps = timed_run(contender.generate, sequence[:, :p], STEPS_PER_POSITION + 1)[2][1:]
                else:
                    steps = timed_run(contender.generate, sequence[:, : p + 1], STEPS_PER_POSITION)[2]
                steps_at[contender.name, p] += steps
    return {c.name: {p: 1000 * statistics.median(steps_at[c.name, p]) for p in positions} for c in contenders}


def run_benchmark(args: argparse.Namespace, onnx_folder: str) -> Results:
    import torch
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    # Minutes of work on the real shape: a bar on stderr, ticking with every token any contender generates.
    progress = tqdm(total=steps_to_generate(args), desc="Generating", unit="token")
    hf_model, twin = build_models(args.n_layer, args.n_head, args.n_embd, args.seed)
    file_mb = {}
    if args.backend == "tripy":
        # The longest run: the cached time-per-token run, from positions[0] to past positions[-1].
        seq_len = min(BLOCK_SIZE, max(args.prompt_len + args.new_tokens, args.positions[-1] + STEPS_PER_POSITION + 1))
        on_gpu = tripy_on_gpu()
        print(f"Compiling model.py for batch sizes {args.batch_sizes}, up to {seq_len} tokens", flush=True)
        tripy = tripy_generate(hf_model, args.batch_sizes, seq_len)
        contenders = [
            Contender("Tripy (TensorRT)" if on_gpu else "Tripy, CPU executor (smoke test)", tripy, uses_cache=True),
            Contender("transformers generate", hf_generate(hf_model.to("cuda" if on_gpu else "cpu")), uses_cache=True),
        ]
    elif args.backend == "onnx":
        print(f"ONNX Runtime: {args.threads} threads; torch on 1 thread while it runs (2 pools on the cores fight)")
        onnx_runs, file_mb = onnx_contenders(hf_model, twin, args.threads, onnx_folder)
        contenders = [
            Contender("twin, KV cache", twin_generate(twin, use_cache=True), uses_cache=True),
            Contender("transformers generate", hf_generate(hf_model), uses_cache=True),
            *onnx_runs,
        ]
    else:
        contenders = [
            Contender("twin, KV cache", twin_generate(twin, use_cache=True), uses_cache=True),
            Contender("twin, no cache", twin_generate(twin, use_cache=False), uses_cache=False),
            Contender("transformers generate", hf_generate(hf_model), uses_cache=True),
        ]
    for contender in contenders:
        contender.generate = with_progress(contender.generate, progress)
    random_tokens = torch.Generator().manual_seed(args.seed)
    vocab_size = hf_model.config.vocab_size
    prompts = torch.randint(0, vocab_size, (max(args.batch_sizes), args.prompt_len), generator=random_tokens)
    sequence = torch.randint(0, vocab_size, (1, args.positions[-1] + 1), generator=random_tokens)

    for contender in contenders:  # warm-up: the first calls allocate memory and pick kernels
        for batch in args.batch_sizes:
            contender.generate(prompts[:batch], 2, lambda token: None)

    llama_cpp_runs = llama_cpp_contenders(hf_model, args, onnx_folder) if args.backend == "onnx" else {}
    tokens_per_second, peak_memory, same_tokens = {}, {}, True
    llama_cpp_rates = {name: {} for name in llama_cpp_runs}
    for batch in args.batch_sizes:
        tokens_per_second[batch], peak_memory[batch], tokens, rates = measure_throughput(
            contenders, prompts[:batch], args.new_tokens, args.repeats, llama_cpp_runs
        )
        for name, rate in rates.items():
            llama_cpp_rates[name][batch] = rate
        exact = [contender.name for contender in contenders if contender.exact]
        same_tokens &= all(torch.equal(tokens[name], tokens["transformers generate"]) for name in exact)
    ms_per_token = measure_ms_per_token(contenders, sequence, args.positions, args.repeats)
    progress.close()
    onnx_dirs = {contender.name: contender.onnx_dir for contender in contenders if contender.onnx_dir is not None}
    return Results(tokens_per_second, peak_memory, ms_per_token, same_tokens, file_mb, onnx_dirs, llama_cpp_rates)


def llama_cpp_contenders(
    hf_model: GPT2LMHeadModel, args: argparse.Namespace, folder: str
) -> dict[str, Callable[[int], float]]:
    """llama.cpp's formats on the same weights (GGUF files written under `folder`), each as a run at a batch size
    that llama-batched-bench times the same way, when its tools are built; else a line why not, and none."""
    from measure import llama_cpp

    tools, reason = llama_cpp.tools_dir()
    if tools is None:
        print(reason)
        return {}
    print(f"Converting the same weights for llama.cpp ({', '.join(llama_cpp.FORMATS)}), to race", flush=True)
    ggufs = llama_cpp.convert(hf_model, tools, folder)
    timing = (args.threads, args.prompt_len, args.new_tokens)
    return {name: partial(llama_cpp.tokens_per_second, tools, gguf, *timing) for name, gguf in ggufs.items()}


def steps_to_generate(args: argparse.Namespace) -> int:
    """The tokens all contenders generate in one run_benchmark (counting a batch's step once): the progress bar's end.

    Per batch size: the warm-up's 2 tokens and the timed runs of every contender, each after an untimed token, and a
    profiled run of those whose memory torch allocates (not ONNX Runtime's); then `repeats` rounds of the
    time-per-token runs, a short run per position for each: a prompt and STEPS_PER_POSITION + 1 tokens with a cache,
    STEPS_PER_POSITION tokens without.
    """
    if args.backend == "tripy":
        cached, uncached, profiled = 2, 0, 2
    elif args.backend == "onnx":  # the twin, transformers, and a file per mode, int4's at two accuracy levels
        cached, uncached, profiled = 2 + len(ONNX_FILES) + 1, 0, 2
    else:
        cached, uncached, profiled = 2, 1, 3
    per_batch = (cached + uncached) * (2 + args.repeats * (1 + args.new_tokens)) + profiled * args.new_tokens
    ms_runs = cached * len(args.positions) * (STEPS_PER_POSITION + 1)
    ms_runs += uncached * len(args.positions) * STEPS_PER_POSITION
    ms_runs *= args.repeats  # rounds of them
    return len(args.batch_sizes) * per_batch + ms_runs


def with_progress(generate: Generate, progress: tqdm) -> Generate:
    """The same generation, ticking `progress` after each new token, once the caller's callback has run: a timing
    callback stamps the time first, so the tick is not counted in the token's step."""

    def run(prompt, new_tokens, on_token):
        def on_token_then_tick(token):
            on_token(token)
            progress.update()

        return generate(prompt, new_tokens, on_token_then_tick)

    return run


def print_results(results: Results, args: argparse.Namespace) -> None:
    names = list(results.ms_per_token)
    width = max(len(name) for name in names) + 2
    runs = f"fastest of {args.repeats} runs" if args.repeats > 1 else "one run"
    print(
        f"\ntokens/s: prompt of {args.prompt_len} tokens, {args.new_tokens} new tokens, {runs}; peak MB: tensors "
        "allocated while generating (torch.profiler), weights not counted"
    )
    print(f"{'':<{width}}" + "".join(f"{f'batch {b} tok/s':>16}{'peak MB':>10}" for b in results.tokens_per_second))
    for name in names:
        cells = "".join(
            f"{results.tokens_per_second[batch][name]:>16.1f}" + memory_cell(results.peak_memory_mb[batch].get(name))
            for batch in results.tokens_per_second
        )
        print(f"{name:<{width}}{cells}")

    positions = args.positions
    steps = f"{STEPS_PER_POSITION} steps" if args.repeats == 1 else f"{args.repeats} x {STEPS_PER_POSITION} steps"
    print(f"\nms per token at position (batch 1), median of {steps}")
    ratio_header = f"{positions[-1]} / {positions[0]}"
    print(f"{'':<{width}}" + "".join(f"{p:>8}" for p in positions) + f"{ratio_header:>12}")
    for name in names:
        times = results.ms_per_token[name]
        cells = "".join(f"{times[p]:>8.1f}" for p in positions)
        print(f"{name:<{width}}{cells}{times[positions[-1]] / times[positions[0]]:>11.2f}x")
    same = "yes" if results.same_tokens else "NO"
    if results.file_mb:
        print_onnx_ratios(results, width)
        print(f"\nThe float32 ones (twin, transformers, ONNX Runtime float32) generated the same tokens: {same}")
        print_llama_cpp(results, width)
    else:
        print(f"\nAll {len(names)} generated the same tokens: {same}")


def memory_cell(megabytes: float | None) -> str:
    return f"{'-':>10}" if megabytes is None else f"{megabytes:>10.1f}"


def print_onnx_ratios(results: Results, width: int) -> None:
    """Each ONNX Runtime contender's tokens/s as a multiple of transformers', and its file against float32's."""
    float32_mb = results.file_mb["ONNX Runtime float32"]
    batches = list(results.tokens_per_second)
    print("\nONNX Runtime: tokens/s as a multiple of transformers generate's; the file's MB (x float32's)")
    print(f"{'':<{width}}" + "".join(f"{f'batch {b}':>10}" for b in batches) + f"{'file MB':>20}")
    for name, megabytes in results.file_mb.items():
        speedups = "".join(
            f"{results.tokens_per_second[b][name] / results.tokens_per_second[b]['transformers generate']:>9.2f}x"
            for b in batches
        )
        print(f"{name:<{width}}{speedups}{megabytes:>11.1f} ({megabytes / float32_mb:.2f}x)")
    print("(peak MB -: ONNX Runtime allocates outside torch, where torch.profiler cannot see it)")


def print_llama_cpp(results: Results, width: int) -> None:
    """llama.cpp's tokens/s, and the fastest quantized ONNX Runtime row's as a multiple of llama.cpp Q4_0's."""
    if not results.llama_cpp:
        return
    batches = list(results.tokens_per_second)
    print("\nllama.cpp (llama-batched-bench) on the same weights, same threads, fastest of as many runs, in turn with")
    print("the others in each round: tokens/s")
    print(f"{'':<{width}}" + "".join(f"{f'batch {b} tok/s':>16}" for b in batches))
    for name, rates in results.llama_cpp.items():
        print(f"{name:<{width}}" + "".join(f"{rates[b]:>16.1f}" for b in batches))
    quantized = [name for name in results.file_mb if "float32" not in name]
    for batch in batches:
        fastest = max(quantized, key=lambda name: results.tokens_per_second[batch][name])
        ratio = results.tokens_per_second[batch][fastest] / results.llama_cpp["llama.cpp Q4_0"][batch]
        print(f"batch {batch}: {fastest} makes {ratio:.2f}x llama.cpp Q4_0's tokens/s")


def print_profiles(results: Results, threads: int) -> None:
    """ONNX Runtime's own profile of a decode step, by operator type, for each quantized file at its default math."""
    from measure.ort_profile import decode_profile, format_profile

    print("\nONNX Runtime's profiler: a decode step at batch 1 after a prompt of 32, by operator type")
    for name, onnx_dir in results.onnx_dirs.items():
        if "float32" not in name:
            print(format_profile(name, decode_profile(onnx_dir, threads)))


def save_chart(results: Results, path: str) -> None:
    """A PNG of milliseconds per token against position, one line per contender (batch 1)."""
    import matplotlib

    matplotlib.use("Agg")  # draws to files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    figure, axes = plt.subplots(figsize=(8, 5))
    # The twin with its cache and transformers take about the same time at every position: a solid line with filled
    # markers and a dashed one with hollow markers, drawn over it, keep both in sight.
    own_styles = iter([{"linestyle": "-", "marker": "o", "markersize": 8}, {"linestyle": ":", "marker": "s"}])
    hollow_dashed = {
        "linestyle": "--",
        "marker": "^",
        "markersize": 9,
        "markerfacecolor": "none",
        "markeredgewidth": 1.5,
    }
    for name, times in results.ms_per_token.items():
        style = hollow_dashed if name == "transformers generate" else next(own_styles)
        axes.plot(list(times), list(times.values()), label=name, linewidth=2, **style)
    axes.set_xlabel("position in the sequence (tokens)")
    axes.set_ylabel("ms per generated token (batch 1, log scale)")
    axes.set_title("Time per token as the sequence grows")
    # A log scale: without the cache a step grows ten-fold, and on a linear axis the cached lines would lie flat
    # along the bottom.
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    axes.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    axes.yaxis.set_minor_formatter(FormatStrFormatter("%g"))  # a log axis spanning one decade labels its minor ticks
    axes.set_xticks(list(next(iter(results.ms_per_token.values()))))
    axes.legend(loc="upper left")
    axes.grid(alpha=0.3, which="both")
    figure.tight_layout()
    with output_file(path, "--chart", replace=True) as temp:  # an earlier chart is replaced whole, never half
        figure.savefig(temp, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    run(main)
