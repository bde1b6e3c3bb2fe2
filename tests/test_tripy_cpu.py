"""The CPU executor (tripy_cpu/) against hand-computed values of the TensorRT semantics it implements.

On a machine with TensorRT these run on the real backend (and a GPU), as a check of the same expectations.
"""

import importlib.util
import subprocess
import sys

import pytest
import torch

import tripy_cpu

NVTRIPY_INSTALLED = importlib.util.find_spec("nvtripy") is not None
pytestmark = pytest.mark.skipif(not NVTRIPY_INSTALLED, reason="needs nvtripy (pip install --no-deps nvtripy==0.1.7)")
if NVTRIPY_INSTALLED:
    BACKEND = tripy_cpu.use()
    import nvtripy as tp
cpu_only = pytest.mark.skipif(NVTRIPY_INSTALLED and BACKEND != "cpu", reason="checks the CPU executor itself")


def values(tensor: "tp.Tensor") -> list:
    return tp.cast(tensor, tp.float32).tolist()


def test_quantize_rounds_half_to_even_and_clamps_per_channel():
    x = tp.Tensor([[2.5, 3.5, -2.5, 200.0], [0.5, 1.5, -300.0, 0.25]])
    scale = tp.Tensor([1.0, 0.5])  # one per row (dim 0)
    # Row 0 / 1: 2.5 -> 2, 3.5 -> 4, -2.5 -> -2, 200 -> 127. Row 1 / 0.5: 1 -> 1, 3 -> 3, -600 -> -128, 0.5 -> 0.
    assert values(tp.quantize(x, scale, tp.int8, dim=0)) == [[2, 4, -2, 127], [1, 3, -128, 0]]


def test_int4_blocks_run_along_dim_0():
    x = tp.Tensor([[0.7, 7.0], [0.7, 7.0], [0.7, 7.0], [4.0, 7.0]])  # [4, 2]: blocks of 2 rows
    scale = tp.Tensor([[1.0, 10.0], [0.25, 2.5]])  # [4 / 2, 2]: rows 0-1 use scale row 0, rows 2-3 row 1
    # 0.7 / 1 -> 1; 7 / 10 -> 1; 0.7 / 0.25 = 2.8 -> 3; 7 / 2.5 = 2.8 -> 3; 4 / 0.25 = 16 -> 7 (int4 max).
    quantized = tp.quantize(x, scale, tp.int4)
    assert values(tp.dequantize(quantized, scale, tp.float32)) == [[1, 10], [1, 10], [0.75, 7.5], [1.75, 7.5]]


def test_float8_saturates_at_448():
    scale = tp.Tensor(2.0)
    quantized = tp.quantize(tp.Tensor([1000.0, -1000.0, 3.0]), scale, tp.float8)
    assert values(tp.dequantize(quantized, scale, tp.float32)) == [896.0, -896.0, 3.0]  # 448 * 2; 1.5 * 2


@cpu_only
def test_a_scale_that_is_not_positive_is_an_error():
    with pytest.raises(Exception, match="scale must be strictly positive"):
        tp.quantize(tp.Tensor([1.0, 2.0]), tp.Tensor(0.0), tp.int8).eval()


@cpu_only
def test_an_op_it_does_not_implement_is_an_error_naming_it():
    with pytest.raises(Exception, match="does not implement nvtripy's TopKMax op"):
        tp.topk(tp.Tensor([1.0, 3.0, 2.0]), 1, dim=0)[0].eval()


def test_compiled_function_checks_its_input_shapes():
    add_one = tp.compile(lambda x: x + 1.0, args=[tp.InputInfo(((1, 2, 4),), dtype=tp.float32)])
    assert values(add_one(tp.Tensor([1.0, 2.0, 3.0], device=tp.device("gpu")))) == [2.0, 3.0, 4.0]
    with pytest.raises(Exception, match="expected a shape within the bounds"):
        add_one(tp.Tensor([1.0] * 5, device=tp.device("gpu")))


@cpu_only
def test_fast_stack_info_equals_nvtripys():
    from tripy_cpu import stack_info

    ours, theirs = stack_info.get_stack_info(), stack_info.NVTRIPY_GET_STACK_INFO()  # from the same line
    assert len(ours) == len(theirs) > 1
    assert ours == theirs  # SourceInfo is a dataclass: every field, column ranges included


def test_stand_ins_never_shadow_real_modules():
    """With (fake) real TensorRT modules importable, `use` picks them and installs nothing, not even the stack recording
    (fast_stack_info is a call of its own)."""
    program = (
        "import sys, types\n"
        "for name in ('tensorrt', 'mlir_tensorrt', 'mlir_tensorrt.compiler', 'mlir_tensorrt.compiler.api',\n"
        "             'mlir_tensorrt.runtime', 'mlir_tensorrt.runtime.api'):\n"
        "    sys.modules[name] = types.ModuleType(name)\n"
        "real = sys.modules['tensorrt']\n"
        "def install():\n"
        "    raise AssertionError('use() patched the stack recording on TensorRT')\n"
        "sys.modules['tripy_cpu.stack_info'] = types.SimpleNamespace(install=install)\n"  # it imports nvtripy
        "import tripy_cpu\n"
        "tripy_cpu._imports = lambda module: module in sys.modules\n"  # no nvtripy import: it would need all of them
        "assert tripy_cpu.use() == 'tensorrt', tripy_cpu.BACKEND\n"
        "assert sys.modules['tensorrt'] is real\n"
    )
    subprocess.run([sys.executable, "-c", program], check=True, cwd=".")


def test_a_partial_installation_is_refused_not_shadowed():
    """With only `tensorrt` importable (MLIR-TensorRT missing), `use` names what is missing and replaces nothing."""
    program = (
        "import sys, types\n"
        "real = sys.modules['tensorrt'] = types.ModuleType('tensorrt')\n"
        "import tripy_cpu\n"
        "tripy_cpu._imports = lambda module: module in sys.modules\n"
        "try:\n"
        "    tripy_cpu.use()\n"
        "except RuntimeError as error:\n"
        "    assert 'present: tensorrt; missing: mlir_tensorrt.compiler.api, mlir_tensorrt.runtime' in str(error)\n"
        "else:\n"
        "    raise AssertionError('use() accepted a partial installation')\n"
        "assert sys.modules['tensorrt'] is real and 'nvtripy' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", program], check=True, cwd=".")


def test_torch_tensors_pass_through_dlpack():
    weights = torch.arange(6, dtype=torch.float16).reshape(2, 3)
    assert tp.Tensor(weights).tolist() == weights.tolist()
