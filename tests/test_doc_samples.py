"""Every text a page shows `example.py` generating is what a fresh run of the same command prints, on this machine
as on the one it was recorded on: the README's and docs/'s ```console blocks are run as written (their out/ folders
moved to a temporary one, the Hugging Face Hub offline and its cache empty, as on the fresh machine the pages
describe), and the text between the two separator lines is compared with the page's.

A sample whose text depends on the CPU says so in the paragraph above its block, with the words "varies by CPU" and
the reason; for it the run must still print the prompt first, and each command of the block the same text (an
export runs what the run that wrote it generated). Each block's commands run in order; the blocks, two at a time, in
the background from the start of the session (conftest.py).
"""

import os
import re
import shlex
import subprocess
import sys

import pytest
from helpers import REPO

import example
from cli.example_args import DEFAULT_PROMPT

PAGES = [
    "README.md",
    *sorted(f"docs/{name}" for name in os.listdir(os.path.join(REPO, "docs")) if name.endswith(".md")),
]
VARIES = "varies by CPU"


def sample_blocks(page: str) -> list[tuple[str, list[tuple[list[str], str]], bool]]:
    """(an id, the block's example.py commands with the text each is shown generating, whether the paragraph above
    the block marks its text as varying by CPU) for each ```console block that shows generated text."""
    with open(os.path.join(REPO, page), encoding="utf-8") as file:
        text = file.read()
    blocks, previous_end = [], 0
    for match in re.finditer(r"```console\n(.*?)```", text, flags=re.S):
        above, previous_end = text[previous_end : match.start()], match.end()
        commands = []
        for command, output in re.findall(r"^\$ (.*)\n((?:(?!\$ ).*\n)*)", match.group(1), flags=re.M):
            words = shlex.split(command)
            if words[:2] == ["python", "example.py"] and output.count(example.SEPARATOR) == 2:
                commands.append((words[2:], output.split(example.SEPARATOR + "\n")[1]))
        if commands:
            line = text.count("\n", 0, match.start()) + 1
            blocks.append((f"{page}:{line}", commands, VARIES in above.strip().split("\n\n")[-1]))
    return blocks


BLOCKS = [block for page in PAGES for block in sample_blocks(page)]


def run_block(commands: list[tuple[list[str], str]], workdir: str, env: dict[str, str]) -> list[str]:
    """Runs the block's commands in order, each out/ path moved into `workdir`; returns the text each generated."""
    texts = []
    for argv, _ in commands:
        argv = [os.path.join(workdir, word) if word.startswith("out/") else word for word in argv]
        result = subprocess.run(
            [sys.executable, "example.py", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, f"{' '.join(argv)}\n{result.stdout}\n{result.stderr}"
        texts.append(result.stdout.split(example.SEPARATOR + "\n")[1])
    return texts


def start_cli_runs(background, tmp_path_factory):
    """block id -> Future of the texts its commands generated."""
    futures = {}
    for block_id, commands, _ in BLOCKS:
        workdir = str(tmp_path_factory.mktemp("sample"))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": os.path.join(workdir, "hf-home"), "OMP_NUM_THREADS": "1"}
        futures[block_id] = background.submit(run_block, commands, workdir, env)
    return futures


@pytest.fixture
def runs(cli_runs):
    return cli_runs.of(__name__)


def test_the_pages_show_samples():
    assert len(BLOCKS) >= 3 and sum(len(commands) for _, commands, _ in BLOCKS) >= 5, BLOCKS


@pytest.mark.parametrize("block_id, commands, varies", BLOCKS, ids=[block[0] for block in BLOCKS])
def test_a_fresh_run_prints_the_text_the_page_shows(runs, block_id, commands, varies):
    texts = runs[block_id].result()
    for (argv, shown), text in zip(commands, texts, strict=True):
        if varies:  # the page says why it can differ; on any one machine the block's commands agree
            prompt = argv[argv.index("--input-text") + 1] if "--input-text" in argv else DEFAULT_PROMPT
            assert text.startswith(prompt) and text == texts[0], f"python example.py {' '.join(argv)}"
        else:
            assert text == shown, f"python example.py {' '.join(argv)} printed:\n{text}"
