"""Every bad input a user can give the scripts is one line on stderr, exit status 2, no traceback, and changes no
file: arguments, model folders, calibration and text files, output folders and files.

Most cases run the script's `main` in this process (tests/helpers.usage_error), as its command line does: the checks
happen before anything slow. A few run as real subprocesses (bytes that are not UTF-8 in argv, the CLI end to end),
all started at once, two at a time. Before and after every case the files it could touch are hashed: the workspace
the cases point at, bundled_model/ and data/.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import CALIBRATION_PARAGRAPHS, REPO, usage_error
from huggingface_hub import try_to_load_from_cache
from transformers import GPT2Config, GPT2LMHeadModel

import benchmark
import cli
import evaluate
import example
import qat
import serve_vllm
import train
from sources import hub
from sources.hub import BUNDLED_MODEL_DIR

NOBODY = 65534  # the user id of `nobody`, who owns none of the files
SCRIPTS = {
    "example.py": example.main,
    "evaluate.py": evaluate.main,
    "benchmark.py": benchmark.main,
    "train.py": train.main,
    "qat.py": qat.main,
    "serve_vllm.py": serve_vllm.main,
}


def build_workspace(root: Path) -> None:
    """What the cases point at: checkpoints broken in each way a copy or an edit breaks them, calibration files, and
    folders that an output must not land in."""
    good = root / "gpt2"
    # A vocabulary of 512 keeps each copy at 180 KB; these checkpoints are refused before any token is sampled.
    config = GPT2Config(vocab_size=512, n_embd=64, n_layer=1, n_head=2, n_positions=32)
    config.architectures = ["GPT2LMHeadModel"]
    GPT2LMHeadModel(config).save_pretrained(good)
    config = json.loads((good / "config.json").read_text())
    weights = (good / "model.safetensors").read_bytes()

    def variant(name: str, config_text: str | None = None, weights_bytes: bytes | None = weights) -> None:
        folder = root / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config) if config_text is None else config_text)
        if weights_bytes is not None:
            (folder / "model.safetensors").write_bytes(weights_bytes)

    variant("truncated", weights_bytes=weights[: len(weights) // 2])  # a download or copy cut short
    variant("header-only", weights_bytes=weights[:6])
    variant("corrupt-config", config_text=json.dumps(config)[:-20])
    variant("config-list", config_text="[]")
    variant("bert", config_text=json.dumps({"model_type": "bert"}))
    variant("no-weights", weights_bytes=None)
    variant("more-layers", config_text=json.dumps({**config, "n_layer": 2}))  # transformers would init layer 2 randomly
    variant("wider", config_text=json.dumps({**config, "n_embd": 128}))
    variant("bad-heads", config_text=json.dumps({**config, "n_head": 5}))
    variant("string-layers", config_text=json.dumps({**config, "n_layer": "one"}))
    variant("zero-heads", config_text=json.dumps({**config, "n_head": 0}))
    variant("huge", config_text=json.dumps({**config, "n_layer": 1_000_000}))  # would be allocated, then refused
    variant("relu", config_text=json.dumps({**config, "activation_function": "relu"}))  # the twin computes GELU
    variant("epsilon", config_text=json.dumps({**config, "layer_norm_epsilon": 0.5}))
    variant(
        "int8-weights",
        weights_bytes=safetensors.torch.save({"transformer.wte.weight": torch.ones(2, 2).to(torch.int8)}),
    )
    nan_model = GPT2LMHeadModel.from_pretrained(good)
    with torch.no_grad():
        nan_model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    nan_model.save_pretrained(root / "nan-weights")
    variant("garbage-bin", weights_bytes=None)  # a pytorch_model.bin that is not one, and no safetensors
    (root / "garbage-bin" / "pytorch_model.bin").write_bytes(b"not a pickle, not a zip" * 100)
    # What --export-dir writes: ModelOpt's hf_quant_config.json and a quantization_config in config.json.
    variant("export", config_text=json.dumps({**config, "quantization_config": {"quant_method": "modelopt"}}))
    (root / "export" / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "FP8"}}))
    (root / "onnx-folder").mkdir()  # what --export-onnx writes: a model.onnx (its flags are refused before it is read)
    (root / "onnx-folder" / "model.onnx").write_bytes(b"not read")

    data = root / "data"
    data.mkdir()
    (data / "good.txt").write_text("\n\n".join(CALIBRATION_PARAGRAPHS) + "\n")
    (data / "empty.txt").write_text("")
    (data / "blank.txt").write_text("\n\n   \n\n")
    (data / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (data / "latin1.txt").write_bytes("Un café au lait, s'il vous plaît.".encode("latin-1"))
    (data / "malformed.json").write_text('[{"text": "One sample."}, {"text": "Two.",}]')
    (data / "bad-line.jsonl").write_text('{"text": "One sample."}\n{"text": "Two."\n')
    (data / "no-text.jsonl").write_text('{"article": "One sample."}\n')
    (data / "number.jsonl").write_text('{"text": 5}\n')
    (data / "strings.json").write_text('["One sample.", "Two."]')
    (data / "empty.json").write_text("[]")
    (data / "table.csv").write_text("text\nOne sample.\n")
    (data / "folder.txt").mkdir()

    users = root / "users-folder"  # a folder of the user's own, which an output must not replace
    users.mkdir()
    (users / "config.json").write_text('{"mine": true}\n')
    (root / "empty-folder").mkdir()
    (root / "chart-folder.png").mkdir()
    (root / "dangling").symlink_to(root / "nowhere")  # a link to a folder or file since removed
    (root / "dangling.png").symlink_to(root / "nowhere.png")
    os.mkfifo(root / "fifo.png")  # writing to a pipe that nothing reads waits forever
    (data / "recipe.json").write_text("layers: all int4\n")  # not what --recipe-out writes
    (data / "recipe-list.json").write_text('{"effective_bits": 6, "layers": {"transformer.h.0.mlp.c_fc": ["int4"]}}')
    (data / "deep.json").write_text("[" * 100_000)  # deeper than Python's JSON reader recurses
    (data / "notes.png").write_text("not an image\n")
    (data / "cal[1].txt").write_text("\n\n".join(CALIBRATION_PARAGRAPHS))
    (root / "link.png").symlink_to(data / "good.txt")
    narrow = GPT2Config(n_embd=64, n_layer=1, n_head=2, n_positions=32)  # GPT-2's vocabulary, 64 wide: no int4
    GPT2LMHeadModel(narrow).save_pretrained(root / "narrow")


def tree_hash(*folders: Path) -> str:
    """Names and modes of every file and folder under `folders`, and each file's modification time and contents.

    A folder's modification time is left out: checking that a folder is writable makes and removes a folder in it."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            stat = path.lstat()  # a symbolic link as itself: the cases include one to nothing
            modified = "" if path.is_dir() and not path.is_symlink() else stat.st_mtime_ns
            # fsencode: a case's file name may hold bytes that are not UTF-8
            digest.update(os.fsencode(f"{path.relative_to(folder)} {stat.st_mode:o} {modified}"))
            if path.is_file():
                digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-input")
    build_workspace(root)
    return root


