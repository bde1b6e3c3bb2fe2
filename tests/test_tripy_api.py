"""A static check that the project calls nvtripy's API as nvtripy 0.1.7's own source defines it.

`import nvtripy` needs TensorRT's compiler and runtime, which are not on PyPI, and running the model needs a GPU, so
without both the Tripy code paths never run. Their source still says what they call: this test reads the project's
files with `ast`, and nvtripy's installed (pure-Python) source the same way, never importing it, and reports
    - a `tp.X` that is not in nvtripy's public API (`nvtripy/__init__.pyi` lists every public name and its module),
    - a `tp.X.Y` that class or module X does not define,
    - an import from an nvtripy module that does not define the name,
    - a call with a keyword the function (or the class's __init__) does not take, more positional arguments than
      it has, or a required argument missing. Overloaded functions (tp.arange) must match one overload.
It cannot see argument types or values: the GPU tests in test_tripy_model.py run the code.
"""

import ast
import importlib.util
import os
from dataclasses import dataclass, field

import pytest
from helpers import REPO

# The files with code that runs only with nvtripy (weight_loader.py: loading into the Tripy model).
CHECKED_FILES = ("model.py", "example.py", "weight_loader.py", "tests/test_tripy_model.py")


def nvtripy_source_dir() -> str | None:
    """nvtripy's package directory, found without importing it (find_spec does not run a top-level package)."""
    spec = importlib.util.find_spec("nvtripy")
    return None if spec is None or spec.origin is None else os.path.dirname(spec.origin)


@dataclass
class Signature:
    arguments: ast.arguments
    is_method: bool  # the first parameter is self, which a call does not pass
    where: str  # "nvtripy/frontend/module/linear.py:59"

    def describe(self) -> str:
        args = self.arguments
        params = [a.arg for a in args.posonlyargs + args.args][1 if self.is_method else 0 :]
        if args.vararg is not None:
            params.append(f"*{args.vararg.arg}")
        elif args.kwonlyargs:
            params.append("*")
        params += [a.arg for a in args.kwonlyargs]
        if args.kwarg is not None:
            params.append(f"**{args.kwarg.arg}")
        return f"({', '.join(params)}) at {self.where}"

    def call_errors(self, call: ast.Call) -> list[str]:
        """What is wrong with `call` for this signature, in words; empty when Python would accept it."""
        args = self.arguments
        all_positional = args.posonlyargs + args.args
        skip = 1 if self.is_method else 0
        positional = [a.arg for a in all_positional][skip:]
        required = [a.arg for a in all_positional[: len(all_positional) - len(args.defaults)]][skip:]
        required += [a.arg for a, default in zip(args.kwonlyargs, args.kw_defaults, strict=True) if default is None]
        by_keyword = {a.arg for a in args.args + args.kwonlyargs}
        unpacks = any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords)

        errors = []
        num_positional = sum(not isinstance(a, ast.Starred) for a in call.args)
        if args.vararg is None and num_positional > len(positional):
            errors.append(f"takes at most {len(positional)} positional arguments, got {num_positional}")
        given = set(positional[:num_positional])
        for keyword in call.keywords:
            if keyword.arg is None:
                continue
            if keyword.arg not in by_keyword and args.kwarg is None:
                errors.append(f"has no parameter {keyword.arg!r}")
            elif keyword.arg in given:
                errors.append(f"got {keyword.arg!r} both by position and by keyword")
            given.add(keyword.arg)
        missing = [name for name in required if name not in given]
        if missing and not unpacks:
            errors.append(f"is missing required argument(s) {', '.join(missing)}")
        return errors


