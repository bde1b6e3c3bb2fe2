"""example.py --export-onnx writes an ONNX folder from every route a model takes (calibration, an AutoQuantize mix, a
restored --save-quantized file, an export; int4 also as ONNX Runtime's flavor, --onnx-flavor ort), and example.py
--model-type ONNX_DIR runs it in ONNX Runtime with no calibration, giving the greedy text the exporting run gave (or,
from an export, the twin of that export).

The runs are subprocesses, as users run them, started in the background as the session starts (conftest.py).
"""

import os
import subprocess
import sys

import pytest
import torch
from helpers import CALIBRATION_PARAGRAPHS, MIXED_LAYER_QUANT_MODES, REPO, make_gpt2, usage_error

import example
from exports.checkpoint import export_checkpoint
from quant.auto_quantize import Recipe, save_recipe
from quant.save_restore import save_quantized
from quantization import modelopt_quantize

PROMPT = "The town council voted"
NEW_TOKENS = 8


def start_cli_runs(background, tmp_path_factory):
    """name -> Future of (the exporting run, the run of its ONNX folder), the folders by name, and the export."""
    tmp = tmp_path_factory.mktemp("onnx-runs")
    checkpoint = tmp / "gpt2-256"
    make_gpt2(n_positions=64, seed=1).save_pretrained(checkpoint)  # 256 wide: int4 blocks in every layer
    calibration = tmp / "calibration.txt"
    calibration.write_text("\n\n".join(CALIBRATION_PARAGRAPHS) + "\n")
    recipe = str(tmp / "recipe.json")
    save_recipe(Recipe(MIXED_LAYER_QUANT_MODES, effective_bits=0.0), recipe)
    export_dir = str(tmp / "int8-export")
    export_checkpoint(
        modelopt_quantize(make_gpt2(n_positions=64, seed=1), "int8-weight-only", str(calibration), 4), export_dir
    )
    saved = str(tmp / "float8.pth")
    save_quantized(modelopt_quantize(make_gpt2(n_positions=64, seed=1), "float8", str(calibration), 4), saved)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf-home"), "OMP_NUM_THREADS": "1"}
    generate = ["--input-text", PROMPT, "--max-new-tokens", str(NEW_TOKENS), "--top-k", "1"]
    calibrate = ["--calibration-data", str(calibration), "--num-calibration-samples", "4"]
    model = ["--model-type", str(checkpoint)]
    folders = {name: str(tmp / f"onnx-{name}") for name in ("int4", "int4-ort", "auto", "restored", "export")}

    def run(*arguments: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "example.py", *arguments]
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    def export_then_run(name: str, *arguments: str):
        exporting = run(*arguments, "--export-onnx", folders[name])
        return exporting, run("--model-type", folders[name], *generate)

    futures = {
        "int4": background.submit(
            export_then_run, "int4", *model, "--quant-mode", "int4-weight-only", *calibrate, *generate
        ),
        "int4-ort": background.submit(
            export_then_run,
            "int4-ort",
            *model,
            "--quant-mode",
            "int4-weight-only",
            *calibrate,
            *generate,
            "--onnx-flavor",
            "ort",
        ),  # fmt: skip
        "auto": background.submit(
            export_then_run, "auto", *model, "--quant-mode", "auto", "--recipe", recipe, *calibrate, *generate
        ),
        "restored": background.submit(export_then_run, "restored", *model, "--load-quantized", saved, *generate),
        "export": background.submit(export_then_run, "export", "--model-type", export_dir, "--export-only"),
    }
    return futures, folders, export_dir


@pytest.fixture
def runs(cli_runs):
    return cli_runs.of(__name__)


def generated_text(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result.stdout.split(example.SEPARATOR)[1]


@pytest.mark.parametrize("name", ["int4", "int4-ort", "auto", "restored"])
def test_onnx_folder_generates_the_exporting_runs_greedy_text(runs, name):
    futures, folders, _ = runs
    exporting, running = futures[name].result()
    assert f"Wrote {folders[name]}/model.onnx: " in exporting.stdout
    assert running.stdout.startswith(f"Backend: onnxruntime (ONNX Runtime on CPU, the ONNX folder {folders[name]}")
    assert "Calibrat" not in running.stdout
    assert generated_text(running) == generated_text(exporting)


def test_an_export_becomes_an_onnx_folder_with_export_only(runs):
    """From an exports/checkpoint.py checkpoint, --export-only stops after writing: the ONNX folder then gives the
    greedy text of the twin loaded from that checkpoint."""
    import reference
    from measure.twin import load_export_twin
    from sources.tokenizer import gpt2_encoding

    futures, folders, export_dir = runs
    exporting, running = futures["export"].result()
    assert exporting.returncode == 0, exporting.stderr
    assert example.SEPARATOR not in exporting.stdout  # stopped before generating
    for name in ("model.onnx", "config.json", "generation_config.json", "tokenizer.json"):
        assert os.path.isfile(os.path.join(folders["export"], name)), name
    encoding = gpt2_encoding()
    idx = torch.tensor([encoding.encode(PROMPT)])
    expected = encoding.decode(reference.generate(load_export_twin(export_dir), idx, NEW_TOKENS, top_k=1)[0].tolist())
    assert generated_text(running).strip("\n") == expected


def test_an_onnx_folder_refuses_a_run_longer_than_its_context(runs, capsys):
    """The folder's config.json says how far the model attends (64 here): one line, exit 2, before any session."""
    futures, folders, _ = runs
    futures["export"].result()
    argv = ["--model-type", folders["export"], "--max-new-tokens", "64"]
    line = usage_error(example.main, argv, "example.py", capsys)
    assert "plus --max-new-tokens (64) is longer than the 64 tokens the model can attend to" in line
