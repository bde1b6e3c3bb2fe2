"""Every writer's output appears whole or not at all (cli/outputs.py): under a full disk, a folder made read-only or
removed while it is written, SIGTERM, and another run claiming the same path first.

The faults strike in this process, inside the real writer. A file-size limit (RLIMIT_FSIZE) makes the kernel fail
every write past 64 bytes, in whatever language the writer is (safetensors and tokenizers write from Rust), as a full
disk does. Otherwise the first file the writer opens for writing beside its target, through Python's open (ModelOpt's,
transformers', ONNX's, matplotlib's and save_quantized's writes go through it), raises ENOSPC or EROFS, or its folder
is removed, or the process sends itself SIGTERM, or another run's output appears at the target. Every script's
`cli.run` must then end in one line with exit status 2 (143 for SIGTERM), no traceback, and nothing left in the
folder: no target, no temporary copy.

The end-to-end cases run example.py as users do, all at once: two `--export-dir SAME --export-only` runs and two
`--export-onnx SAME --export-only` runs started together (one exits 0, the other 2, and the folder holds one run's
export), and SIGTERM sent, as `timeout -s TERM` sends it, while an ONNX export is being written.
"""

import builtins
import errno
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx
import pytest
import torch
from helpers import CALIBRATION_PARAGRAPHS, REPO, make_gpt2

import benchmark
import cli
import evaluate
import example
import train
from cli import outputs
from exports import checkpoint, onnx_export
from exports.checkpoint_loader import read_checked_export
from quant.auto_quantize import Recipe, save_recipe
from quant.save_restore import save_step
from quantization import modelopt_quantize

PROG = "example.py"
FAULTS = ["full disk", "file size limit", "read-only folder", "folder removed", "SIGTERM", "another run"]
SIGTERM_EXIT = 128 + signal.SIGTERM
# A file-size limit set here would be inherited by a subprocess started meanwhile: this file runs after the
# background runs of example.py (conftest.py), and waits for the last of them.
RUNS_AFTER_THE_BACKGROUND = True


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, background_runs) -> torch.nn.Module:
    background_runs.wait()
    calibration = tmp_path_factory.mktemp("calibration") / "calibration.txt"
    calibration.write_text("\n\n".join(CALIBRATION_PARAGRAPHS) + "\n")
    model = make_gpt2(n_embd=128, n_layer=1, n_head=2, n_positions=32)
    return modelopt_quantize(model, "int8-weight-only", str(calibration), num_samples=4)


