"""benchmark.py runs end to end on a tiny GPT-2, measures memory correctly, and rejects bad options.

Timings are not asserted: they depend on the machine and on whatever else runs on it.
"""

import matplotlib.image
import pytest
import torch
from helpers import usage_error

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
        (["--new-tokens", "0"], "must be >= 1"),
        (["--n-embd", "100", "--n-head", "12"], "must be a positive multiple of --n-head"),
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


def test_onnx_backend_races_every_mode_and_reports_files_and_ratios(capsys, restore_torch_threads):
    results = benchmark.main(
        ["--tiny", "--backend", "onnx", "--threads", "1", "--n-layer", "1", "--batch-sizes", "1,2", "--positions", "8"]
    )
    printed = capsys.readouterr().out
    onnx_names = [
        "ONNX Runtime float32",
        "ONNX Runtime int8",
        "ONNX Runtime int4",
        "ONNX Runtime int4, float32 math",
        "ONNX Runtime float8 (no CPU kernel)",
    ]
    assert list(results.tokens_per_second[2]) == ["twin, KV cache", "transformers generate", *onnx_names]
    assert results.same_tokens  # ONNX Runtime's float32 file picks transformers' greedy tokens
    assert list(results.file_mb) == onnx_names
    sizes = results.file_mb
    assert sizes["ONNX Runtime int4"] < sizes["ONNX Runtime int8"] < sizes["ONNX Runtime float32"]
    assert "ONNX Runtime: tokens/s as a multiple of transformers generate's" in printed
    assert list(results.peak_memory_mb[1]) == ["twin, KV cache", "transformers generate"]  # torch's allocations only
