"""What several test files build: small GPT-2 models and a few paragraphs of calibration text."""

import os
import subprocess
from collections.abc import Callable

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Short paragraphs keep AWQ's search, the slow part, to a few seconds on CPU.
CALIBRATION_PARAGRAPHS = [
    "The town council voted on Tuesday to repair the roads before winter.",
    "Green plants turn sunlight, water and carbon dioxide into sugar.",
    "The train to the coast leaves at nine and arrives just after noon.",
    "She planted tomatoes along the fence and watered them every evening.",
]

# Every format, and an unquantized layer, for make_gpt2's two blocks: a recipe of AutoQuantize's kind.
MIXED_LAYER_QUANT_MODES = {
    "transformer.h.0.attn.c_attn": "int4-weight-only",
    "transformer.h.0.attn.c_proj": "int8-weight-only",
    "transformer.h.0.mlp.c_fc": "float8",
    "transformer.h.0.mlp.c_proj": None,
    "transformer.h.1.attn.c_attn": "float8",
    "transformer.h.1.attn.c_proj": "int4-weight-only",
    "transformer.h.1.mlp.c_fc": "int8-weight-only",
    "transformer.h.1.mlp.c_proj": "int4-weight-only",
}


def make_gpt2(
    n_embd: int = 256,
    n_layer: int = 2,
    n_head: int = 4,
    n_positions: int = 128,
    outlier_gain: float = 20.0,
    seed: int = 0,
) -> GPT2LMHeadModel:
    """A small random GPT-2 with the real vocabulary.

    n_embd >= 256 gives every int4 row at least two blocks of 128. Some LayerNorm gains are scaled up so a few
    input features carry outliers, as in trained LLMs: that is what AWQ's pre_quant_scale exists for.
    """
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions)
    config.architectures = ["GPT2LMHeadModel"]
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            for layer_norm in (block.ln_1, block.ln_2):
                outliers = torch.randperm(n_embd)[: n_embd // 16]
                layer_norm.weight[outliers] *= outlier_gain
    return model


# `python -c RUN_BEFORE_TORCH [example.py's arguments]` runs example.py, then fails if torch, transformers, ModelOpt
# or datasets were imported: what --help and a mistake on the command line must answer without (they take seconds).
RUN_BEFORE_TORCH = """
import runpy, sys
sys.argv = ['example.py', *sys.argv[1:]]
try:
    runpy.run_path('example.py', run_name='__main__')
except SystemExit as exit:
    status = exit.code
heavy = sorted({'torch', 'transformers', 'modelopt', 'datasets'} & set(sys.modules))
assert not heavy, f'imported {heavy}'
sys.exit(status)
"""


def usage_error(main: Callable[[list[str]], object], argv: list[str], prog: str, capsys) -> str:
    """Runs a script's `main(argv)` the way its command line does (cli.run); checks that it stops with exit status 2
    and one line `prog: error: ...` on stderr, no traceback; returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: main(argv), prog)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"{prog}: error: ") and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    return stderr.strip()


def assert_usage_error(result: subprocess.CompletedProcess, prog: str, expected: str) -> None:
    """A script run in a subprocess stopped as a mistake in its input should: exit status 2, one line
    `prog: error: ...` on stderr that says `expected`, no traceback."""
    assert result.returncode == 2, f"exit status {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr
    assert expected in lines[0]