def tiny_onnx_model() -> onnx.ModelProto:
    """A valid one-node graph: what onnx_model traces takes seconds, and these tests are about how it is written."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "tiny", [x], [y])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", onnx_export.OPSET)])


def write_export_dir(model, target):
    checkpoint.export_step(model, target)


def write_export_onnx(model, target):
    onnx_export.export_step("tiny", model, "int8-weight-only", None, target)


def write_save_quantized(model, target):
    save_step(model, target)


def write_recipe(model, target):
    save_recipe(Recipe({"transformer.h.0.attn.c_attn": "int8-weight-only"}, 8.0), target)


def write_evaluate_chart(model, target):
    rows = [evaluate.Row(evaluate.UNQUANTIZED, 170.0, 15_000_000, 0.0, 1.0), evaluate.Row("int8", 171, 9, 1, 1)]
    evaluate.save_chart(rows, target)


def write_benchmark_chart(model, target):
    times = {1: 2.0, 8: 3.0}
    benchmark.save_chart(benchmark.Results({}, {}, {"twin": times, "transformers generate": times}, True), target)


def write_train_checkpoint(model, target):
    model = make_gpt2(n_embd=128, n_layer=1, n_head=2, n_positions=16)
    train.save(model, target, False, torch.arange(64), "held-out text\n")


# writer -> (the flag it reports, the target's name, what writes it)
WRITERS = {
    "--export-dir": ("--export-dir", "export", write_export_dir),
    "--export-onnx": ("--export-onnx", "onnx", write_export_onnx),
    "--save-quantized": ("--save-quantized", "model.pt", write_save_quantized),
    "--recipe-out": ("--recipe-out", "recipe.json", write_recipe),
    "evaluate.py --chart": ("--chart", "quality.png", write_evaluate_chart),
    "benchmark.py --chart": ("--chart", "speed.png", write_benchmark_chart),
    "train.py --out-dir": ("--out-dir", "model", write_train_checkpoint),
}
REPLACED = {"evaluate.py --chart", "benchmark.py --chart"}  # a chart is made to be replaced: a later one wins


def unhandled_sigterm(signum, frame):
    raise AssertionError("SIGTERM reached no handler of cli.run's")


def strike_on_first_write(monkeypatch, folder: Path, fault: str, target: Path) -> list[str]:
    """Makes the first file opened for writing inside `folder` meet `fault`; returns the list it records that in."""
    real_open = builtins.open
    struck = []

    def faulty_open(file, mode="r", *args, **kwargs):
        writing = isinstance(file, (str, os.PathLike)) and any(flag in mode for flag in "wax+")
        if not writing or struck or not os.path.abspath(file).startswith(str(folder)):
            return real_open(file, mode, *args, **kwargs)
        struck.append(os.fspath(file))
        if fault == "full disk":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), file)
        if fault == "read-only folder":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), file)
        if fault == "folder removed":
            shutil.rmtree(folder)  # the open below fails, and so does every write after it
        elif fault == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)  # what `timeout -s TERM` sends; Python acts on it right away
        elif fault == "another run":  # its output lands first: a folder with a file in it, or a file
            if target.suffix:
                target.write_bytes(b"the other run's\n")
            else:
                target.mkdir()
                (target / "config.json").write_bytes(b"the other run's\n")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", faulty_open)
    monkeypatch.setattr(io, "open", faulty_open)  # pathlib's write_text
    return struck


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("writer", WRITERS)
def test_a_writer_under_a_fault_leaves_nothing_and_says_so_in_one_line(
    quantized, tmp_path, monkeypatch, capsys, writer, fault
):
    flag, name, write = WRITERS[writer]
    monkeypatch.setattr(onnx_export, "onnx_model", lambda twin: tiny_onnx_model())
    folder = tmp_path / "outputs"
    folder.mkdir()
    target = folder / name
    struck = strike_on_first_write(monkeypatch, folder, fault, target) if fault != "file size limit" else [True]
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    # Without cli.run's own handler, SIGTERM would end pytest itself: this one makes it a failure of this test.
    outside_handler = signal.signal(signal.SIGTERM, unhandled_sigterm)
    if fault == "file size limit":  # the kernel stops each write at 64 bytes into a file, as a full disk stops it
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, limits[1]))  # Python ignores SIGXFSZ: the write fails
    try:
        cli.run(lambda: write(quantized, str(target)), PROG)
        status = 0
    except SystemExit as exit_info:
        status = exit_info.code
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        handler_after = signal.signal(signal.SIGTERM, outside_handler)
    monkeypatch.undo()
    stderr = capsys.readouterr().err
    assert struck, "the writer opened no file beside its target"
    if fault == "another run" and writer in REPLACED:
        assert status == 0 and target.read_bytes()[:4] == b"\x89PNG"  # ours replaced theirs
        assert sorted(os.listdir(folder)) == [name]
        return
    last_line = stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr
    reason = {
        "full disk": f"error: cannot write {flag} {target}: No space left on device; nothing was written",
        "file size limit": f"error: cannot write {flag} {target}: File too large; nothing was written",
        "read-only folder": f"error: cannot write {flag} {target}: Read-only file system; nothing was written",
        "folder removed": f"error: cannot write {flag} {target}: No such file or directory; nothing was written",
        "SIGTERM": "terminated",
        "another run": f"error: {flag} {target} was written by another run while this one worked",
    }[fault]
    assert last_line.startswith(f"{PROG}: {reason}"), stderr
    assert status == (SIGTERM_EXIT if fault == "SIGTERM" else 2)
    if fault == "folder removed":
        assert not folder.exists()
    elif fault == "another run":  # theirs is left as it was, and ours is gone
        assert os.listdir(folder) == [name]
        assert (target.read_bytes() if target.suffix else (target / "config.json").read_bytes()) == b"the other run's\n"
    else:
        assert os.listdir(folder) == []
    assert handler_after is unhandled_sigterm  # cli.run gives the handler it found back


def test_a_folder_claimed_onto_an_empty_folder_or_with_overwrite_keeps_the_rules(tmp_path):
    """An empty folder at the target is taken; with overwrite, a user's other files stay and namesakes are
    replaced; the written files get the modes the umask gives, not mkdtemp's owner-only ones."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with outputs.output_folder(str(empty), "--export-dir") as folder:
        Path(folder, "a").write_text("new\n")
    assert os.listdir(empty) == ["a"]
    umask = os.umask(0)
    os.umask(umask)
    assert empty.stat().st_mode & 0o777 == 0o777 & ~umask and (empty / "a").stat().st_mode & 0o777 == 0o666 & ~umask
    (empty / "mine").write_text("mine\n")
    with outputs.output_folder(str(empty), "--export-dir", overwrite=True) as folder:
        Path(folder, "a").write_text("newer\n")
    assert (empty / "a").read_text() == "newer\n" and (empty / "mine").read_text() == "mine\n"
    assert sorted(os.listdir(tmp_path)) == ["empty"]  # no temporary folder left beside it


