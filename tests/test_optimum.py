"""optimum's ORTModelForCausalLM loads an ONNX folder by its path and generates the twin's greedy tokens.

optimum-onnx 0.1.0 pins transformers below 4.58 (we pin 5.23), so it lives in its own virtual environment
(docs/onnx.md). This test runs exports/optimum_generate.py with that environment's python, named by OPTIMUM_PYTHON, or
with this one where optimum imports here; elsewhere, CI included, it is skipped. The truth is the twin, run on each
prompt alone; optimum runs the prompts as one left-padded batch, so the graph's attention_mask and position_ids are
tested.
"""

import ast
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO

import reference
from exports import onnx_export
from measure.twin import load_twin
from quantization import SHIPPED_CALIBRATION_TEXT, modelopt_quantize
from sources.hub import BUNDLED_MODEL_DIR, load_hf_model
from sources.tokenizer import gpt2_encoding


def optimum_imports_here() -> bool:
    try:
        return importlib.util.find_spec("optimum.onnxruntime") is not None
    except ModuleNotFoundError:  # no optimum at all
        return False


OPTIMUM_PYTHON = os.environ.get("OPTIMUM_PYTHON") or (sys.executable if optimum_imports_here() else None)
pytestmark = pytest.mark.skipif(
    OPTIMUM_PYTHON is None,
    reason="optimum-onnx is not installed here: it pins transformers < 4.58, so it runs in its own environment; "
    "set OPTIMUM_PYTHON to that environment's python (docs/onnx.md)",
)
PROMPTS = ["The best way to learn something new is", "Hello"]  # different lengths: the batch is padded
NEW_TOKENS = 12


def test_optimum_generates_the_twins_greedy_tokens(tmp_path):
    hf_model = load_hf_model(BUNDLED_MODEL_DIR)
    quantized = modelopt_quantize(hf_model, "int4-weight-only", SHIPPED_CALIBRATION_TEXT, num_samples=4)
    twin = load_twin(quantized, "int4-weight-only", quantized)
    onnx_dir = str(tmp_path / "onnx-int4")
    onnx_export.export_onnx(twin, onnx_dir)
    args = [OPTIMUM_PYTHON, "-m", "exports.optimum_generate", onnx_dir, "--max-new-tokens", str(NEW_TOKENS)]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-3000:]}"
    optimum_tokens = [
        ast.literal_eval(line.removeprefix("tokens: "))
        for line in result.stdout.splitlines()
        if line.startswith("tokens: ")
    ]
    for prompt, tokens in zip(PROMPTS, optimum_tokens, strict=True):
        idx = torch.tensor([gpt2_encoding().encode(prompt)])
        expected = reference.generate(twin, idx, NEW_TOKENS, top_k=1)[0, idx.shape[1] :].tolist()
        assert tokens == expected, prompt
