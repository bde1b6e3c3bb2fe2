"""The shape of the code, read with Python's `ast` module (nothing is imported):

- No function of the project's own code (tests aside) is longer than 80 lines: one screen per idea.
- The root holds at most 11 modules: the lesson and the documented scripts. Every other module lives in a folder
  whose __init__.py opens with a paragraph saying what the folder holds.
- No module imports another in a circle, folders' modules included, and none imports a command-line script.
"""

import ast
import os

import pytest
from helpers import REPO

MAX_FUNCTION_LINES = 80
MAX_ROOT_MODULES = 11
# The command-line scripts, by module name: a module that imports one would run its flags' parsing as a library.
SCRIPTS = ("example", "evaluate", "benchmark", "train", "serve_vllm", "qat", "exports.optimum_generate")


def project_modules(root: str = REPO) -> dict[str, str]:
    """module name -> path, for every .py of the project outside tests/: "cli" for cli/__init__.py, "cli.checks" for
    cli/checks.py. Hidden folders (.venv, .git) and out/ hold no code of the project."""
    modules = {}
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith(".") and name not in ("tests", "out"))
        parts = os.path.relpath(folder, root).split(os.sep)
        parts = [] if parts == ["."] else parts
        for name in files:
            if name.endswith(".py"):
                module = parts if name == "__init__.py" else [*parts, name[: -len(".py")]]
                modules[".".join(module)] = os.path.join(folder, name)
    return modules


def parse(path: str) -> ast.Module:
    with open(path, encoding="utf-8") as file:
        return ast.parse(file.read(), filename=path)


def long_functions(root: str = REPO) -> list[str]:
    """`path:line name is N lines` for each function or method over MAX_FUNCTION_LINES, decorators excluded."""
    found = []
    for path in project_modules(root).values():
        for node in ast.walk(parse(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{os.path.relpath(path, root)}:{node.lineno} {node.name} is {length} lines")
    return found


def test_no_function_is_longer_than_80_lines():
    assert long_functions() == []


def test_the_function_length_check_finds_a_long_function(tmp_path):
    """The check itself: a 81-line function in a folder is found, an 80-line one is not."""
    (tmp_path / "tools").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 1))
    (tmp_path / "tools" / "long.py").write_text(f"def fits():\n{body}\n\n\ndef too_long():\n{body}\n    x = 0\n")
    assert long_functions(str(tmp_path)) == [f"tools{os.sep}long.py:{MAX_FUNCTION_LINES + 3} too_long is 81 lines"]


def test_the_root_holds_at_most_11_modules():
    root_modules = sorted(name for name in os.listdir(REPO) if name.endswith(".py"))
    assert len(root_modules) <= MAX_ROOT_MODULES, root_modules


def test_each_folder_of_modules_opens_with_a_paragraph():
    folders = {os.path.dirname(path) for path in project_modules().values()} - {REPO}
    assert folders, "no folder of modules found"
    for folder in sorted(folders):
        init = os.path.join(folder, "__init__.py")
        assert os.path.isfile(init), f"{os.path.relpath(folder, REPO)}/ has modules but no __init__.py"
        docstring = ast.get_docstring(parse(init))
        assert docstring and len(docstring.split()) >= 10, (
            f"{os.path.relpath(init, REPO)} does not open with a paragraph saying what the folder holds"
        )


def imported_modules(module: str, tree: ast.Module, modules: set[str]) -> set[str]:
    """The project's modules that `module` imports, by dotted name, inside functions too. Importing a.b.c runs
    a/__init__.py and a/b/__init__.py first, so a and a.b count too; `from a import b` imports the module a.b when
    there is one. A module's own packages do not count: Python runs them before the module whether it names them or
    not (cli/checks.py's `from cli import UsageError`), and a package may import its modules."""
    package = module if module in packages(modules) else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x, from .a import x: relative to the module's own package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(part for part in [*anchor, base] if part)
            names.add(base)
            names.update(f"{base}.{alias.name}".lstrip(".") for alias in node.names)
    found = set()
    for name in names:
        parts = name.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    return (found & modules) - {module} - own_packages


def packages(modules: set[str]) -> set[str]:
    """The modules that are folders (their __init__.py)."""
    return {module.rpartition(".")[0] for module in modules if "." in module}


def import_graph(root: str = REPO) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {module: imported_modules(module, parse(path), set(modules)) for module, path in modules.items()}


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, as the modules along it, or None."""
    done, in_progress = set(), []

    def visit(module: str) -> list[str] | None:
        if module in in_progress:
            return [*in_progress[in_progress.index(module) :], module]
        if module in done:
            return None
        in_progress.append(module)
        for imported in sorted(graph[module]):
            cycle = visit(imported)
            if cycle:
                return cycle
        in_progress.pop()
        done.add(module)
        return None

    return next((cycle for module in sorted(graph) if (cycle := visit(module))), None)


def test_the_import_graph_covers_the_folders():
    graph = import_graph()
    assert {"cli", "cli.checks", "cli.example_args", "exports.onnx_runtime", "quant.auto_quantize"} <= set(graph)
    assert {"cli", "cli.example_args"} <= graph["example"]  # from cli.example_args import ...
    assert "cli.checks" in graph["cli.example_args"]  # from cli import checks: a module, not a name in cli


def test_no_import_cycles_and_no_script_imports_a_script():
    graph = import_graph()
    for module, imported in graph.items():
        assert not imported & set(SCRIPTS), f"{module} imports the script(s) {imported & set(SCRIPTS)}"
    cycle = import_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


@pytest.mark.parametrize(
    "files, cycle",
    [
        # a package whose __init__ imports a module that imports the package's other module, which needs the first
        (
            {"pkg/__init__.py": "from pkg import a\n", "pkg/a.py": "import pkg.b\n", "pkg/b.py": "from pkg import a\n"},
            "pkg.a -> pkg.b",
        ),
        # two folders' modules in a circle
        (
            {
                "a/__init__.py": "",
                "a/one.py": "from b import two\n",
                "b/__init__.py": "",
                "b/two.py": "from a import one\n",
            },
            "a.one -> b.two",
        ),
        ({"pkg/__init__.py": "", "pkg/a.py": "from . import b\n", "pkg/b.py": "from .a import x\n"}, "pkg.a -> pkg.b"),
        # importing one's own package, and a sibling by its full name, is no cycle
        ({"pkg/__init__.py": "", "pkg/a.py": "from pkg import b\n", "pkg/b.py": "import pkg\n"}, None),
    ],
)
def test_the_cycle_check_sees_folders_modules(tmp_path, files, cycle):
    """The check itself, on small trees: cycles through folders are found whichever way they are imported."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    found = import_cycle(import_graph(str(tmp_path)))
    assert (found and " -> ".join(found[:2])) == cycle, found
