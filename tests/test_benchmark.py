"""benchmark.py runs end to end on a tiny GPT-2, measures memory correctly, and rejects bad options.

Timings are not asserted: they depend on the machine and on whatever else runs on it.
"""

import os
import re
import subprocess
import sys

import matplotlib.image
import pytest
import torch
from helpers import REPO, usage_error
from transformers import GPT2Config

import benchmark

NAMES = ["twin, KV cache", "twin, no cache", "transformers generate"]


@pytest.fixture
def restore_torch_threads():
    """The benchmark sets torch's thread count for the whole process; the tests after this one keep theirs."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_tiny_benchmark_runs_end_to_end(capsys, restore_torch_threads, tmp_path):
    # One thread: a tiny model gains nothing from two, and they wait on each other when other processes share the CPU.
    chart = tmp_path / "time-per-token.png"
    results = benchmark.main(["--tiny", "--threads", "1", "--chart", str(chart)])
    printed = capsys.readouterr().out
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(chart).shape[:2] == (500, 800)  # decodes the whole file: a truncated PNG raises

    # The twin holds Hugging Face's weights, so greedy decoding picks the same tokens: all three did the same work.
    assert results.same_tokens
    assert "All 3 generated the same tokens: yes" in printed
    for batch in (1, 8):
        assert list(results.tokens_per_second[batch]) == NAMES
        assert all(value > 0 for value in results.tokens_per_second[batch].values())
        assert all(value > 0 for value in results.peak_memory_mb[batch].values())
    for name in NAMES:
        assert list(results.ms_per_token[name]) == [8, 16, 32]
        assert all(ms > 0 for ms in results.ms_per_token[name].values())
        assert sum(line.startswith(name) for line in printed.splitlines()) == 2  # a row in each table


def start_cli_runs(background, tmp_path_factory):
    """`python benchmark.py --tiny --threads 1`, in the background (conftest.py): a Future of the run."""
    command = [sys.executable, "benchmark.py", "--tiny", "--threads", "1"]
    env = dict(os.environ)
    return background.submit(subprocess.run, command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_progress_bar_counts_every_token_to_its_end_on_stderr(cli_runs):
    """A real run takes minutes: a bar on stderr ticks with every token generated, profiled runs included, and ends
    at the total it announced (a wrong count would end short of it or past it). The profiler's own log lines stay
    hidden."""
    result = cli_runs.of(__name__).result()
    assert result.returncode == 0, result.stderr
    updates = [line for line in re.split(r"[\r\n]+", result.stderr) if line.startswith("Generating:")]
    done, total = map(int, re.search(r"(\d+)/(\d+) \[", updates[-1]).groups())
    assert done == total == benchmark.steps_to_generate(benchmark.parse_args(["--tiny", "--threads", "1"]))
    assert "profiler" not in result.stderr
    assert "one run;" in result.stdout  # --tiny times one run: not "fastest of 1 runs"


def test_defaults_are_gpt2s_shape():
    args = benchmark.parse_args([])
    config = GPT2Config()  # gpt2, 124M parameters
    assert (args.n_layer, args.n_head, args.n_embd) == (config.n_layer, config.n_head, config.n_embd)
    assert benchmark.BLOCK_SIZE == config.n_positions


def test_tiny_sets_defaults_and_given_options_still_count():
    args = benchmark.parse_args(["--tiny", "--n-layer", "3", "--positions", "8,16"])
    assert (args.n_layer, args.positions, args.n_embd, args.repeats) == (3, [8, 16], 64, 1)


def test_peak_memory_counts_the_most_held_at_once():
    megabyte = 2**20

    def allocate(prompt, new_tokens, on_token):
        held = torch.empty(3 * megabyte, dtype=torch.uint8)
        del held
        held = torch.empty(2 * megabyte, dtype=torch.uint8)
        also_held = torch.empty(4 * megabyte, dtype=torch.uint8)  # 6 MB at once: the peak
        return torch.cat([held[:1], also_held[:1]])

    assert benchmark.peak_memory_mb(allocate, torch.zeros(1, 1), 1) == pytest.approx(6.0, abs=0.01)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--positions", "64,32"], "--positions must be ascending"),
        (["--positions", "32,1020"], "--positions must stay below"),
        (["--batch-sizes", "1,x"], "comma-separated integers"),
        (["--prompt-len", "1000", "--new-tokens", "100"], "must be at most 1024"),
        (["--new-tokens", "0"], "--new-tokens must be at least 1, got 0"),
        (["--n-embd", "100", "--n-head", "12"], "--n-embd (100) must be a multiple of --n-head (12)"),
        (["--chart", "chart.jpg"], "--chart must name a .png file"),
    ],
)
def test_bad_options_exit_with_status_2_and_say_what_is_wrong(argv, message, capsys):
    assert message in usage_error(benchmark.main, argv, "benchmark.py", capsys)


def test_tripy_backend_runs_model_py_and_agrees_with_transformers(capsys, restore_torch_threads):
    """On the CPU executor (no GPU): a smoke test that the Tripy contender runs and generates transformers' tokens."""
    results = benchmark.main(["--backend", "tripy", "--tiny", "--threads", "1", "--batch-sizes", "1,2"])
    name = "Tripy (TensorRT)" if torch.cuda.is_available() else "Tripy, CPU executor (smoke test)"
    assert list(results.tokens_per_second[2]) == [name, "transformers generate"]
    assert results.same_tokens
    assert "All 2 generated the same tokens: yes" in capsys.readouterr().out