@dataclass
class NvtripyApi:
    """nvtripy's public names and definitions, read from its source."""

    package_dir: str
    public: dict[str, str] = field(default_factory=dict)  # public name -> defining module ("nvtripy.frontend...")
    _trees: dict[str, ast.Module | None] = field(default_factory=dict)

    def __post_init__(self):
        stub = ast.parse(open(os.path.join(self.package_dir, "__init__.pyi")).read())
        for node in stub.body:
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    self.public[alias.asname or alias.name] = node.module
            elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                for name in ast.literal_eval(node.value):
                    if name.startswith("nvtripy."):  # submodules: tp.config, tp.types
                        self.public[name.removeprefix("nvtripy.")] = name

    def module_tree(self, module: str) -> ast.Module | None:
        """The parsed source of an nvtripy module ("nvtripy.frontend.ops.arange"), or None if there is none."""
        if module not in self._trees:
            base = os.path.join(os.path.dirname(self.package_dir), *module.split("."))
            paths = [base + ".py", os.path.join(base, "__init__.py")]
            path = next((p for p in paths if os.path.isfile(p)), None)
            self._trees[module] = None if path is None else ast.parse(open(path).read(), path)
        return self._trees[module]

    def relative_path(self, module: str) -> str:
        path = os.path.join(*module.split("."))
        return path + ".py" if os.path.isfile(os.path.join(os.path.dirname(self.package_dir), path + ".py")) else path

    def definitions(self, module: str, name: str) -> list[tuple[str, ast.AST]]:
        """(module, node) for each top-level definition of `name` in `module`, following `from nvtripy... import`."""
        tree = self.module_tree(module)
        if tree is None:
            return []
        found = []
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
                found.append((module, node))
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    found.append((module, node))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nvtripy"):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        found += self.definitions(node.module, alias.name) or [(module, node)]
        return found

    def signatures(self, module: str, name: str) -> list[Signature]:
        """The signatures a call to `name` must match one of: the functions, or the class's __init__."""
        signatures = []
        for defined_in, node in self.definitions(module, name):
            where = f"{self.relative_path(defined_in)}:{node.lineno}"
            if isinstance(node, ast.FunctionDef):
                signatures.append(Signature(node.args, False, where))
            elif isinstance(node, ast.ClassDef):
                init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
                if init is not None:
                    signatures.append(Signature(init.args, True, f"{self.relative_path(defined_in)}:{init.lineno}"))
                else:
                    for base in node.bases:
                        if isinstance(base, ast.Name):
                            signatures += self.signatures(defined_in, base.id)
        return signatures

    def has_attribute(self, module: str, name: str, attribute: str) -> bool | None:
        """Whether class or module `name` defines `attribute`; None when that cannot be told from the source."""
        if module == f"nvtripy.{name}":  # a submodule: its top-level names
            return bool(self.definitions(module, attribute))
        for defined_in, node in self.definitions(module, name):
            if not isinstance(node, ast.ClassDef):
                return None
            if attribute in self._class_members(node) or (name == "Tensor" and attribute in self._tensor_methods()):
                return True
            for base in node.bases:
                found = self.has_attribute(defined_in, base.id, attribute) if isinstance(base, ast.Name) else None
                if found is not False:
                    return found
            return False
        return None

    @staticmethod
    def _class_members(node: ast.ClassDef) -> set[str]:
        members = set()
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.ClassDef)):
                members.add(item.name)
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                members.add(item.target.id)
            elif isinstance(item, ast.Assign):
                members.update(t.id for t in item.targets if isinstance(t, ast.Name))
        return members

    def _tensor_methods(self) -> set[str]:
        """Tensor methods that ops add with @register_tensor_method("name") (tensor.shape, tensor.reshape, ...)."""
        methods = set()
        for directory, _, files in os.walk(os.path.join(self.package_dir, "frontend", "ops")):
            for file in files:
                if file.endswith(".py"):
                    for node in ast.walk(ast.parse(open(os.path.join(directory, file)).read())):
                        if (
                            isinstance(node, ast.Call)
                            and getattr(node.func, "id", None) == "register_tensor_method"
                            and node.args
                            and isinstance(node.args[0], ast.Constant)
                        ):
                            methods.add(node.args[0].value)
        return methods


def check_source(source: str, filename: str, api: NvtripyApi) -> tuple[list[str], set[str]]:
    """Checks every use of nvtripy in `source`; returns the errors and the public names used."""
    tree = ast.parse(source, filename)
    errors, used = [], set()
    module_aliases = set()  # "tp" for `import nvtripy as tp`
    imported = {}  # local name -> (module, name) for `from nvtripy... import name`

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            module_aliases.update(a.asname or a.name for a in node.names if a.name == "nvtripy")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nvtripy":
            for alias in node.names:
                if node.module == "nvtripy":
                    defined = alias.name in api.public
                    target = (api.public.get(alias.name), alias.name)
                else:
                    defined = bool(api.definitions(node.module, alias.name))
                    target = (node.module, alias.name)
                if not defined:
                    errors.append(f"{filename}:{node.lineno}: {node.module} has no {alias.name!r}")
                else:
                    imported[alias.asname or alias.name] = target

    def resolve(expr: ast.expr) -> tuple[str, str, str] | None:
        """(module, name, as written) when `expr` is tp.X or a name imported from nvtripy."""
        if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name) and expr.value.id in module_aliases:
            if expr.attr in api.public:
                return api.public[expr.attr], expr.attr, f"{expr.value.id}.{expr.attr}"
        elif isinstance(expr, ast.Name) and expr.id in imported:
            module, name = imported[expr.id]
            return module, name, expr.id
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in module_aliases:
            if node.attr not in api.public:
                errors.append(f"{filename}:{node.lineno}: {node.value.id}.{node.attr} is not in nvtripy's public API")
            used.add(node.attr)
        elif isinstance(node, ast.Attribute) and (owner := resolve(node.value)) is not None:
            module, name, written = owner
            if api.has_attribute(module, name, node.attr) is False:
                errors.append(f"{filename}:{node.lineno}: {written}.{node.attr}: {name} has no {node.attr!r}")
        elif isinstance(node, ast.Call) and (callee := resolve(node.func)) is not None:
            module, name, written = callee
            signatures = api.signatures(module, name)
            problems = [(signature, signature.call_errors(node)) for signature in signatures]
            if problems and all(errs for _, errs in problems):
                for signature, errs in problems:
                    errors.append(f"{filename}:{node.lineno}: {written}() {'; '.join(errs)}: {signature.describe()}")
    return errors, used


