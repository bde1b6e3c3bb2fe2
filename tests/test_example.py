"""End-to-end tests of example.py, run the way users run it: `python example.py ...` in a subprocess, on the twin.

Each run spends seconds importing torch, transformers and ModelOpt, so start_cli_runs starts every run of this file
as the session starts, in the background (conftest.py: two at a time, one thread each); each test then waits for the
runs it checks.
Every run sees an unreachable Hub and an empty Hugging Face cache, whatever the machine.
"""

import json
import os
import re
import socket
import subprocess
import sys
from concurrent.futures import Future

import pytest
import torch
from helpers import (
    CALIBRATION_PARAGRAPHS,
    MIXED_LAYER_QUANT_MODES,
    REPO,
    RUN_BEFORE_TORCH,
    assert_usage_error,
    make_gpt2,
    usage_error,
)

import config
import example
import reference
from cli import UsageError
from measure.twin import load_twin
from sources import hub
from sources.hub import BUNDLED_MODEL_DIR, load_hf_model
from sources.tokenizer import gpt2_encoding

NVTRIPY_INSTALL = "pip install nvtripy==0.1.7 -f https://nvidia.github.io/TensorRT-Incubator/packages.html"
PROMPT = "The town council voted"  # 4 tokens
NEW_TOKENS = 8
FALLBACK_SEED = 3
PROGRESS_BAR = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")  # tqdm's: "Calibrating:  50%|█████     | 2/4 [00:01<00:01, ..."
EXPORTED_ALGORITHM = {
    "float8": "FP8",
    "int8-weight-only": "W8A16",
    "int4-weight-only": "W4A16_AWQ",
    "int8-smoothquant": "W8A8_SQ_PER_CHANNEL",
}


def run_arguments(
    checkpoint: str, calibration: str, export_dir: str, not_a_checkpoint: str, narrow_checkpoint: str, tmp: str
) -> dict[str, list]:
    """Every run of this file, by name: its command-line arguments. The slowest come first."""
    generate = ["--backend", "torch", "--input-text", PROMPT, "--max-new-tokens", str(NEW_TOKENS)]
    on_checkpoint = [*generate, "--model-type", checkpoint]
    calibrate = ["--calibration-data", calibration, "--num-calibration-samples", "4"]
    auto = [*on_checkpoint, "--quant-mode", "auto", *calibrate]
    return {
        "auto": [*auto, "--effective-bits", "6", "--recipe-out", f"{tmp}/saved.json", "--export-dir", f"{tmp}/mixed"],
        "auto recipe": [*auto, "--recipe", f"{tmp}/mixed.json"],
        "int4-weight-only": [*on_checkpoint, "--quant-mode", "int4-weight-only", *calibrate],
        # Into a folder that holds a file of the user's: --overwrite replaces the export's files, and only those.
        "float8": [*on_checkpoint, "--quant-mode", "float8", *calibrate, "--export-dir", export_dir, "--overwrite"],
        # More samples than the file holds: the run uses, and reports, the 4 there are.
        "int8-weight-only": [
            *on_checkpoint,
            "--quant-mode",
            "int8-weight-only",
            "--calibration-data",
            calibration,
            "--num-calibration-samples",
            "100000",
        ],
        # --verbose prints every quantizer: SmoothQuant's factors and the input amaxes among them.
        "int8-smoothquant": [*on_checkpoint, "--quant-mode", "int8-smoothquant", *calibrate, "--verbose"],
        "greedy": [*on_checkpoint, "--top-k", "1"],
        "fallback": [*generate, "--seed", str(FALLBACK_SEED)],
        # Bad input: first what needs a model or the Hub, then what is caught before anything heavy is imported.
        "hub model offline": ["--backend", "torch", "--model-type", "gpt2-medium"],
        "not a checkpoint": ["--backend", "torch", "--model-type", not_a_checkpoint],
        "prompt too long": [*on_checkpoint, "--max-new-tokens", "125"],  # 4 + 125 tokens; the context is 128
        "int4 on a width not a multiple of 128": [
            *generate,
            "--model-type",
            narrow_checkpoint,
            "--quant-mode",
            "int4-weight-only",
        ],
        "unknown model": ["--model-type", "gpt3"],
        "empty prompt": ["--input-text", ""],
        "no new tokens": ["--max-new-tokens", "0"],
        "not a number": ["--max-new-tokens", "many"],
        "zero temperature": ["--temperature", "0"],
        "zero top-k": ["--top-k", "0"],
        "missing calibration file": ["--quant-mode", "int8-weight-only", "--calibration-data", "no/such/file.txt"],
        "export without quantizing": ["--export-dir", export_dir],
        "export-only without a directory": ["--quant-mode", "float8", "--export-only"],
        "calibration without quantizing": ["--calibration-data", calibration],
        "unsupported calibration file": [
            "--quant-mode",
            "float8",
            "--calibration-data",
            calibration.replace(".txt", ".csv"),
        ],
        "no calibration samples": ["--quant-mode", "float8", "--num-calibration-samples", "0"],
        "recipe for another model": [*auto, "--recipe", f"{tmp}/other.json"],
        "effective bits below int4": ["--quant-mode", "auto", "--effective-bits", "3.5"],
        "effective bits above unquantized": ["--quant-mode", "auto", "--effective-bits", "17"],
        "auto without a budget or recipe": ["--quant-mode", "auto"],
        "effective bits without auto": ["--quant-mode", "float8", "--effective-bits", "6"],
        "missing recipe": ["--quant-mode", "auto", "--recipe", "no/such/recipe.json"],
        "tripy": ["--backend", "tripy", "--model-type", checkpoint],
        "tripy-cpu int4-weight-only": [
            *on_checkpoint,
            "--quant-mode",
            "int4-weight-only",
            *calibrate,
            "--backend",
            "tripy-cpu",
        ],
    }


USERS_FILE = "notes.txt"  # a file of the user's in the export folder, which --overwrite leaves alone


def start_cli_runs(background, tmp_path_factory) -> dict:
    """Every run of this file, started in the background (conftest.py): {"runs": name -> Future of its
    subprocess.CompletedProcess, "checkpoint": ..., "export_dir": ...}."""
    # A small GPT-2 checkpoint: 128 wide, the least int4 takes (one block of 128 inputs), 128 positions.
    checkpoint = tmp_path_factory.mktemp("gpt2-128")
    make_gpt2(n_embd=128, n_layer=2, n_head=4, n_positions=128).save_pretrained(checkpoint)
    export_dir = tmp_path_factory.mktemp("export") / "gpt2-float8"
    export_dir.mkdir()
    (export_dir / USERS_FILE).write_text("mine\n")
    (export_dir / "config.json").write_text("{}\n")  # replaced by the export
    tmp = tmp_path_factory.mktemp("example-runs")
    calibration = tmp / "calibration.txt"
    calibration.write_text("\n\n".join(CALIBRATION_PARAGRAPHS) + "\n")
    calibration.with_suffix(".csv").write_text("text\n" + "\n".join(CALIBRATION_PARAGRAPHS) + "\n")
    not_a_checkpoint = tmp / "bert"
    not_a_checkpoint.mkdir()
    (not_a_checkpoint / "config.json").write_text(json.dumps({"model_type": "bert"}))
    narrow_checkpoint = tmp / "gpt2-192"
    make_gpt2(n_embd=192, n_layer=1, n_head=4, n_positions=32).save_pretrained(narrow_checkpoint)
    # A recipe for the checkpoint's two blocks, and one for a model of three.
    layers = {layer: mode or "unquantized" for layer, mode in MIXED_LAYER_QUANT_MODES.items()}
    (tmp / "mixed.json").write_text(json.dumps({"effective_bits": 6.0, "layers": layers}))
    other = dict(layers, **{layer.replace("h.1.", "h.2."): mode for layer, mode in layers.items()})
    (tmp / "other.json").write_text(json.dumps({"effective_bits": 6.0, "layers": other}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf-home"), "OMP_NUM_THREADS": "1"}

    def run(arguments: list[str]) -> subprocess.CompletedProcess:
        command = [sys.executable, "example.py", *arguments]
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    arguments = run_arguments(
        str(checkpoint), str(calibration), str(export_dir), str(not_a_checkpoint), str(narrow_checkpoint), str(tmp)
    )
    runs = {name: background.submit(run, args) for name, args in arguments.items()}
    return {"runs": runs, "checkpoint": str(checkpoint), "export_dir": str(export_dir)}


@pytest.fixture
def runs(cli_runs) -> dict[str, Future]:
    return cli_runs.of(__name__)["runs"]


@pytest.fixture
def checkpoint(cli_runs) -> str:
    return cli_runs.of(__name__)["checkpoint"]


@pytest.fixture
def export_dir(cli_runs) -> str:
    return cli_runs.of(__name__)["export_dir"]


@pytest.mark.parametrize("name", ["float8", "auto"])
def test_stderr_holds_only_progress_bars(runs, name):
    """Library warnings understood as harmless (ModelOpt's export, transformers' renamed torch_dtype, AutoQuantize's
    notes) are silenced as the script starts (cli/library_warnings.py): calibrating, searching and exporting leave
    nothing on stderr but the progress bars."""
    succeeded(runs, name)
    lines = [line for line in re.split(r"[\r\n]", runs[name].result().stderr) if line.strip()]
    assert [line for line in lines if not PROGRESS_BAR.search(line)] == []


def succeeded(runs: dict[str, Future], name: str) -> str:
    """The standard output of a run that must have succeeded."""
    result = runs[name].result()
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def response(stdout: str) -> str:
    """The prompt and the generated text, printed between two separator lines."""
    _, text, after = stdout.split(example.SEPARATOR)
    assert text.startswith("\n") and text.endswith("\n")
    assert f"Generated {NEW_TOKENS} tokens in " in after
    return text[1:-1]


def test_greedy_generation_matches_hugging_face(runs, checkpoint):
    """With --top-k 1 sampling is greedy, so the text must be Hugging Face's greedy continuation."""
    stdout = succeeded(runs, "greedy")
    assert "Backend: torch (PyTorch twin on CPU" in stdout
    assert f"Model: {checkpoint} (" in stdout

    encoding = gpt2_encoding()
    hf_model = load_hf_model(checkpoint)
    idx = torch.tensor([encoding.encode(PROMPT)])
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            next_token = hf_model(idx).logits[:, -1].argmax(dim=-1, keepdim=True)
            idx = torch.cat([idx, next_token], dim=1)
    assert response(stdout) == encoding.decode(idx[0].tolist())


@pytest.mark.parametrize("quant_mode", config.QUANT_MODES)
def test_quantized_generation(runs, quant_mode):
    stdout = succeeded(runs, quant_mode)
    assert f"Calibrated {quant_mode} on 4 samples" in stdout
    if quant_mode == "int8-weight-only":
        assert "has only 4 samples, fewer than the 100000 asked for: using 4" in stdout
    if quant_mode == "int8-smoothquant":
        c_fc = next(line for line in stdout.splitlines() if line.startswith("transformer.h.0.mlp.c_fc.input_quantizer"))
        assert "8 bit" in c_fc and "per-tensor amax=" in c_fc and "pre_quant_scale=[" in c_fc
    text = response(stdout)
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)


def test_auto_quantize_prints_saves_and_exports_the_mix(runs, tmp_path_factory):
    stdout = succeeded(runs, "auto")
    table = stdout[stdout.index("\nlayer ") + 1 :].splitlines()[: 1 + 8 + 1]
    assert table[0].split() == ["layer", "format", "bits"]
    rows = {line.split()[0]: line.split()[1] for line in table[1:-1]}
    assert sorted(rows) == sorted(MIXED_LAYER_QUANT_MODES)  # the checkpoint's 8 block linears
    assert set(rows.values()) <= {*config.QUANT_MODES, "unquantized"}
    assert table[-1].startswith("effective bits") and float(table[-1].split()[-1]) <= 6.0
    saved_line = next(line for line in stdout.splitlines() if line.startswith("Saved the per-layer formats to "))
    path = saved_line.split()[5].rstrip(":")
    with open(path) as file:
        saved = json.load(file)
    assert saved["layers"] == rows
    export_dir = os.path.join(os.path.dirname(path), "mixed")
    with open(os.path.join(export_dir, "hf_quant_config.json")) as file:
        quantization = json.load(file)["quantization"]
    formats = {mode for mode in rows.values() if mode != "unquantized"}
    assert quantization["quant_algo"] == ("MIXED_PRECISION" if len(formats) > 1 else EXPORTED_ALGORITHM[formats.pop()])
    assert response(stdout).startswith(PROMPT)


def test_auto_quantize_with_a_recipe_builds_its_formats(runs):
    stdout = succeeded(runs, "auto recipe")
    assert "Calibrated the recipe's formats on 4 samples" in stdout
    for layer, mode in MIXED_LAYER_QUANT_MODES.items():
        assert any(line.split()[:2] == [layer, mode or "unquantized"] for line in stdout.splitlines()), layer
    assert "Saved the per-layer formats" not in stdout  # nothing was searched
    assert response(stdout).startswith(PROMPT)


def test_export_writes_a_checkpoint_and_carries_on(runs, export_dir):
    stdout = succeeded(runs, "float8")
    assert f"Exported the quantized checkpoint to {export_dir}" in stdout
    with open(os.path.join(export_dir, "config.json")) as file:
        assert json.load(file)["quantization_config"]["quant_algo"] == "FP8"
    assert response(stdout).startswith(PROMPT)
    with open(os.path.join(export_dir, USERS_FILE)) as file:
        assert file.read() == "mine\n"
    # Every file the export wrote has the mode the umask gives a new file (safetensors alone would make it 0600).
    umask = os.umask(0)
    os.umask(umask)
    written = sorted(name for name in os.listdir(export_dir) if name != USERS_FILE)
    assert written == [
        "config.json",
        "generation_config.json",
        "hf_quant_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert {name: os.stat(os.path.join(export_dir, name)).st_mode & 0o777 for name in written} == dict.fromkeys(
        written, 0o666 & ~umask
    )


def test_offline_default_falls_back_to_the_bundled_model(runs):
    """With no --model-type and no Hub, the bundled model runs, and its seed gives the text it gives here."""
    stdout = succeeded(runs, "fallback")
    fallback_lines = [line for line in stdout.splitlines() if line.startswith("Could not download")]
    assert len(fallback_lines) == 1 and "running the bundled model in bundled_model/" in fallback_lines[0], stdout
    assert "\nModel: bundled_model (" in stdout

    hf_model = load_hf_model(BUNDLED_MODEL_DIR)
    twin = load_twin(hf_model)
    encoding = gpt2_encoding()
    idx = torch.tensor([encoding.encode(PROMPT)])
    generator = torch.Generator().manual_seed(FALLBACK_SEED)
    idx = reference.generate(twin, idx, NEW_TOKENS, temperature=0.8, top_k=40, generator=generator)
    assert response(stdout) == encoding.decode(idx[0].tolist())


@pytest.mark.parametrize(
    "name, expected",
    [
        ("hub model offline", "Cannot download gpt2-medium"),
        ("not a checkpoint", "is not a Hugging Face GPT-2 checkpoint"),
        ("prompt too long", "the prompt (4 tokens) plus --max-new-tokens (125) is longer than the 128 tokens"),
        (
            "int4 on a width not a multiple of 128",
            "is 192 wide, not a multiple of int4's blocks of 128: use --quant-mode int8-weight-only or float8",
        ),
        ("unknown model", "unknown --model-type 'gpt3': expected one of gpt2, gpt2-medium"),
        ("empty prompt", "--input-text is empty"),
        ("no new tokens", "--max-new-tokens must be at least 1, got 0"),
        ("not a number", "--max-new-tokens: invalid int value: 'many'"),
        ("zero temperature", "--temperature must be from 0.001 to 100, got 0.0"),
        ("zero top-k", "--top-k must be at least 1, got 0"),
        ("missing calibration file", "calibration data not found: no/such/file.txt"),
        ("export without quantizing", "--export-dir needs --quant-mode"),
        ("export-only without a directory", "--export-only needs --export-dir"),
        ("calibration without quantizing", "--calibration-data needs --quant-mode"),
        ("unsupported calibration file", "calibration.csv: expected a .txt, .json or .jsonl file"),
        ("no calibration samples", "--num-calibration-samples must be at least 1, got 0"),
        ("recipe for another model", "other.json: The recipe's layers do not match the model's: the recipe names 12"),
        ("effective bits below int4", "--effective-bits must be between 4 (every layer int4) and 16 (none quantized)"),
        ("effective bits above unquantized", "--effective-bits must be between 4 (every layer int4) and 16"),
        ("auto without a budget or recipe", "--quant-mode auto needs either --effective-bits (to search) or --recipe"),
        ("effective bits without auto", "--effective-bits needs --quant-mode auto"),
        ("missing recipe", "recipe not found: no/such/recipe.json"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(runs, name, expected):
    assert_usage_error(runs[name].result(), "example.py", expected)


def test_hub_model_offline_suggests_a_local_directory(runs):
    assert "local GPT-2 checkpoint directory" in runs["hub model offline"].result().stderr


def test_tripy_backend_without_nvtripy_or_gpu(runs):
    """Where Tripy cannot run (no compiler/runtime, as here and in CI, or no GPU), --backend tripy says what to do:
    without a GPU, what runs on this machine, not how to install nvtripy, which would not help."""
    # Asked in a fresh interpreter: in this one, tests of the CPU executor may have made nvtripy importable.
    nvtripy_imports = subprocess.run([sys.executable, "-c", "import nvtripy"], capture_output=True).returncode == 0
    if nvtripy_imports and torch.cuda.is_available():
        pytest.skip("Tripy runs on this machine, so --backend tripy is no mistake")
    result = runs["tripy"].result()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("example.py: error: --backend tripy needs "), result.stderr
    if torch.cuda.is_available():
        assert NVTRIPY_INSTALL in lines[0]
    else:
        assert "a CUDA GPU, and this machine has none: use --backend torch" in lines[0]
        assert "pip install" not in lines[0] and "--backend tripy-cpu" in lines[0]


def test_tripy_cpu_generates_the_twins_text(runs):
    """model.py through nvtripy's frontend and the CPU executor, calibrated on the same data: the twin's very text."""
    tripy_cpu = succeeded(runs, "tripy-cpu int4-weight-only")
    assert "no TensorRT involved" in tripy_cpu.splitlines()[0]
    assert response(tripy_cpu) == response(succeeded(runs, "int4-weight-only"))


def test_auto_never_picks_tripy_cpu():
    assert example.choose_backend("auto")[0] in ("tripy", "torch")


def test_float8_on_a_gpu_older_than_ada_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10")
    with pytest.raises(UsageError) as error:
        example.check_float8_gpu()
    assert str(error.value) == (
        "float8 on --backend tripy needs a GPU of compute capability 8.9 or newer "
        "(Ada, Hopper, Blackwell); NVIDIA A10 is 8.6: use int8-weight-only or int4-weight-only"
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    example.check_float8_gpu()  # an Ada GPU: no error


def test_a_float8_export_on_a_gpu_older_than_ada_is_an_error(runs, export_dir, monkeypatch, capsys):
    """--model-type EXPORT says its mode only once read: the check runs again before Tripy loads anything."""
    succeeded(runs, "float8")  # the run that wrote the float8 export
    monkeypatch.setattr(example, "choose_backend", lambda requested, model_type=None: ("tripy", "a faked GPU"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10")
    argv = ["--model-type", export_dir, "--max-new-tokens", "2", "--input-text", "Hi"]
    line = usage_error(example.main, argv, "example.py", capsys)
    assert "float8 on --backend tripy needs a GPU of compute capability 8.9" in line


def test_one_hub_probe_per_run(monkeypatch, capsys):
    """Loading the model and choosing the calibration data both ask whether the Hub answers: the network is probed once
    (offline, each probe can take seconds). The probe meets a machine without a network here, whatever this one has."""
    probes = []

    def create_connection(address, timeout=None):
        probes.append(address)
        raise OSError("no network")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    hub._hub_answers.cache_clear()  # as at the start of a run
    argv = ["--backend", "torch", "--quant-mode", "int8-weight-only", "--num-calibration-samples", "1"]
    try:
        example.main([*argv, "--max-new-tokens", "1"])
    finally:
        hub._hub_answers.cache_clear()  # what this test's fake network answered is no answer for the next test
    assert probes == [("huggingface.co", 443)], probes
    assert "calibrating on the shipped data/calibration.txt" in capsys.readouterr().out


def test_help_and_a_bad_flag_answer_before_torch_is_imported():
    """--help and a mistake on the command line answer at once: example.py and cli/example_args.py import only the
    standard library before the arguments are good (torch, transformers and ModelOpt take seconds)."""
    for argv, status in ((["--help"], 0), (["--top-k", "0"], 2)):
        command = [sys.executable, "-c", RUN_BEFORE_TORCH, *argv]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        assert result.returncode == status, (argv, result.stderr)


def test_help_explains_the_dtype_default():
    result = subprocess.run([sys.executable, "example.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0
    assert "float16 matmuls are slow on a CPU" in " ".join(result.stdout.split())