def test_the_folders_made_for_a_target_go_when_it_fails(tmp_path):
    target = tmp_path / "a" / "b" / "export"
    with pytest.raises(cli.UsageError, match="No space left on device"):
        with outputs.output_folder(str(target), "--export-dir"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert os.listdir(tmp_path) == []


# --- end to end: the command line, run as users run it ---------------------------------------------------------


def holds_a_partial_copy(parent: Path) -> bool:
    return any(name.startswith(".") and "-partial-" in name for name in os.listdir(parent))


@pytest.fixture(scope="module")
def races(tmp_path_factory):
    """Two runs on one --export-dir, two on one --export-onnx (int8 against float8, so a mix would show), and one
    sent SIGTERM while its ONNX folder is being written: all started at once."""
    tmp = tmp_path_factory.mktemp("races")
    model_dir = tmp / "tiny"
    make_gpt2(n_embd=128, n_layer=1, n_head=2, n_positions=64).save_pretrained(model_dir)
    calibration = tmp / "calibration.txt"
    calibration.write_text("\n\n".join(CALIBRATION_PARAGRAPHS) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf-home"), "OMP_NUM_THREADS": "1"}
    common = ["--model-type", str(model_dir), "--calibration-data", str(calibration), "--num-calibration-samples", "4"]
    folders = {name: tmp / name / "out" for name in ("export", "onnx", "terminated")}  # a parent each
    for folder in folders.values():
        folder.parent.mkdir()

    def command(mode: str, flag: str, folder: str) -> list[str]:
        return [
            sys.executable,
            "example.py",
            *common,
            "--quant-mode",
            mode,
            flag,
            str(folders[folder]),
            "--export-only",
        ]

    def run(argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    def terminate_while_writing() -> subprocess.CompletedProcess:
        """`timeout -s TERM` at the moment that matters: once the temporary ONNX folder exists."""
        argv = command("int8-weight-only", "--export-onnx", "terminated")
        with subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
            while not holds_a_partial_copy(folders["terminated"].parent) and p.poll() is None:
                time.sleep(0.02)
            p.send_signal(signal.SIGTERM)
            stdout, stderr = p.communicate(timeout=120)
        return subprocess.CompletedProcess(argv, p.returncode, stdout, stderr)

    pairs = {
        "export int8": command("int8-weight-only", "--export-dir", "export"),
        "export float8": command("float8", "--export-dir", "export"),
        "onnx int8": command("int8-weight-only", "--export-onnx", "onnx"),
        "onnx float8": command("float8", "--export-onnx", "onnx"),
    }
    with ThreadPoolExecutor(max_workers=5) as pool:  # each pair starts together: both pass the check that it is free
        futures = {name: pool.submit(run, argv) for name, argv in pairs.items()}
        futures["terminated"] = pool.submit(terminate_while_writing)
        results = {name: future.result() for name, future in futures.items()}
    return results, folders


@pytest.mark.parametrize("flag, name", [("--export-dir", "export"), ("--export-onnx", "onnx")])
def test_two_runs_writing_one_folder_one_wins_and_the_folder_is_one_export(races, capsys, flag, name):
    results, folders = races
    runs = {mode: results[f"{name} {mode}"] for mode in ("int8", "float8")}
    assert sorted(run.returncode for run in runs.values()) == [0, 2], {m: r.stderr for m, r in runs.items()}
    winner = next(mode for mode, run in runs.items() if run.returncode == 0)
    loser = runs["float8" if winner == "int8" else "int8"]
    assert "Traceback" not in loser.stderr
    assert loser.stderr.strip().splitlines()[-1] == (
        f"example.py: error: {flag} {folders[name]} was written by another run while this one worked: it is left "
        "as that run wrote it; name a new one"
    )
    expected_mode = "int8-weight-only" if winner == "int8" else "float8"
    folder = str(folders[name])
    if flag == "--export-dir":
        assert read_checked_export(folder)[1] == expected_mode
    else:
        metadata = {prop.key: prop.value for prop in onnx.load(os.path.join(folder, "model.onnx")).metadata_props}
        assert json.loads(metadata["gpt2_quantization"])["quant_mode"] == expected_mode
    # The loader checks each tensor against the config: a mix of the two runs' files would not load.
    example.main(["--model-type", folder, "--max-new-tokens", "4", "--top-k", "1"])
    assert "Generated 4 tokens" in capsys.readouterr().out
    assert not holds_a_partial_copy(folders[name].parent)


HALF_BUILT = """
import signal
import sys
import cli

class ProgressBar:
    def __init__(self):
        signal.raise_signal(getattr(signal, sys.argv[1]))  # the signal lands while the bar is being built
        self.position = 0

    def __del__(self):  # as tqdm's: closes what __init__ set up
        self.position

cli.run(ProgressBar, "half_built.py")
"""


@pytest.mark.parametrize(
    "signal_name, status, stderr",
    [("SIGTERM", SIGTERM_EXIT, "half_built.py: terminated\n"), ("SIGINT", 130, "\nhalf_built.py: interrupted\n")],
)
def test_a_stop_inside_a_constructor_is_one_line_without_the_finalizers_traceback(signal_name, status, stderr):
    """SIGTERM and Ctrl-C are raised wherever the run is, inside an object's __init__ too (tqdm's, in one CI run): the
    half-built object's finalizer then fails, which is the stop's doing and no bug to print."""
    result = subprocess.run([sys.executable, "-c", HALF_BUILT, signal_name], cwd=REPO, capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (status, stderr)


def test_sigterm_during_an_export_is_one_line_exit_143_and_leaves_nothing(races):
    results, folders = races
    result = results["terminated"]
    assert result.returncode == SIGTERM_EXIT, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "example.py: terminated"
    assert not folders["terminated"].exists() and not holds_a_partial_copy(folders["terminated"].parent)
