"""The README and docs/ as a newcomer uses them, and the shape of the code behind them.

- Every relative link and image resolves to a file in the repository.
- Every command shown runs as shown: each `python SCRIPT.py ...` line in a ```bash block or after `$ ` in a ```console
  block names a script that exists and passes that script's own `parse_args`; each file a command names exists.
- Every file or folder a documented command writes is in out/, which git ignores: the pages never have a reader
  overwrite a tracked file or leave untracked ones behind.
- The README's example prints, as its first line, what the command prints on a fresh machine without nvtripy.
- CI (.ci/run) runs the README's test line verbatim.
- docs/development.md's break-it run of the Tripy API check shows what the check reports today, line number included.
"""

import glob
import importlib
import os
import re
import shlex
import subprocess
import sys

import pytest
from helpers import REPO

from cli import UsageError

PAGES = ["README.md", *sorted(os.path.relpath(path, REPO) for path in glob.glob(os.path.join(REPO, "docs", "*.md")))]
SCRIPTS = ("example", "evaluate", "benchmark", "train", "serve_vllm", "qat", "exports.optimum_generate")
# Options whose value a command creates: a later command on the same page may read it.
CREATING_OPTIONS = (
    "--export-dir",
    "--export-onnx",
    "--out-dir",
    "--chart",
    "--save-quantized",
    "--recipe-out",
    "--out",
)
# The parsed arguments, by their argparse names, that name a file or folder the script writes.
OUTPUT_ARGUMENTS = ("export_dir", "export_onnx", "out_dir", "chart", "save_quantized", "recipe_out", "out")


def read(page: str) -> str:
    with open(os.path.join(REPO, page), encoding="utf-8") as file:
        return file.read()


def shell_commands(text: str) -> list[tuple[str, str]]:
    """(command, the output shown after it) for every line of a ```bash block and every `$ ` line of a ```console
    block; a command joined with `&&` counts as several."""
    commands = []
    for language, block in re.findall(r"```(bash|console)\n(.*?)```", text, flags=re.S):
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if language == "console" and not line.startswith("$ "):
                continue
            output = []
            if language == "console":
                next_command = next((j for j, later in enumerate(lines[i + 1 :]) if later.startswith("$ ")), None)
                output = lines[i + 1 : i + 1 + next_command] if next_command is not None else lines[i + 1 :]
            line = line.removeprefix("$ ").split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.extend((part.strip(), "\n".join(output)) for part in line.split("&&"))
    return commands


def python_commands(page: str) -> list[tuple[list[str], str]]:
    """`python SCRIPT.py args` commands of a page as argument lists without shell redirections, with their output."""
    found = []
    for command, output in shell_commands(read(page)):
        words = [word for word in shlex.split(command) if not re.match(r"^\d?>", word)]
        if len(words) >= 2 and words[0] == "python" and words[1].endswith(".py"):
            found.append((words[1:], output))
    return found


def bash_lines(text: str) -> list[str]:
    """Whole lines of the ```bash blocks, as a reader copies them."""
    return [line.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S) for line in block.splitlines()]


@pytest.mark.parametrize("page", PAGES)
def test_links_resolve(page):
    folder = os.path.dirname(os.path.join(REPO, page))
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", read(page)):
        if not re.match(r"^[a-z]+://", target):
            assert os.path.exists(os.path.join(folder, target)), f"{page} links to {target}, which does not exist"


def test_every_docs_page_is_linked_from_the_readme():
    readme = read("README.md")
    for page in PAGES[1:]:
        assert f"]({page})" in readme, f"README.md does not link {page}"


