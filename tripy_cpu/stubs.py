"""Stand-in modules for the parts of TensorRT and MLIR-TensorRT that nvtripy imports.

nvtripy imports `tensorrt` and `mlir_tensorrt`'s compiler, IR, dialect and runtime modules at import time, although
its frontend (tensors, ops, modules, shape inference and argument checks) is pure Python. The compiler-side modules
are needed only to lower a Trace to MLIR, which the CPU executor never does: every name in them is a placeholder that
fails, naming itself, if anything uses it. The runtime module is tripy_cpu/runtime.py.
"""

import importlib.machinery
import sys
import types

from tripy_cpu import runtime

# Every module nvtripy 0.1.7 imports from TensorRT and MLIR-TensorRT (grep "import tensorrt\|mlir_tensorrt").
COMPILER_SIDE_MODULES = (
    "tensorrt",
    "tensorrt.plugin",
    "mlir_tensorrt",
    "mlir_tensorrt.compiler",
    "mlir_tensorrt.compiler.api",
    "mlir_tensorrt.compiler.ir",
    "mlir_tensorrt.compiler.dialects",
    "mlir_tensorrt.compiler.dialects.tensorrt",
    "mlir_tensorrt.compiler.dialects.func",
    "mlir_tensorrt.compiler.dialects.affine",
    "mlir_tensorrt.compiler.dialects._ods_common",
    "mlir_tensorrt.runtime",
)


class Unavailable:
    """A name from TensorRT or MLIR-TensorRT: usable in annotations and dict values, fails when used."""

    qualified_name = "?"

    def __new__(cls, *args, **kwargs):
        raise RuntimeError(f"{cls.qualified_name} is not available: the CPU executor (tripy_cpu) replaces TensorRT")

    def __class_getitem__(cls, item):
        return cls


class StandInModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = type(name, (Unavailable,), {"qualified_name": f"{self.__name__}.{name}"})
        setattr(self, name, placeholder)
        return placeholder


def install() -> None:
    """Puts the stand-ins in sys.modules. Only for a process where importing the real ones has failed."""
    for name in COMPILER_SIDE_MODULES:
        module = StandInModule(name, __doc__)
        module.__path__ = []  # a package, so that submodules import
        # importlib.util.find_spec (torch._dynamo calls it for "tensorrt") needs a spec on an imported module.
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        sys.modules[name] = module
    sys.modules["mlir_tensorrt.runtime.api"] = runtime
    for name in COMPILER_SIDE_MODULES + ("mlir_tensorrt.runtime.api",):
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])
