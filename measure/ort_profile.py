"""Where ONNX Runtime spends a decode step: its own per-operator profiler, summed by operator type.

benchmark.py --profile prints it for each quantized file: what the graph's kernels cost per generated token, and how
much of the step's wall time is spent outside them (feeding inputs, reading outputs, the loop around session.run).
"""

import json
import os
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from exports import onnx_runtime


@dataclass
class Profile:
    step_ms: float  # wall time of one decode step, session.run and the loop around it
    operator_ms: dict[str, float]  # operator type -> kernel milliseconds per step, largest first


def decode_profile(onnx_dir: str, threads: int, prompt_len: int = 32, steps: int = 16) -> Profile:
    """Profiles `steps` cached decode steps at batch 1 after a prompt of prompt_len random tokens, at the default
    (fast) accuracy level, with the last position's logits only, as generation runs."""
    with tempfile.TemporaryDirectory() as folder:
        prefix = os.path.join(folder, "ort_profile")
        session = onnx_runtime.session(onnx_dir, "int8", threads, last_position_only=True, profile=prefix)
        model = onnx_runtime.OnnxGPT(session)
        vocab = session.get_outputs()[0].shape[2]
        token = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))
        with onnx_runtime.torch_threads(1):
            _, keys, values = model.forward_with_cache(token)
            token = token[:, -1:]
            start = time.perf_counter()
            for _ in range(steps):
                _, keys, values = model.forward_with_cache(token, keys, values)
            step_ms = 1000 * (time.perf_counter() - start) / steps
        with open(session.end_profiling()) as file:
            events = json.load(file)
    runs = sorted(event["ts"] for event in events if event.get("name") == "model_run")
    decode_start = runs[1]  # the first run is the prompt's
    operator_us = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= decode_start:
            operator_us[event["args"]["op_name"]] += event["dur"]
    ranked = sorted(operator_us.items(), key=lambda item: -item[1])
    return Profile(step_ms, {op: us / 1000 / steps for op, us in ranked})


def format_profile(name: str, profile: Profile, top: int = 8) -> str:
    """The top operators' ms per step and share of the step's wall time, then the rest and what is outside kernels."""
    lines = [f"{name}: {profile.step_ms:.2f} ms per decode step (batch 1)"]
    kernels = sum(profile.operator_ms.values())
    for op, ms in list(profile.operator_ms.items())[:top]:
        lines.append(f"  {op:<24}{ms:>8.2f} ms{100 * ms / profile.step_ms:>6.1f}%")
    rest = sum(list(profile.operator_ms.values())[top:])
    lines.append(f"  {'other operators':<24}{rest:>8.2f} ms{100 * rest / profile.step_ms:>6.1f}%")
    outside = max(profile.step_ms - kernels, 0.0)
    lines.append(f"  {'outside the kernels':<24}{outside:>8.2f} ms{100 * outside / profile.step_ms:>6.1f}%")
    return "\n".join(lines)