@pytest.mark.parametrize("page", PAGES)
def test_python_commands_parse(page, monkeypatch):
    monkeypatch.chdir(REPO)
    created = set()
    for words, output in python_commands(page):
        script, argv = words[0], words[1:]
        assert os.path.isfile(os.path.join(REPO, script)), f"{page}: {script} does not exist"
        module_name = script.removesuffix(".py")
        documented_error = next((line for line in output.splitlines() if line.startswith(f"{script}: error: ")), None)
        if module_name in SCRIPTS:
            try:
                args = importlib.import_module(module_name).parse_args(argv)
            except UsageError as error:
                if documented_error is not None:  # shown failing: with the message the page shows
                    assert documented_error == f"{script}: error: {' '.join(str(error).split())}", page
                # A folder or file that an earlier command on the page writes is there when the reader gets here;
                # one in out/ may be there from this checkout's earlier runs (outputs are never overwritten).
                elif not any(path in str(error) for path in created) and not re.search(
                    r"\bout/\S+ (already|is not)", str(error)
                ):
                    raise AssertionError(f"{page}: `python {' '.join(words)}` fails: {error}") from None
            else:  # what it writes by default, in out/, counts too
                created.update(str(getattr(args, name)) for name in OUTPUT_ARGUMENTS if getattr(args, name, None))
        for option, value in zip(argv, argv[1:], strict=False):
            if option in CREATING_OPTIONS:
                created.add(value.rstrip("/"))


@pytest.mark.parametrize("page", PAGES)
def test_commands_write_only_into_out(page, monkeypatch):
    monkeypatch.chdir(REPO)
    for words, _ in python_commands(page):
        module_name = words[0].removesuffix(".py")
        if module_name not in SCRIPTS:
            continue
        try:
            args = importlib.import_module(module_name).parse_args(words[1:])
        except UsageError:
            continue  # refused: it writes nothing (test_python_commands_parse says whether the page expects that)
        for name in OUTPUT_ARGUMENTS:
            path = getattr(args, name, None)
            if path is not None:
                assert os.path.normpath(path).split(os.sep)[0] == "out", (
                    f"{page}: `python {' '.join(words)}` writes {path}, outside out/"
                )


@pytest.mark.parametrize("page", PAGES)
def test_files_that_commands_name_exist(page):
    for command, _ in shell_commands(read(page)):
        words = shlex.split(command)
        for option, value in zip(words, words[1:], strict=False):
            if option == "-r" or (words[:3] == ["python", "-m", "pytest"] and value.startswith("tests/")):
                assert os.path.exists(os.path.join(REPO, value)), f"{page}: `{command}` names {value}, not found"


def test_ci_runs_the_readme_test_line_verbatim():
    readme_commands = [line for line in bash_lines(read("README.md")) if line.endswith("pytest -q")]
    assert len(readme_commands) == 1, readme_commands
    with open(os.path.join(REPO, ".ci", "run")) as file:
        assert readme_commands[0] in file.read().splitlines()


# Runs a script with nvtripy absent, as on a fresh machine where only requirements.txt was installed: None in
# sys.modules is how Python marks a module that cannot be imported (find_spec gives None, import raises).
WITHOUT_NVTRIPY = """
import runpy, sys
sys.modules["nvtripy"] = None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_readme_example_prints_the_first_line_shown_without_nvtripy():
    shown_runs = [
        (words, output) for words, output in python_commands("README.md") if words[0] == "example.py" and output
    ]
    words, output = shown_runs[0]
    shown = output.splitlines()[0]
    command = [sys.executable, "-u", "-c", WITHOUT_NVTRIPY, *words]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as run:
        try:
            first_line = run.stdout.readline().rstrip("\n")
        finally:
            run.kill()  # the rest (calibration, generation) is another test's
    assert first_line == shown


def test_development_page_shows_what_the_tripy_api_check_reports():
    """The page breaks model.py with a `sed` and shows the checker's message, which names a line of model.py: when
    model.py changes, the page must change with it."""
    from test_tripy_api import NvtripyApi, check_source, nvtripy_source_dir

    package_dir = nvtripy_source_dir()
    if package_dir is None:
        pytest.skip("nvtripy's source is not installed (CI installs it: pip install --no-deps nvtripy==0.1.7)")
    page = read(os.path.join("docs", "development.md"))
    old, new = re.search(r"^\$ sed -i 's/(.+?)/(.+?)/' model\.py$", page, flags=re.M).groups()
    shown = re.search(r"^E +AssertionError: (.+)$", page, flags=re.M).group(1)
    source = read("model.py")
    assert len(re.findall(re.escape(old), source)) == 1, f"the page's sed expects one {old!r} in model.py"
    broken = source.replace(old, new)
    errors, _ = check_source(broken, "model.py", NvtripyApi(package_dir))
    assert errors == [shown]