# (script, arguments with {w} for the workspace, what the error line must say)
CASES = [
    # example.py: numbers
    ("example.py", ["--temperature", "nan"], "argument --temperature: expected a finite number, got 'nan'"),
    ("example.py", ["--temperature", "inf"], "expected a finite number, got 'inf'"),
    ("example.py", ["--temperature=-inf"], "expected a finite number, got '-inf'"),
    ("example.py", ["--temperature", "1e-50"], "--temperature must be from 0.001 to 100, got 1e-50"),
    ("example.py", ["--temperature", "0"], "--temperature must be from 0.001 to 100, got 0.0"),
    ("example.py", ["--temperature", "-1"], "--temperature must be from 0.001 to 100, got -1.0"),
    ("example.py", ["--temperature", "1e300"], "--temperature must be from 0.001 to 100, got 1e+300"),
    ("example.py", ["--temperature", "warm"], "expected a number, got 'warm'"),
    (
        "example.py",
        ["--seed", str(2**64)],
        "--seed: expected an integer from 0 to 2**64 - 1, got '18446744073709551616'",
    ),
    ("example.py", ["--seed", "-1"], "--seed: expected an integer from 0 to 2**64 - 1, got '-1'"),
    ("example.py", ["--seed", "1.5"], "--seed: expected an integer from 0 to 2**64 - 1, got '1.5'"),
    ("example.py", ["--top-k", "-5"], "--top-k must be at least 1, got -5"),
    ("example.py", ["--max-new-tokens", "-1"], "--max-new-tokens must be at least 1, got -1"),
    ("example.py", ["--quant-mode", "float8", "--num-calibration-samples", "-3"], "must be at least 1, got -3"),
    ("example.py", ["--input-text", "   "], "--input-text is empty"),
    ("example.py", ["--backend", "cuda"], "argument --backend: invalid choice: 'cuda'"),
    ("example.py", ["--quant-mode", "int2"], "argument --quant-mode: invalid choice: 'int2'"),
    # example.py: model folders
    ("example.py", ["--model-type", "{w}/truncated"], "truncated/model.safetensors is truncated: "),
    ("example.py", ["--model-type", "{w}/header-only"], "header-only/model.safetensors is truncated or not a safe"),
    ("example.py", ["--model-type", "{w}/corrupt-config"], "corrupt-config/config.json is not valid JSON"),
    ("example.py", ["--model-type", "{w}/config-list"], "is not a Hugging Face GPT-2 checkpoint"),
    ("example.py", ["--model-type", "{w}/bert"], "is not a Hugging Face GPT-2 checkpoint"),
    ("example.py", ["--model-type", "{w}/no-weights"], "has config.json but no weights: expected model.safetensors"),
    ("example.py", ["--model-type", "{w}/export"], "export/hf_quant_config.json was not written by ModelOpt"),
    ("example.py", ["--model-type", "{w}/data/good.txt"], "unknown --model-type"),
    ("example.py", ["--model-type", "{w}/gpt\udce9"], "--model-type: the path '{w}/gpt\\udce9' is not valid UTF-8"),
    ("example.py", ["--backend", "torch", "--model-type", "{w}/more-layers"], "do not match its config.json: 12 "),
    ("example.py", ["--backend", "torch", "--model-type", "{w}/wider"], "do not match its config.json"),
    (
        "example.py",
        ["--model-type", "{w}/bad-heads"],
        "bad-heads/config.json: n_embd (64) must be a multiple of n_head",
    ),
    ("example.py", ["--model-type", "{w}/string-layers"], "n_layer must be a whole number of at least 1, got 'one'"),
    ("example.py", ["--model-type", "{w}/zero-heads"], "zero-heads/config.json: n_head must be a whole number of at "),
    ("example.py", ["--backend", "torch", "--model-type", "{w}/garbage-bin"], "cannot load the checkpoint in"),
    (
        "example.py",
        ["--model-type", "{w}/huge"],
        "huge/config.json: a GPT-2 of these sizes needs 197 GB for its weights",
    ),
    (
        "example.py",
        ["--model-type", "{w}/relu"],
        "activation_function is 'relu'; model.py and its twin compute GPT-2's",
    ),
    ("example.py", ["--model-type", "{w}/epsilon"], "layer_norm_epsilon is 0.5; model.py and its twin compute GPT-2's"),
    ("example.py", ["--model-type", "{w}/int8-weights"], "model.safetensors holds I8 tensors: expected float weights"),
    (
        "example.py",
        ["--backend", "torch", "--model-type", "{w}/nan-weights"],
        "hold inf or NaN (in transformer.h.0.mlp",
    ),
    # 64 wide: int4's rows would be refused first, for the width.
    (
        "evaluate.py",
        ["--model-type", "{w}/nan-weights", "--modes", "int8-weight-only"],
        "hold inf or NaN (in transformer.h.0.mlp.c_fc.weight)",
    ),
    # example.py: an export runs as it was calibrated
    ("example.py", ["--model-type", "{w}/export", "--verbose"], "calibrated already: --verbose is for a model that"),
    ("example.py", ["--model-type", "{w}/export", "--save-quantized", "{w}/q.pt"], "calibrated already: --save-qua"),
    ("example.py", ["--model-type", "{w}/export", "--load-quantized", "{w}/data/good.txt"], "already: --load-quan"),
    ("example.py", ["--model-type", "{w}/export", "--num-calibration-samples", "8"], "already: --num-calibration"),
    ("example.py", ["--num-calibration-samples", "8"], "--num-calibration-samples needs --quant-mode"),
    ("example.py", ["--model-type", "{w}/export", "--kv-cache", "float8"], "calibrated already: --kv-cache is for"),
    ("example.py", ["--kv-cache", "float8"], "--kv-cache needs --quant-mode: its K and V quantizers are calibrated"),
    (
        "example.py",
        ["--quant-mode", "float8", "--kv-cache", "float8", "--export-onnx", "{w}/empty-folder"],
        "--export-onnx writes a float32 KV cache, with no Q/DQ on the keys and values: drop --kv-cache, or use",
    ),
    (
        "example.py",
        ["--quant-mode", "int4-weight-only", "--kv-cache", "int8", "--export-onnx", "{w}/empty-folder"],
        "--export-onnx writes a float32 KV cache, with no Q/DQ on the keys and values: drop --kv-cache, or add "
        "--onnx-flavor ort",
    ),
    (
        "example.py",
        ["--quant-mode", "int4-weight-only", "--kv-cache", "float8", "--export-onnx", "{w}/o", "--onnx-flavor", "ort"],
        "--onnx-flavor ort stores the KV cache in float32 or int8 (ONNX Runtime's CPU attention has no float8): use "
        "--kv-cache int8",
    ),
    ("example.py", ["--quant-mode", "float8", "--kv-cache", "int4"], "argument --kv-cache: invalid choice: 'int4'"),
    (
        "example.py",
        ["--quant-mode", "int8-weight-only", "--kv-cache", "int8", "--export-dir", "{w}/empty-folder"],
        "--export-dir with --kv-cache int8: ModelOpt's checkpoint holds a float8 KV cache, the one serving engines",
    ),
    (
        "example.py",
        ["--quant-mode", "int4-weight-only", "--kv-cache", "int8", "--export-dir", "{w}/empty-folder", "--export-only"],
        "an int8 KV cache is for ONNX Runtime on a CPU: --export-onnx DIR --onnx-flavor ort",
    ),
    ("example.py", ["--onnx-flavor", "ort"], "--onnx-flavor needs --export-onnx: it chooses the file that writes"),
    ("example.py", ["--onnx-flavor", "trt"], "argument --onnx-flavor: invalid choice: 'trt'"),
    (
        "example.py",
        ["--quant-mode", "int8-smoothquant", "--export-onnx", "{w}/empty-folder", "--onnx-flavor", "ort"],
        "--onnx-flavor ort holds int8 and int4 weights, and int8-smoothquant quantizes activations too: export it",
    ),
    (
        "example.py",
        ["--load-quantized", "{w}/data/good.txt", "--kv-cache", "float8"],
        "--load-quantized restores the quantizers it was saved with, K and V among them: drop --kv-cache",
    ),
    (
        "example.py",
        ["--quant-mode", "float8", "--load-quantized", "{w}/data/good.txt", "--num-calibration-samples", "8"],
        "--num-calibration-samples needs --quant-mode: only quantization calibrates",
    ),
    ("example.py", ["--quant-mode", "auto", "--recipe", "{w}/data/recipe.json"], "--recipe: cannot read the recipe"),
    ("example.py", ["--quant-mode", "auto", "--recipe", "{w}/data/deep.json"], "--recipe: cannot read the recipe"),
    ("example.py", ["--quant-mode", "auto", "--recipe", "{w}/data/recipe-list.json"], "has unknown formats"),
    (
        "example.py",
        ["--quant-mode", "float8", "--export-dir", "{w}/empty-folder", "--export-only", "--temperature", "1.5"],
        "--export-only stops before generating: --temperature would do nothing",
    ),
    (
        "example.py",
        ["--quant-mode", "float8", "--export-dir", "{w}/empty-folder", "--save-quantized", "{w}/empty-folder/q.pt"],
        "--save-quantized {w}/empty-folder/q.pt is inside --export-dir {w}/empty-folder",
    ),
    (
        "example.py",
        ["--quant-mode", "auto", "--effective-bits", "6", "--save-quantized", "{w}/q.pt", "--recipe-out", "{w}/q.pt"],
        "--save-quantized and --recipe-out are the same file",
    ),
    ("example.py", ["--quant-mode", "auto", "--effective-bits", "6", "--recipe-out", ""], "--recipe-out is empty"),
    (
        "example.py",
        ["--quant-mode", "float8", "--calibration-data", "{w}/data/cal[1].txt"],
        "a path with * ? or [ is read as a pattern of files",
    ),
    ("example.py", ["--quant-mode", "float8", "--calibration-data", "{w}/data/deep.json"], "is nested too deeply"),
    # GPT-2's tokenizer gives ids up to 50256: a smaller embedding would be indexed past its end while generating.
    ("example.py", ["--backend", "torch", "--model-type", "{w}/gpt2"], "has a vocabulary of 512 tokens"),
    # example.py: calibration files
    ("example.py", ["--quant-mode", "float8", "--calibration-data", "{w}/data/empty.txt"], "empty.txt is empty"),
    ("example.py", ["--quant-mode", "float8", "--calibration-data", "{w}/data/blank.txt"], "blank.txt is empty"),
    ("example.py", ["--quant-mode", "float8", "--calibration-data", "{w}/data/binary.txt"], "is a binary file"),
    ("example.py", ["--quant-mode", "float8", "--calibration-data", "{w}/data/latin1.txt"], "is not UTF-8 text"),
    (
        "example.py",
        ["--quant-mode", "float8", "--calibration-data", "{w}/data/malformed.json"],
        "malformed.json is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 43",
    ),
    (
        "example.py",
        ["--quant-mode", "float8", "--calibration-data", "{w}/data/bad-line.jsonl"],
        "bad-line.jsonl is not valid JSON: Expecting ',' delimiter at line 2",
    ),
    ("example.py", ["--quant-mode", "float8", "--calibration-data", "{w}/data/no-text.jsonl"], "no 'text' field"),
    ("example.py", ["--quant-mode", "float8", "--calibration-data", "{w}/data/number.jsonl"], "is not a string: 5"),
    ("example.py", ["--quant-mode", "float8", "--calibration-data", "{w}/data/strings.json"], "expected records"),
    ("example.py", ["--quant-mode", "float8", "--calibration-data", "{w}/data/empty.json"], "holds no text"),
    ("example.py", ["--quant-mode", "float8", "--calibration-data", "{w}/data/table.csv"], "unsupported calibration"),
    ("example.py", ["--quant-mode", "float8", "--calibration-data", "{w}/data/folder.txt"], "folder.txt is a folder"),
    # example.py: where the export goes
    ("example.py", ["--quant-mode", "float8", "--export-dir", "{w}/users-folder"], "users-folder is not empty"),
    ("example.py", ["--quant-mode", "float8", "--export-dir", "{w}/data/good.txt"], "is a file, not a folder"),
    ("example.py", ["--quant-mode", "float8", "--export-dir", "{w}/data/good.txt/out"], "good.txt is a file"),
    (
        "example.py",
        ["--quant-mode", "float8", "--model-type", "{w}/gpt2", "--export-dir", "{w}/gpt2", "--overwrite"],
        "gpt2 is the folder the model is read from",
    ),
    (
        "example.py",
        ["--quant-mode", "float8", "--export-dir", os.path.join(REPO, "bundled_model"), "--overwrite"],
        "bundled_model is the folder the model is read from",
    ),
    (
        "example.py",
        ["--quant-mode", "float8", "--export-dir", os.path.join(REPO, "bundled_model", "int8")],
        "bundled_model/int8 is inside the folder the model is read from",
    ),
    ("example.py", ["--quant-mode", "float8", "--export-dir", "{w}/dangling"], "dangling is a symbolic link to"),
    ("example.py", ["--quant-mode", "float8", "--export-dir", "{w}/caf\udce9"], "is not valid UTF-8: name it in"),
    (
        "example.py",
        ["--quant-mode", "float8", "--save-quantized", "{w}/dangling"],
        "dangling is a symbolic link to {w}/nowhere",
    ),
    ("example.py", ["--overwrite"], "--overwrite needs --export-dir or --export-onnx"),
    ("example.py", ["--export-only"], "--export-only needs --export-dir or --export-onnx"),
    ("example.py", ["--export-onnx", "{w}/users-folder"], "--export-onnx {w}/users-folder is not empty"),
    ("example.py", ["--export-onnx", ""], "--export-onnx is empty: name a folder"),
    (
        "example.py",
        ["--model-type", "{w}/gpt2", "--export-onnx", "{w}/gpt2", "--overwrite"],
        "gpt2 is the folder the model is read from",
    ),
    (
        "example.py",
        ["--quant-mode", "float8", "--export-dir", "{w}/empty-folder", "--export-onnx", "{w}/empty-folder/onnx"],
        "--export-dir {w}/empty-folder and --export-onnx {w}/empty-folder/onnx overlap: name two separate folders",
    ),
    (
        "example.py",
        ["--quant-mode", "float8", "--export-onnx", "{w}/empty-folder", "--save-quantized", "{w}/empty-folder/q.pt"],
        "--save-quantized {w}/empty-folder/q.pt is inside --export-onnx {w}/empty-folder",
    ),
    (
        "example.py",
        ["--model-type", "{w}/onnx-folder", "--quant-mode", "int4-weight-only"],
        "{w}/onnx-folder is an ONNX folder (written by --export-onnx), which ONNX Runtime runs as it was exported: "
        "--quant-mode does not apply to it",
    ),
    (
        "example.py",
        ["--model-type", "{w}/onnx-folder", "--backend", "tripy", "--export-onnx", "{w}/empty-folder"],
        "--export-onnx, --backend do not apply to it",
    ),
    ("example.py", ["--quant-mode", "float8", "--export-dir", ""], "--export-dir is empty: name a folder"),
    # evaluate.py
    ("evaluate.py", ["--model-type", "{w}/truncated"], "truncated/model.safetensors is truncated"),
    ("evaluate.py", ["--model-type", "{w}/export"], "is a quantized checkpoint"),
    ("evaluate.py", ["--model-type", "{w}/more-layers", "--modes", "unquantized"], "do not match its config.json"),
    ("evaluate.py", ["--model-type", "gpt5"], "unknown --model-type 'gpt5'"),
    ("evaluate.py", ["--model-type", "{w}/gpt2", "--modes", "unquantized"], "has a vocabulary of 512 tokens"),
    ("evaluate.py", ["--eval-data", "{w}/data/empty.txt"], "--eval-data {w}/data/empty.txt is empty"),
    ("evaluate.py", ["--eval-data", "{w}/data/binary.txt"], "--eval-data {w}/data/binary.txt is a binary file"),
    ("evaluate.py", ["--calibration-data", "{w}/data/malformed.json"], "malformed.json is not valid JSON"),
    ("evaluate.py", ["--chart", "{w}/no-such-folder/quality.png"], "the folder {w}/no-such-folder does not exist"),
    ("evaluate.py", ["--chart", "{w}/chart-folder.png"], "chart-folder.png is a folder"),
    ("evaluate.py", ["--chart", "{w}/fifo.png"], "--chart {w}/fifo.png is not a regular file"),
    ("evaluate.py", ["--chart", "{w}/dangling.png"], "dangling.png is a symbolic link to {w}/nowhere.png, which does"),
    ("evaluate.py", ["--model-type", "{w}/zero-heads"], "n_head must be a whole number of at least 1, got 0"),
    ("evaluate.py", ["--model-type", "{w}/garbage-bin", "--modes", "unquantized"], "cannot load the checkpoint in"),
    ("evaluate.py", ["--qat-lr", "inf"], "argument --qat-lr: expected a finite number, got 'inf'"),
    ("evaluate.py", ["--qat-lr", "1e10"], "argument --qat-lr: expected a learning rate above 0 and at most 1"),
    (
        "evaluate.py",
        ["--modes", "int4-weight-only-qat", "--qat-batch-size", "1000000"],
        "fine-tuning batches of --qat-batch-size 1000000 windows of 256 tokens need about",
    ),
    ("evaluate.py", ["--context", "0"], "--context must be at least 1, got 0"),
    ("evaluate.py", ["--modes", "unquantized", "--calibration-data", "{w}/data/good.txt"], "needs a quantized mode"),
    ("evaluate.py", ["--num-calibration-samples", "0"], "--num-calibration-samples must be at least 1, got 0"),
    ("evaluate.py", ["--modes", "int3"], "argument --modes: invalid choice: 'int3'"),
    ("evaluate.py", ["--modes", "float8-kv8"], "argument --modes: invalid choice: 'float8-kv8'"),
    ("evaluate.py", ["--max-tokens", "1"], "--max-tokens must be at least 2"),
    ("evaluate.py", ["--qat-steps", "0"], "--qat-steps must be at least 1, got 0"),
    ("evaluate.py", ["--eval-data", "missing.txt"], "--eval-data: missing.txt not found: expected a text file"),
    ("evaluate.py", ["--eval-data", "{w}/data/folder.txt"], "folder.txt not found (it is a folder)"),
    ("evaluate.py", ["--modes", "unquantized", "--auto-bits", "5"], "--auto-bits would do nothing for --modes unq"),
    ("evaluate.py", ["--modes", "unquantized", "--qat-steps", "5"], "--qat-steps would do nothing for --modes"),
    ("evaluate.py", ["--modes", "unquantized", "--num-calibration-samples", "8"], "--num-calibration-samples would"),
    (
        "evaluate.py",
        ["--modes", "unquantized-finetuned", "--calibration-data", "{w}/data/good.txt"],
        "--calibration-data needs a quantized mode in --modes: unquantized-finetuned calibrate nothing",
    ),
    ("evaluate.py", ["--chart", "{w}/data/notes.png"], "notes.png exists and is not a PNG image: name a new file"),
    ("evaluate.py", ["--chart", "{w}/link.png"], "link.png is a symbolic link to {w}/data/good.txt: name the file"),
    ("evaluate.py", ["--model-type", "{w}/narrow", "--modes", "int4-weight-only"], "is 64 wide, not a multiple of"),
    ("benchmark.py", ["--tiny", "--chart", "{w}/data/notes.png"], "notes.png exists and is not a PNG image"),
    ("evaluate.py", ["--chart", "quality.jpg"], "--chart must name a .png file"),
    ("evaluate.py", ["--auto-bits", "6", "3.5"], "--auto-bits must be between 4 (every layer int4) and 16 (none"),
    ("evaluate.py", ["--context", "100000"], "context 100000 is longer than the model's"),
    ("evaluate.py", ["--model-type", "{w}/data"], "is not a Hugging Face GPT-2 checkpoint"),
    # benchmark.py
    ("benchmark.py", ["--seed", "-1"], "--seed: expected an integer from 0 to 2**64 - 1"),
    ("benchmark.py", ["--threads", "0"], "--threads must be at least 1, got 0"),
    ("benchmark.py", ["--threads", "100000"], "--threads must be from 1 to "),
    ("benchmark.py", ["--n-embd", "0"], "--n-embd must be at least 1, got 0"),
    ("benchmark.py", ["--n-embd", "-768"], "--n-embd must be at least 1, got -768"),
    ("benchmark.py", ["--n-embd", "100"], "--n-embd (100) must be a multiple of --n-head (12)"),
    ("benchmark.py", ["--n-layer", "100000"], "a GPT-2 of these sizes and the batches need about"),
    ("benchmark.py", ["--batch-sizes", "1,100000"], "more than this machine's"),
    ("benchmark.py", ["--positions", ""], "--positions takes comma-separated integers, such as 1,8, got ''"),
    ("benchmark.py", ["--batch-sizes", "1,1"], "--batch-sizes lists a size twice: [1, 1]"),
    ("benchmark.py", ["--tiny", "--chart", "{w}/no-such-folder/chart.png"], "no-such-folder does not exist"),
    ("benchmark.py", ["--backend", "onnx", "--n-embd", "96"], "--backend onnx races int4 in blocks of 128: --n-embd"),
    # train.py
    ("train.py", ["--out-dir", "{w}/new", "--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
    ("train.py", ["--out-dir", "{w}/new", "--lr", "0"], "--lr: expected a learning rate above 0 and at most 1"),
    ("train.py", ["--out-dir", "{w}/new", "--lr", "1e30"], "--lr: expected a learning rate above 0 and at most 1"),
    ("train.py", ["--out-dir", "{w}/dangling"], "--out-dir {w}/dangling is a symbolic link to {w}/nowhere"),
    ("train.py", ["--out-dir", "{w}/new", "--dropout", "1.5"], "--dropout must be from 0 to below 1, got 1.5"),
    ("train.py", ["--out-dir", "{w}/new", "--weight-decay", "-1"], "--weight-decay must be from 0 to 1, got -1.0"),
    ("train.py", ["--out-dir", "{w}/new", "--weight-decay", "1e300"], "--weight-decay must be from 0 to 1, got 1e+300"),
    ("train.py", ["--out-dir", "{w}/new", "--seed", str(2**64)], "expected an integer from 0 to 2**64 - 1"),
    ("train.py", ["--out-dir", "{w}/new", "--n-positions", "1000000"], "training a GPT-2 of these sizes"),
    ("train.py", ["--out-dir", "{w}/new", "--batch-size", "100000"], "more than this machine's"),
    ("train.py", ["--out-dir", "{w}/users-folder"], "--out-dir {w}/users-folder is not empty"),
    ("train.py", ["--out-dir", "{w}/data/good.txt"], "is a file, not a folder"),
    ("train.py", ["--out-dir", ""], "--out-dir is empty: name a folder"),
    # The held-out text has 8,205 tokens (docs/training.md): a window of 9,000 could never be validated on.
    (
        "train.py",
        ["--out-dir", "{w}/new", "--n-positions", "9000", "--n-layer", "1", "--batch-size", "1"],
        "is longer than the held-out",
    ),
    ("train.py", ["--out-dir", BUNDLED_MODEL_DIR], "bundled_model is not empty: choose a new or empty folder, or pass"),
    ("train.py", ["--out-dir", "{w}/new", "--steps", "0"], "--steps must be at least 1, got 0"),
    (
        "train.py",
        ["--out-dir", "{w}/new", "--n-embd", "130"],
        "--n-embd must be a multiple of 128 (int4's block), got 130",
    ),
    ("train.py", ["--out-dir", "{w}/new", "--n-head", "3"], "--n-embd (128) must be a multiple of --n-head (3)"),
    (
        "train.py",
        ["--out-dir", "{w}/new", "--warmup", "1000"],
        "--warmup must be from 0 to --steps - 1 (999), got 1000",
    ),
    ("train.py", ["--out-dir", "{w}/new", "--n-positions", "1"], "--n-positions must be at least 2, got 1"),
    ("train.py", ["--out-dir", "{w}/new", "--eval-interval", "-1"], "--eval-interval must be at least 0, got -1"),
    ("train.py", ["--out-dir", "{w}/new", "--steps", "20", "--warmup", "1"], "--log-interval (50) must be at most"),
    # qat.py
    ("qat.py", ["--out", "{w}/qat.pt", "--steps", "0"], "--steps must be at least 1, got 0"),
    ("qat.py", ["--out", "{w}/qat.pt", "--lr", "0"], "--lr: expected a learning rate above 0 and at most 1, got '0'"),
    ("qat.py", ["--out", "{w}/qat.pt", "--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
    ("qat.py", ["--out", "{w}/qat.pt", "--lr", "inf"], "argument --lr: expected a finite number, got 'inf'"),
    ("qat.py", ["--out", "{w}/qat.pt", "--lr", "1e10"], "expected a learning rate above 0 and at most 1, got '1e10'"),
    ("qat.py", ["--out", "{w}/qat.pt", "--seed", str(2**64)], "--seed: expected an integer from 0 to 2**64 - 1"),
    ("qat.py", ["--out", "{w}/qat.pt", "--batch-size", "1000000"], "windows of 256 tokens need about"),
    ("qat.py", ["--out", "{w}/qat.pt", "--calibration-data", "{w}/data/empty.txt"], "empty.txt is empty"),
    ("qat.py", ["--out", "{w}/qat.pt", "--model-type", "{w}/zero-heads"], "n_head must be a whole number"),
    (
        "qat.py",
        ["--out", "{w}/qat.pt", "--model-type", "{w}/garbage-bin", "--quant-mode", "int8-weight-only"],
        "cannot load the checkpoint in",
    ),
    ("qat.py", ["--out", "{w}/qat.pt", "--model-type", "{w}/narrow"], "narrow is 64 wide, not a multiple of int4's"),
    # The Hub models' widths are known: refused before anything is downloaded.
    ("qat.py", ["--out", "{w}/qat.pt", "--model-type", "gpt2-xl"], "gpt2-xl is 1600 wide, not a multiple of int4's"),
    ("evaluate.py", ["--model-type", "gpt2-xl", "--modes", "auto"], "gpt2-xl is 1600 wide, not a multiple of int4"),
    ("qat.py", ["--out", "{w}/dangling"], "--out {w}/dangling is a symbolic link to {w}/nowhere"),
    # serve_vllm.py
    ("serve_vllm.py", ["{w}/export", "--prompt", ""], "--prompt is empty: give a prompt"),
    ("serve_vllm.py", ["{w}/export", "--max-tokens", "0"], "--max-tokens must be at least 1, got 0"),
    ("serve_vllm.py", ["{w}/data/good.txt"], "is not a directory (expected a float8 or int8-smoothquant export)"),
    ("serve_vllm.py", ["{w}/export"], "export/hf_quant_config.json was not written by ModelOpt"),
    ("qat.py", ["--out", "{w}/qat.pt", "--quant-mode", "int2"], "argument --quant-mode: invalid choice: 'int2'"),
    ("qat.py", ["--out", "{w}/qat.pt", "--model-type", "no/such/model"], "unknown --model-type 'no/such/model'"),
    ("qat.py", ["--out", "{w}/no-such-folder/qat.pt"], "the folder {w}/no-such-folder does not exist"),
    ("qat.py", ["--out", "{w}/users-folder"], "--out {w}/users-folder is a folder: name a file"),
    ("qat.py", ["--out", "{w}/data/good.txt"], "--out {w}/data/good.txt already exists: name a new file"),
    (
        "example.py",
        ["--quant-mode", "float8", "--save-quantized", "{w}/gpt2/model.safetensors"],  # a model's own weights
        "model.safetensors already exists: name a new file (nothing is overwritten)",
    ),
    (
        "example.py",
        ["--quant-mode", "auto", "--effective-bits", "6", "--recipe-out", "{w}/data/strings.json"],
        "strings.json already exists",
    ),
    ("example.py", ["--quant-mode", "int8-weight-only", "--save-quantized", "{w}/users-folder"], "is a folder: name"),
    ("example.py", ["--quant-mode", "int8-weight-only", "--save-quantized", "{w}/no-such-folder/q.pt"], "not exist"),
    (
        "example.py",
        ["--load-quantized", "{w}/data/good.txt", "--save-quantized", "{w}/q.pt"],
        "--load-quantized restores a calibrated model: --save-quantized does not apply",
    ),
    ("example.py", ["--load-quantized", "{w}/users-folder"], "users-folder is a folder: name a file --save-quantized"),
    (
        "example.py",
        ["--quant-mode", "auto", "--effective-bits", "6", "--recipe-out", "{w}/users-folder"],
        "--recipe-out {w}/users-folder is a folder: name a file",
    ),
]


# --lm-head: beside one mode's calibration, in a format the twin can hold beside it and the outputs can store.
# (--quant-mode, --lm-head, more arguments, what the error line says)
INT4, INT8 = "int4-weight-only", "int8-weight-only"
LM_HEAD_CASES = [
    (None, INT8, [], "--lm-head needs --quant-mode: the output layer is calibrated with the block linears"),
    ("float8", INT8, [], "float8 quantizes the output layer already, in float8: it takes no other format for it"),
    (INT4, INT8, [], "an int8 output layer is calibrated with max, and int4-weight-only with awq_lite: take an int4"),
    ("int8-smoothquant", INT8, [], "calibrated with max, and int8-smoothquant with smoothquant: take an int4 one"),
    ("auto", INT4, ["--effective-bits", "6"], "--quant-mode auto searches the block linears only, and leaves the"),
    (INT8, INT4, ["--export-dir", "{w}/empty-folder"], "an output layer of an odd number of rows (GPT-2's 50257)"),
    (INT8, INT4, ["--model-type", "{w}/narrow"], "64 wide, not a multiple of int4's blocks of 128: use --lm-head int8"),
    (INT8, "float8", [], "argument --lm-head: invalid choice: 'float8'"),
    (None, INT4, ["--load-quantized", "{w}/data/good.txt"], "restores the output layer as it was saved: --lm-head"),
    (None, INT8, ["--model-type", "{w}/export"], "calibrated already: --lm-head is for a model that example.py"),
    (None, INT8, ["--model-type", "{w}/onnx-folder"], "which ONNX Runtime runs as it was exported: --lm-head does not"),
]
CASES += [
    ("example.py", [*(["--quant-mode", mode] if mode else []), "--lm-head", head, *more], expected)
    for mode, head, more, expected in LM_HEAD_CASES
]


def case_id(case: tuple) -> str:
    script, arguments, _ = case
    return f"{script} {' '.join(arguments)}".replace("{w}/", "")


@pytest.mark.parametrize("script, arguments, expected", CASES, ids=[case_id(case) for case in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(workspace, capsys, script, arguments, expected):
    watched = (workspace, Path(REPO, "bundled_model"), Path(REPO, "data"))
    before = tree_hash(*watched)
    argv = [argument.replace("{w}", str(workspace)) for argument in arguments]
    line = usage_error(SCRIPTS[script], argv, script, capsys)
    assert expected.replace("{w}", str(workspace)) in line
    assert tree_hash(*watched) == before


# Every count each script takes, and what else its command line needs to get that far.
COUNTS = {
    "benchmark.py": (
        [],
        [
            "--prompt-len",
            "--new-tokens",
            "--repeats",
            "--threads",
            "--n-layer",
            "--n-head",
            "--n-embd",
            "--batch-sizes",
        ],
    ),
    "train.py": (["--out-dir", "{w}/new"], ["--steps", "--batch-size", "--n-layer", "--n-head", "--log-interval"]),
    "evaluate.py": (
        ["--modes", "int4-weight-only-qat"],
        ["--qat-steps", "--qat-batch-size", "--num-calibration-samples"],
    ),
    "qat.py": (["--out", "{w}/qat.pt"], ["--steps", "--batch-size", "--num-calibration-samples"]),
    "example.py": (["--quant-mode", "int8-weight-only"], ["--max-new-tokens", "--top-k", "--num-calibration-samples"]),
}


@pytest.mark.parametrize(
    "script, flag", [(script, flag) for script, (_, flags) in COUNTS.items() for flag in flags], ids=" ".join
)
def test_a_count_of_0_is_refused_naming_only_its_flag(workspace, capsys, script, flag):
    """A refusal names the one value that is wrong and what it got, never a list of flags that might be."""
    needed, _ = COUNTS[script]
    argv = [argument.replace("{w}", str(workspace)) for argument in needed] + [flag, "0"]
    line = usage_error(SCRIPTS[script], argv, script, capsys)
    assert re.findall(r"--[a-z][a-z-]+", line) == [flag], line
    assert line.endswith(("got 0", "got [0]")), line


UNREADABLE_CASES = [
    (
        ["example.py", "--quant-mode", "float8", "--calibration-data", "{u}/calibration.txt"],
        "--calibration-data {u}/calibration.txt",
    ),
    (
        ["evaluate.py", "--model-type", "{u}/gpt2", "--eval-data", "{u}/heldout.txt", "--modes", "unquantized"],
        "--eval-data {u}/heldout.txt",
    ),
    (["example.py", "--model-type", "{u}/config"], "{u}/config/config.json"),
    (["example.py", "--model-type", "{u}/weights"], "{u}/weights/model.safetensors"),
    (["example.py", "--load-quantized", "{u}/quantized.pt"], "--load-quantized {u}/quantized.pt"),
    (["example.py", "--model-type", "{u}/locked"], "{u}/locked"),
]


@pytest.fixture(scope="module")
def unreadable(tmp_path_factory) -> Path:
    """Files their owner keeps to themselves (mode 000), in a folder anyone may enter, and a readable model."""
    root = Path(tempfile.mkdtemp(prefix="unreadable-"))  # not under pytest's own folder, which only its user enters
    root.chmod(0o755)
    config = GPT2Config(vocab_size=512, n_embd=64, n_layer=1, n_head=2, n_positions=32)
    for name in ("gpt2", "config", "weights"):
        GPT2LMHeadModel(config).save_pretrained(root / name)
    for path in (root / "calibration.txt", root / "heldout.txt", root / "quantized.pt"):
        path.write_text("\n\n".join(CALIBRATION_PARAGRAPHS))
    for path in [*root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    (root / "locked").mkdir()  # a folder its owner keeps closed
    for path in (*root.glob("*.*"), root / "config" / "config.json", root / "weights" / "model.safetensors"):
        path.chmod(0)
    (root / "locked").chmod(0)
    yield root
    shutil.rmtree(root)


@pytest.mark.parametrize("arguments, names", UNREADABLE_CASES, ids=[" ".join(a[:3]) for a, _ in UNREADABLE_CASES])
def test_a_file_that_cannot_be_read_is_one_line(unreadable, capsys, arguments, names):
    """Run as an ordinary user: root reads any file, whatever its mode, so as root the check runs as nobody."""
    script, *argv = [argument.replace("{u}", str(unreadable)) for argument in arguments]
    as_root = os.geteuid() == 0
    if as_root:
        os.seteuid(NOBODY)
    try:
        line = usage_error(SCRIPTS[script], argv, script, capsys)
    finally:
        if as_root:
            os.seteuid(0)
    assert f"cannot read {names.replace('{u}', str(unreadable))}: Permission denied" in line


@pytest.mark.parametrize(
    "variable, value, expected",
    [
        ("HF_DATASETS_CACHE", "{w}/data/good.txt/cache", "cache (HF_DATASETS_CACHE) {w}/data/good.txt/cache: {w}/data"),
        ("HF_HOME", "/dev/null/hf", "cannot create the calibration data's cache (HF_HOME) /dev/null/hf/datasets"),
    ],
)
@pytest.mark.parametrize("script", ["example.py", "evaluate.py", "qat.py"])
def test_a_cache_folder_that_cannot_be_written_is_one_line(
    workspace, monkeypatch, capsys, script, variable, value, expected
):
    """`datasets` caches the calibration text before reading it: found after the model loaded, this named nothing."""
    monkeypatch.setenv(variable, value.replace("{w}", str(workspace)))
    argv = {"example.py": ["--quant-mode", "int8-weight-only"], "evaluate.py": [], "qat.py": ["--out", "q.pt"]}[script]
    line = usage_error(SCRIPTS[script], argv, script, capsys)
    assert expected.replace("{w}", str(workspace)) in line


def test_a_damaged_bundled_model_is_one_line(workspace, monkeypatch, capsys):
    """The fallback when gpt2 cannot be downloaded: a copy of the repository whose bundled model was cut short."""
    if isinstance(try_to_load_from_cache("gpt2", "config.json"), str):
        pytest.skip("gpt2 is in this machine's Hugging Face cache: example.py runs it, not the bundled model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "BUNDLED_MODEL_DIR", str(workspace / "truncated"))  # hub.load_hf_model_or_bundled
    line = usage_error(example.main, ["--backend", "torch"], "example.py", capsys)
    assert "the bundled model cannot be loaded: " in line and "truncated/model.safetensors is truncated" in line


@pytest.mark.parametrize("script", ["example.py", "evaluate.py"])
def test_cnn_dailymail_offline_is_refused_before_any_work(monkeypatch, capsys, script):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # hub.hub_reachable answers False at once
    argv = ["--calibration-data", "cnn_dailymail"] + (
        ["--quant-mode", "int8-weight-only"] if script == "example.py" else []
    )
    line = usage_error(SCRIPTS[script], argv, script, capsys)
    assert "cannot download cnn_dailymail for calibration: the Hugging Face Hub is unreachable" in line


def test_good_inputs_pass_the_same_checks(workspace):
    """The checks refuse what is wrong, not more: the cases above with the mistake taken out are accepted."""
    good = ["--quant-mode", "float8", "--model-type", str(workspace / "gpt2")]
    example.parse_args([*good, "--calibration-data", str(workspace / "data" / "good.txt"), "--temperature", "1e-3"])
    example.parse_args([*good, "--temperature", "100"])
    example.parse_args([*good, "--seed", str(2**64 - 1), "--export-dir", str(workspace / "empty-folder")])
    example.parse_args([*good, "--export-dir", str(workspace / "users-folder"), "--overwrite"])
    example.parse_args([*good, "--export-dir", str(workspace / "new" / "nested")])
    int8 = ["--quant-mode", "int8-weight-only", "--lm-head"]
    example.parse_args([*int8, "int8-weight-only", "--export-dir", str(workspace / "empty-folder")])
    example.parse_args([*int8, "int4-weight-only", "--model-type", "gpt2", "--export-onnx", str(workspace / "new")])
    example.parse_args(["--quant-mode", "int4-weight-only", "--lm-head", "int4-weight-only", "--model-type", "gpt2"])
    kv = ["--quant-mode", "int8-weight-only", "--model-type", str(workspace / "gpt2"), "--kv-cache"]
    example.parse_args([*kv, "int8", "--save-quantized", str(workspace / "q.pt")])  # int8's refusal is --export-dir's
    example.parse_args([*kv, "float8", "--export-dir", str(workspace / "empty-folder")])
    assert not (workspace / "new").exists()  # checking that it can be created does not create it
    train.parse_args(["--out-dir", str(workspace / "users-folder"), "--overwrite"])
    evaluate.parse_args(["--eval-data", str(workspace / "data" / "good.txt"), "--chart", str(workspace / "q.png")])


# Run as users run them: what only the real command line shows.
SUBPROCESS_CASES = {
    # A terminal in another encoding: the bytes reach Python as lone surrogates, which the tokenizer would replace.
    "prompt that is not UTF-8": (["example.py", b"--input-text", b"caf\xe9"], "--input-text is not valid UTF-8"),
    "truncated checkpoint": (["example.py", "--model-type", "{w}/truncated"], "model.safetensors is truncated"),
    "export over a user's files": (
        ["example.py", "--quant-mode", "float8", "--export-dir", "{w}/users-folder"],
        "users-folder is not empty",
    ),
    "train over the bundled model": (["train.py", "--out-dir", "bundled_model"], "bundled_model is not empty"),
}


@pytest.fixture(scope="module")
def subprocess_runs(workspace) -> dict[str, subprocess.CompletedProcess]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def run(arguments: list) -> subprocess.CompletedProcess:
        argv = [a.replace("{w}", str(workspace)) if isinstance(a, str) else a for a in arguments]
        return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, timeout=300)

    def read_one_line() -> subprocess.CompletedProcess:
        """`python example.py | head -1`: stdout is closed while the model still writes to it."""
        command = [sys.executable, "example.py", "--backend", "torch", "--max-new-tokens", "64"]
        with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
            process.stdout.readline()
            process.stdout.close()
            stderr = process.stderr.read()
            return subprocess.CompletedProcess(command, process.wait(timeout=300), None, stderr)

    before = tree_hash(workspace, Path(REPO, "bundled_model"), Path(REPO, "data"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        closed_pipe = pool.submit(read_one_line)
        futures = {name: pool.submit(run, arguments) for name, (arguments, _) in SUBPROCESS_CASES.items()}
        results = {name: future.result() for name, future in futures.items()}
        results["closed pipe"] = closed_pipe.result()
    assert tree_hash(workspace, Path(REPO, "bundled_model"), Path(REPO, "data")) == before
    return results


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_command_line_bad_input_is_one_line_and_exit_2(subprocess_runs, workspace, name):
    result = subprocess_runs[name]
    stderr = result.stderr.decode("utf-8", "replace")
    script = SUBPROCESS_CASES[name][0][0]
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr and stderr.count("\n") == 1 and stderr.startswith(f"{script}: error: "), stderr
    assert SUBPROCESS_CASES[name][1].replace("{w}", str(workspace)) in stderr


def test_closing_the_pipe_early_ends_the_run_without_a_traceback(subprocess_runs):
    result = subprocess_runs["closed pipe"]
    assert result.returncode == 1 and result.stderr == b"", result.stderr.decode()


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        cli.run(interrupted, "example.py")
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "\nexample.py: interrupted\n"


# Runs a script with every attempt to reach the network reported and stopped, then says which slow libraries it
# had imported by the time it exited.
NO_NETWORK = """
import os, runpy, sys

def stop_network(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname"):
        print(f"network access attempted: {event} {args}", file=sys.stderr, flush=True)
        os._exit(99)

sys.addaudithook(stop_network)
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("imported:", sorted(name for name in ("torch", "transformers", "huggingface_hub") if name in sys.modules))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["example.py", "--model-type", "gpt2-xl", "--quant-mode", "int4-weight-only"],
        ["example.py", "--model-type", "gpt2-xl", "--quant-mode", "auto", "--effective-bits", "6"],
        ["evaluate.py", "--model-type", "gpt2-xl", "--modes", "int4-weight-only"],
        ["qat.py", "--model-type", "gpt2-xl"],
    ],
)
def test_int4_on_a_hub_model_it_cannot_run_on_is_refused_before_any_download(argv):
    """gpt2-xl is 1600 wide, and int4 needs multiples of 128: known from its name, so refused while the command line
    is read, with no network access and none of the libraries that take seconds to import."""
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}  # as a user's shell has it
    result = subprocess.run(
        [sys.executable, "-c", NO_NETWORK, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"{argv[0]}: error: gpt2-xl is 1600 wide, not a multiple of int4's blocks of 128: "
        + result.stderr.split("blocks of 128: ", 1)[1].strip()
    ]
    assert result.stdout.strip().splitlines()[-1] == "imported: []"