@pytest.mark.skipif(benchmark.tripy_on_gpu(), reason="with TensorRT and a GPU, --backend tripy runs the real engine")
@pytest.mark.parametrize("gpu", [False, True])
def test_tripy_backend_on_the_cpu_executor_needs_tiny(monkeypatch, capsys, gpu):
    """Without TensorRT, a GPU changes nothing: model.py runs on the CPU executor, and transformers beside it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert "add --tiny" in usage_error(benchmark.main, ["--backend", "tripy"], "benchmark.py", capsys)


def test_onnx_backend_races_every_mode_and_reports_files_and_ratios(
    capsys, restore_torch_threads, monkeypatch, tmp_path
):
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path))  # no llama.cpp tools there: its rows are skipped, saying why
    argv = ["--tiny", "--backend", "onnx", "--threads", "1", "--n-layer", "1"]
    argv += ["--batch-sizes", "1,2", "--positions", "8", "--profile"]
    results = benchmark.main(argv)
    captured = capsys.readouterr()
    printed = captured.out
    updates = [line for line in re.split(r"[\r\n]+", captured.err) if line.startswith("Generating:")]
    done, total = map(int, re.search(r"(\d+)/(\d+) \[", updates[-1]).groups())
    assert done == total == benchmark.steps_to_generate(benchmark.parse_args(argv))  # the bar counts ONNX Runtime too
    onnx_names = [
        "ONNX Runtime float32",
        "ONNX Runtime int8",
        "ONNX Runtime int8, int8 output layer",
        "ONNX Runtime int8 W8A8",
        "ONNX Runtime int4",
        "ONNX Runtime int4, float32 math",
        "ONNX Runtime int4, int4 output layer",
        "ONNX Runtime int4, ORT flavor",
        "ONNX Runtime int4, int4 output layer, ORT flavor",
        "ONNX Runtime int4, int4 output layer, int8 KV cache, ORT flavor",
    ]
    assert list(results.tokens_per_second[2]) == ["twin, KV cache", "transformers generate", *onnx_names]
    assert results.same_tokens  # ONNX Runtime's float32 file picks transformers' greedy tokens
    assert list(results.file_mb) == onnx_names
    sizes = results.file_mb
    assert sizes["ONNX Runtime int4"] < sizes["ONNX Runtime int8"] < sizes["ONNX Runtime float32"]
    assert sizes["ONNX Runtime int8"] < sizes["ONNX Runtime int8 W8A8"] < sizes["ONNX Runtime float32"]  # + factors
    assert "ONNX Runtime: tokens/s as a multiple of transformers generate's" in printed
    assert list(results.peak_memory_mb[1]) == ["twin, KV cache", "transformers generate"]  # torch's allocations only
    assert (
        f"llama.cpp rows skipped: no llama-batched-bench, llama-quantize, convert_hf_to_gguf.py in {tmp_path}"
        in printed
    )
    assert "ONNX Runtime int4, int4 output layer:" in printed and "MatMulNBits" in printed  # --profile
    assert "ONNX Runtime int4, int4 output layer, ORT flavor:" in printed and "GroupQueryAttention" in printed
    assert "ONNX Runtime int4, int4 output layer, int8 KV cache, ORT flavor:" in printed
