"""A CPU executor for nvtripy 0.1.7: nvtripy's own frontend, with its traced graphs run by PyTorch, for machines
without TensorRT (no GPU, or CI).

    import tripy_cpu
    backend = tripy_cpu.use()  # before `import nvtripy`: "tensorrt" when it is installed, else "cpu"
    import nvtripy as tp

On the CPU, `use` also makes nvtripy's stack recording (done for every tensor it creates) cheap, with the same
result: see stack_info.py. Tracing the gpt2 shape is about 18 times faster (docs/tripy.md). With TensorRT, `use`
changes nothing; `fast_stack_info()` is that speed-up alone, which example.py's --backend tripy asks for by name.

nvtripy's frontend (tensors, ops, modules, shape inference, argument checks) and `tp.compile`'s tracing run
unchanged. What is replaced, only when TensorRT and MLIR-TensorRT fail to import, so that it never shadows a real
installation:
- the TensorRT / MLIR-TensorRT modules nvtripy imports (stubs.py, runtime.py),
- `Trace.to_mlir`, which now returns the Trace itself after nvtripy's check that constants are in host memory,
- the `Compiler` class (as imported by backend/api/compile.py, backend/mlir/compiler.py and backend/mlir), whose
  "executable" runs the Trace op by op (interpreter.py) inside nvtripy's own `Executable`,
- the memref read behind `Tensor.tolist` and `int(DimensionSize)` (backend/mlir/memref.py's `tolist`).

It shows what nvtripy's frontend accepts and what the graph computes, with TensorRT's layer semantics; it cannot show
TensorRT's lowering and kernel selection, GPU numerics (float16 kernels, TF32) or speed.
"""

import importlib
import sys

BACKEND = None  # "tensorrt" or "cpu", once `use` has run
REAL_MODULES = ("tensorrt", "mlir_tensorrt.compiler.api", "mlir_tensorrt.runtime.api")  # what nvtripy imports


def _imports(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def fast_stack_info() -> None:
    """Replaces nvtripy's `get_stack_info`, which it calls for every tensor it creates, with stack_info.py's, which
    returns the same stack and remembers each line's column range instead of scanning its code object again: tracing
    is about 18 times faster (docs/tripy.md). Patches nothing else; works with TensorRT or with this executor."""
    from tripy_cpu import stack_info

    stack_info.install()


def use() -> str:
    """Makes `import nvtripy` work: "tensorrt" when TensorRT and MLIR-TensorRT import, else "cpu" (this executor)."""
    global BACKEND
    if BACKEND is not None:
        return BACKEND
    found = {module: _imports(module) for module in REAL_MODULES}
    if all(found.values()):
        BACKEND = "tensorrt"
        return BACKEND
    if "nvtripy" in sys.modules:
        raise RuntimeError("tripy_cpu.use() must run before nvtripy is imported")
    if any(found.values()):  # the stand-ins would replace the part that is there
        present = ", ".join(module for module, ok in found.items() if ok)
        missing = ", ".join(module for module, ok in found.items() if not ok)
        raise RuntimeError(
            f"TensorRT is installed only in part (present: {present}; missing: {missing}): install nvtripy's "
            "dependencies whole for the GPU, or remove them to run on the CPU executor"
        )

    from tripy_cpu import stubs

    stubs.install()
    fast_stack_info()

    import nvtripy.backend.api.compile
    import nvtripy.backend.mlir
    import nvtripy.backend.mlir.compiler
    import nvtripy.backend.mlir.memref
    from nvtripy.trace.trace import Trace

    from tripy_cpu import interpreter

    def to_mlir(trace: Trace) -> Trace:
        for op in trace.ops:
            if isinstance(op, interpreter.constant.Constant):
                op._check_address_space()  # "Tensors that are not inputs to compiled functions must reside in CPU"
        return trace

    Trace.to_mlir = to_mlir
    for module in (nvtripy.backend.api.compile, nvtripy.backend.mlir, nvtripy.backend.mlir.compiler):
        module.Compiler = interpreter.Compiler
    nvtripy.backend.mlir.memref.tolist = lambda memref: memref.tolist()
    BACKEND = "cpu"
    return BACKEND
