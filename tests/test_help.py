"""Every script's --help, as a newcomer reads it: printed before torch is imported (so it answers at once), a help
line for every flag, each default said once, and nothing of the machine it runs on (no absolute paths)."""

import re
import subprocess
import sys

import pytest
from helpers import REPO

SCRIPTS = ("example.py", "evaluate.py", "benchmark.py", "qat.py", "train.py", "serve_vllm.py")
# Runs a script as `python SCRIPT --help` does, then reports which of the slow libraries it had imported.
HELP_THEN_REPORT_IMPORTS = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
print("imported:", sorted(name for name in ("torch", "transformers", "modelopt") if name in sys.modules))
"""


@pytest.fixture(scope="module")
def help_texts() -> dict[str, tuple[str, str]]:
    """script -> (its --help, the slow libraries imported by the time it was printed)."""
    texts = {}
    for script in SCRIPTS:
        result = subprocess.run(
            [sys.executable, "-c", HELP_THEN_REPORT_IMPORTS, script], cwd=REPO, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        help_text, imported = result.stdout.rsplit("imported:", 1)
        texts[script] = (help_text, imported.strip())
    return texts


def option_entries(help_text: str) -> dict[str, str]:
    """--flag -> its help line, as argparse lays an option out: the flags and metavar, two or more spaces (or a new
    line), then the help, wrapped and indented."""
    options = help_text.split("options:", 1)[1]
    entries = {}
    for entry in re.split(r"\n(?=  -)", options.strip("\n")):
        first_line, *more_lines = entry.strip().split("\n")
        invocation, *help_start = re.split(r"\s{2,}", first_line, maxsplit=1)
        flag = re.findall(r"--?[\w-]+", invocation)[-1]
        entries[flag] = " ".join([*help_start, *(line.strip() for line in more_lines)])
    return entries


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_printed_before_torch_is_imported(help_texts, script):
    help_text, imported = help_texts[script]
    assert help_text.startswith("usage: ")
    assert imported == "[]", f"{script} --help imported {imported}: it waits seconds for them"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help_and_says_its_default_once(help_texts, script):
    entries = option_entries(help_texts[script][0])
    assert "--help" in entries and len(entries) > 2
    for flag, entry in entries.items():
        assert entry, f"{script} {flag} has no help line"
        assert len(re.findall(r"[(\[]default", entry)) <= 1, f"{script} {flag} states its default twice: {entry}"
        assert "(default: None)" not in entry, f"{script} {flag}: {entry}"


def test_export_dir_help_claims_only_what_was_run(help_texts):
    """vLLM serves the float8 export, and the int8-smoothquant one through serve_vllm.py's conversion; TensorRT-LLM
    never ran here (docs/export.md): the help says so."""
    entry = option_entries(help_texts["example.py"][0])["--export-dir"]
    assert "vLLM serves the float8 one, and serve_vllm.py the int8-smoothquant one" in entry
    assert "TensorRT-LLM reads the format, but was never run" in entry


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_names_no_path_of_this_machine_and_no_python_literals(help_texts, script):
    help_text = help_texts[script][0]
    assert str(REPO) not in help_text, f"{script} --help prints this checkout's path"
    assert not re.search(r"\s/(?:home|work|tmp|usr|root)/", help_text), f"{script} --help prints an absolute path"
    assert not re.search(r"\{'|\['", help_text), f"{script} --help prints a Python dict or list"


def test_kv_cache_help_says_what_each_choice_is_for(help_texts):
    """float8 for serving engines (vLLM, through --export-dir), int8 for ONNX Runtime's GroupQueryAttention on a CPU,
    which --export-dir cannot hold."""
    entry = option_entries(help_texts["example.py"][0])["--kv-cache"]
    float8, int8 = entry.split("float8 (ModelOpt's FP8_KV_CFG)", 1)[1].split(" int8 is ", 1)
    assert "serving engines" in float8 and "vLLM" in float8
    assert "ONNX Runtime's GroupQueryAttention" in int8 and "--onnx-flavor ort" in int8
    assert "--export-dir cannot hold it" in int8