@pytest.fixture(scope="module")
def api() -> NvtripyApi:
    package_dir = nvtripy_source_dir()
    if package_dir is None:
        pytest.skip("nvtripy's source is not installed (CI installs it: pip install --no-deps nvtripy==0.1.7)")
    return NvtripyApi(package_dir)


@pytest.mark.parametrize("filename", CHECKED_FILES)
def test_file_calls_nvtripy_as_its_source_defines(api, filename):
    path = os.path.join(REPO, filename)
    assert os.path.isfile(path), f"{filename} is missing"
    errors, used = check_source(open(path).read(), filename, api)
    assert not errors, "\n".join(errors)
    if filename == "model.py":  # the check saw the model's own calls, so it was not vacuous
        assert {"Linear", "quantize", "dequantize", "compile", "InputInfo", "NamedDimension"} <= used


def test_config_dtypes_are_nvtripy_dtypes(api):
    # model.py and example.py look up GPTConfig.dtype ("float16", "float32") with getattr(tp, ...).
    for name in ("float16", "float32", "int8", "int4", "float8", "int32"):
        assert api.public.get(name) == "nvtripy.common.datatype", name


def test_checker_reports_unknown_names_and_parameters(api):
    source = "import nvtripy as tp\nlayer = tp.Linear(4, 4, quant_dim=0)\ny = tp.not_a_function(x)\n"
    errors, _ = check_source(source, "bad.py", api)
    assert len(errors) == 2, errors
    assert errors[0].startswith("bad.py:2: tp.Linear() has no parameter 'quant_dim'"), errors
    assert "weight_quant_dim" in errors[0] and "nvtripy/frontend/module/linear.py" in errors[0], errors
    assert errors[1] == "bad.py:3: tp.not_a_function is not in nvtripy's public API", errors


@pytest.mark.parametrize(
    "line, message",
    [
        ("tp.softmax(x, -1, 0)", "takes at most 2 positional arguments, got 3"),
        ("tp.quantize(x, scale)", "is missing required argument(s) dtype"),
        ("tp.Linear(4, 4, bias=False, in_features=4)", "got 'in_features' both by position and by keyword"),
        ("tp.compile(f, 3, [x])", "takes at most 2 positional arguments, got 3"),  # args is keyword-only
        ("tp.arange(0, 5, 1, tp.int32, 7)", "takes at most 4 positional arguments"),  # no overload takes 5
        ("tp.Tensor.no_such_method(x)", "Tensor has no 'no_such_method'"),
        ("from nvtripy.frontend.module.parameter import NoSuchParameter", "has no 'NoSuchParameter'"),
    ],
)
def test_checker_reports_bad_calls(api, line, message):
    errors, _ = check_source(f"import nvtripy as tp\n{line}\n", "bad.py", api)
    assert errors and all(e.startswith("bad.py:2: ") for e in errors), errors
    assert any(message in e for e in errors), errors


def test_checker_accepts_correct_calls(api):
    source = """
import nvtripy as tp
from nvtripy.frontend.module.parameter import DefaultParameter
layer = tp.Linear(4, 8, True, tp.float16, quant_dtype=tp.int8, weight_quant_dim=0)
weight = DefaultParameter((4, 8), tp.float16)
positions = tp.arange(5, dtype=tp.int32)
positions = tp.arange(1, 5, dtype=tp.int32)
past = tp.NamedDimension("past", 1, 4, 7)
run = tp.compile(layer, args=[tp.InputInfo((1, (1, 2, 4), past), dtype=tp.float16)])
tokens = tp.Tensor([[1, 2]], device=tp.device("gpu"))
x = tp.dequantize(tp.quantize(weight, scale, tp.int4), scale, tp.float16)
shape = tp.Tensor.shape
"""
    errors, used = check_source(source, "good.py", api)
    assert errors == []
    assert {"Linear", "arange", "NamedDimension", "compile", "InputInfo", "Tensor", "device"} <= used
