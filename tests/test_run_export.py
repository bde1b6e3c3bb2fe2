"""Running and loading an export: `example.py --model-type EXPORT_DIR` runs what the exporting run ran, with no
calibration, and a directory that is not a good export is one clear error, from example.py and from transformers.

The runs are subprocesses, as users run them, started in the background as the session starts (conftest.py); the
broken exports are copies of one good export with one thing changed each.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import CALIBRATION_PARAGRAPHS, REPO, RUN_BEFORE_TORCH, assert_usage_error, make_gpt2, usage_error
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import example
from config import GPTConfig
from exports import modelopt_hf
from exports.checkpoint import export_checkpoint
from exports.checkpoint_loader import load_weights_from_export
from quantization import modelopt_quantize
from reference import GPT

PROMPT = "The town council voted"
NEW_TOKENS = 8
SCALE = "transformer.h.1.mlp.c_fc.weight_scale"  # int8: [out] = [512]


def edit_json(path: str, edit) -> None:
    with open(path) as file:
        content = json.load(file)
    edit(content)
    with open(path, "w") as file:
        json.dump(content, file)


def edit_tensors(export_dir: str, edit) -> None:
    path = os.path.join(export_dir, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def make_exports(tmp_path_factory) -> dict[str, str]:
    """A good int8 export of a small GPT-2 and broken copies of it, by name."""
    tmp = tmp_path_factory.mktemp("exports")
    calibration = tmp / "calibration.txt"
    calibration.write_text("\n\n".join(CALIBRATION_PARAGRAPHS) + "\n")
    model = make_gpt2(n_embd=128, n_layer=2, n_head=4, n_positions=128)
    good = str(tmp / "good")
    export_checkpoint(modelopt_quantize(model, "int8-weight-only", str(calibration), num_samples=4), good)
    paths = {"good": good}

    def broken(name: str) -> str:
        paths[name] = str(tmp / name.replace(" ", "-"))
        shutil.copytree(good, paths[name])
        return paths[name]

    path = broken("no hf_quant_config.json")
    os.remove(os.path.join(path, "hf_quant_config.json"))

    def unknown_algo(config: dict) -> None:
        section = config.get("quantization") or config["quantization_config"]
        section["quant_algo"] = "NVFP4"

    path = broken("unknown quant_algo")
    edit_json(os.path.join(path, "hf_quant_config.json"), unknown_algo)
    edit_json(os.path.join(path, "config.json"), unknown_algo)
    edit_tensors(broken("missing tensor"), lambda tensors: tensors.pop(SCALE))
    edit_tensors(broken("scale of the wrong shape"), lambda tensors: tensors.update({SCALE: tensors[SCALE][:-1]}))
    return paths


def start_cli_runs(background, tmp_path_factory) -> tuple[dict[str, str], dict]:
    """The exports (make_exports), and name -> Future of a subprocess.CompletedProcess of example.py."""
    exports = make_exports(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("runs")
    checkpoint = tmp / "gpt2-128"
    make_gpt2(n_embd=128, n_layer=2, n_head=4, n_positions=128, seed=1).save_pretrained(checkpoint)
    calibration = tmp / "calibration.txt"
    calibration.write_text("\n\n".join(CALIBRATION_PARAGRAPHS) + "\n")
    exported_by_a_run = str(tmp / "float8-export")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf-home"), "OMP_NUM_THREADS": "1"}
    generate = ["--backend", "torch", "--input-text", PROMPT, "--max-new-tokens", str(NEW_TOKENS), "--top-k", "1"]

    def run(*arguments: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "example.py", *generate, *arguments]
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    def export_then_run() -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
        calibrate = ["--calibration-data", str(calibration), "--num-calibration-samples", "4"]
        exporting = run(
            "--model-type", str(checkpoint), "--quant-mode", "float8", *calibrate, "--export-dir", exported_by_a_run
        )
        return exporting, run("--model-type", exported_by_a_run)

    arguments = {
        "run an export": ["--model-type", exports["good"]],
        "conflicting --quant-mode": ["--model-type", exports["good"], "--quant-mode", "float8"],
        "calibrating an export": ["--model-type", exports["good"], "--calibration-data", str(calibration)],
        **{name: ["--model-type", path] for name, path in exports.items() if name != "good"},
    }
    futures = {"export then run": background.submit(export_then_run)}
    futures.update({name: background.submit(run, *args) for name, args in arguments.items()})
    return exports, futures


@pytest.fixture
def exports(cli_runs) -> dict[str, str]:
    return cli_runs.of(__name__)[0]


@pytest.fixture
def runs(cli_runs) -> dict:
    return cli_runs.of(__name__)[1]


def generated_text(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result.stdout.split(example.SEPARATOR)[1]


def test_running_an_export_generates_what_the_exporting_run_generated(runs):
    exporting, running = runs["export then run"].result()
    assert "Calibrated float8" in exporting.stdout
    assert "a ModelOpt export, float8: no calibration" in running.stdout and "Calibrat" not in running.stdout
    assert generated_text(running) == generated_text(exporting)


def test_running_an_export_uses_its_weights(runs, exports):
    """The greedy text is the one the twin loaded from the export gives (and example.py printed no calibration)."""
    import reference
    from measure.twin import load_export_twin
    from sources.tokenizer import gpt2_encoding

    encoding = gpt2_encoding()
    idx = torch.tensor([encoding.encode(PROMPT)])
    expected = encoding.decode(
        reference.generate(load_export_twin(exports["good"]), idx, NEW_TOKENS, top_k=1)[0].tolist()
    )
    assert generated_text(runs["run an export"].result()).strip("\n") == expected


@pytest.mark.parametrize(
    "name, expected",
    [
        ("no hf_quant_config.json", "is not a ModelOpt export: it has no hf_quant_config.json"),
        ("unknown quant_algo", "quant_algo 'NVFP4'; this loader reads W8A16 (int8-weight-only), W4A16_AWQ"),
        ("missing tensor", f"is missing the tensor {SCALE}"),
        ("scale of the wrong shape", f"{SCALE} has shape [511], expected [512]"),
        ("conflicting --quant-mode", "--quant-mode float8 conflicts with"),
        ("calibrating an export", "is an exported checkpoint, calibrated already"),
    ],
)
def test_bad_export_is_one_line_and_exit_status_2(runs, name, expected):
    assert_usage_error(runs[name].result(), "example.py", expected)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["--quant-mode", "float8"],
            "--quant-mode float8 conflicts with {export}, exported in int8-weight-only (W8A16)",
        ),
        (
            ["--quant-mode", "auto", "--recipe", "{tmp}/r.json"],
            "--quant-mode auto conflicts with {export}, exported in int8",
        ),
        (
            ["--export-onnx", "{tmp}/onnx"],
            "--export-onnx writes a float32 KV cache, with no Q/DQ on the keys and values, "
            "and {export} has a float8 one: use --export-dir",
        ),
    ],
)
def test_a_flag_the_exports_json_conflicts_with_is_refused_before_torch_and_stdout(exports, tmp_path, argv, expected):
    """What hf_quant_config.json says (the mode, a float8 KV cache) is checked with the command line: one line on
    stderr, nothing on stdout, torch never imported, let alone the model loaded."""
    export = tmp_path / "export"
    shutil.copytree(exports["good"], export)
    edit_json(export / "hf_quant_config.json", lambda config: config["quantization"].update(kv_cache_quant_algo="FP8"))
    (tmp_path / "r.json").write_text("{}")
    argv = ["--model-type", str(export), *(arg.replace("{tmp}", str(tmp_path)) for arg in argv)]
    result = subprocess.run(
        [sys.executable, "-c", RUN_BEFORE_TORCH, *argv], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert_usage_error(result, "example.py", expected.format(export=export, tmp=tmp_path))
    assert result.stdout == ""


@pytest.mark.parametrize(
    "name, expected",
    [
        ("unknown quant_algo", "quant_algo 'NVFP4'"),
        ("missing tensor", f"is missing the tensor {SCALE}"),
        ("scale of the wrong shape", f"{SCALE} has shape [511], expected [512]"),
    ],
)
def test_transformers_refuses_a_bad_export(exports, name, expected):
    with pytest.raises(ValueError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        AutoModelForCausalLM.from_pretrained(exports[name])


def test_a_plain_checkpoint_is_not_an_export(tmp_path):
    make_gpt2(n_embd=128, n_layer=1).save_pretrained(tmp_path)
    with pytest.raises(modelopt_hf.ExportFormatError, match="is not a ModelOpt export"):
        load_weights_from_export(GPT(GPTConfig(quant_mode="int8-weight-only")), str(tmp_path), torch.float32)


# A file of the good export replaced: (file, its new content, what the one line must say)
DAMAGED_FILES = {
    "hf_quant_config.json cut short": ("hf_quant_config.json", "{", "hf_quant_config.json is not valid JSON"),
    "hf_quant_config.json a list": ("hf_quant_config.json", "[]", "holds a JSON list, not an object"),
    "producer a string": ("hf_quant_config.json", '{"producer": "modelopt", "quantization": {}}', "not written by"),
    "config.json a list": ("config.json", "[1]", "config.json holds a JSON list, not an object"),
    "an index without a weight map": ("model.safetensors.index.json", "{}", "has no weight_map of tensor names"),
    "a safetensors header of garbage": ("model.safetensors", "\0" * 8 + "x" * 64, "cannot read"),
}


@pytest.mark.parametrize("name", DAMAGED_FILES)
def test_a_damaged_export_is_one_line(exports, tmp_path, capsys, name):
    file_name, content, expected = DAMAGED_FILES[name]
    damaged = tmp_path / "damaged"
    shutil.copytree(exports["good"], damaged)
    (damaged / file_name).write_text(content)
    assert expected in usage_error(example.main, ["--model-type", str(damaged)], "example.py", capsys)


def test_an_export_with_an_int8_kv_cache_is_one_line_for_example_and_serve_vllm(exports, tmp_path, capsys):
    """What ModelOpt would name an int8 KV cache (its exporter stops at one: test_kv_cache.py), as another tool may
    write it: hf_quant_config.json's kv_cache_quant_algo "INT8", config.json's kv_cache_scheme "INT8". The engines
    that load this format store float8 caches, and the refusal says where int8 goes."""
    import serve_vllm

    export = str(tmp_path / "int8-kv")
    shutil.copytree(exports["good"], export)
    edit_json(
        os.path.join(export, "hf_quant_config.json"), lambda c: c["quantization"].update(kv_cache_quant_algo="INT8")
    )
    edit_json(os.path.join(export, "config.json"), lambda c: c["quantization_config"].update(kv_cache_scheme="INT8"))
    expected = "'INT8'; this loader reads FP8, the KV cache serving engines such as vLLM store (an int8 KV cache is"
    assert expected in usage_error(example.main, ["--model-type", export], "example.py", capsys)
    assert expected in usage_error(serve_vllm.main, [export], "serve_vllm.py", capsys)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda config: config.update(n_layer=0), "n_layer must be a whole number of at least 1, got 0"),
        (lambda config: config.update(n_positions="64"), "n_positions must be a whole number of at least 1, got '64'"),
        (lambda config: config.update(activation_function="relu"), "activation_function is 'relu'"),
    ],
)
def test_an_export_whose_config_the_models_cannot_compute_is_one_line(exports, tmp_path, capsys, edit, expected):
    damaged = str(tmp_path / "damaged")
    shutil.copytree(exports["good"], damaged)
    edit_json(os.path.join(damaged, "config.json"), edit)
    assert expected in usage_error(example.main, ["--model-type", damaged], "example.py", capsys)
