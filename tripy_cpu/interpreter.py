"""Executes an nvtripy Trace with PyTorch on the CPU, each op with the semantics of the TensorRT layer it lowers to.

nvtripy lowers each Trace op to one `tensorrt` dialect op (its `to_mlir` methods, trace/ops/*.py), which becomes a
TensorRT layer. The functions below follow those layers' definitions in TensorRT's operator documentation:

- Quantize: clamp(round(x / scale)), rounding half to even, clamped to [-8, 7] for int4, [-128, 127] for int8 and
  saturated to [-448, 448] for float8 (e4m3fn). Dequantize: q * scale. The scale is a scalar (per tensor), a 1-D
  tensor along `dim` (per channel), or has the input's rank (blocks: each scale covers input.shape[d] /
  scale.shape[d] consecutive elements along each dimension d; nvtripy allows blocks along dim 0 of a 2-D input).
  Every scale must be strictly positive. The arithmetic is done in float32.
- Element-wise ops and Where broadcast dimensions of size 1 between inputs of equal rank; comparisons give bool.
- Cast from a floating-point type to an integer type truncates toward zero.
- Shapes are int32 tensors (Shape, GetDimensionSize), as in TensorRT.
- float16 matrix multiplies, softmax and normalization accumulate in float32 and round the result to float16, like
  TensorRT's float16 kernels; element-wise float16 ops run in float16.

An op kind without a function here is an error naming it: nothing falls back to an approximation.
"""

import torch
from nvtripy.trace.ops import (
    binary,
    broadcast,
    cast,
    concatenate,
    constant,
    dequantize,
    gather,
    layernorm,
    linspace,
    matmul,
    permute,
    quantize,
    reduce,
    reshape,
    shape,
    slice,
    softmax,
    unary,
    where,
)

from tripy_cpu import runtime

TORCH_DTYPE = {  # nvtripy dtype name -> torch storage dtype (int4 values live in int8)
    "bool": torch.bool,
    "int4": torch.int8,
    "int8": torch.int8,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float8": torch.float8_e4m3fn,
}
TYPE_CODE = {
    "bool": runtime.ScalarTypeCode.i1,
    "int4": runtime.ScalarTypeCode.i4,
    "int8": runtime.ScalarTypeCode.i8,
    "int32": runtime.ScalarTypeCode.i32,
    "int64": runtime.ScalarTypeCode.i64,
    "float16": runtime.ScalarTypeCode.f16,
    "bfloat16": runtime.ScalarTypeCode.bf16,
    "float32": runtime.ScalarTypeCode.f32,
    "float8": runtime.ScalarTypeCode.f8e4m3fn,
}
QUANTIZED_RANGE = {"int4": (-8.0, 7.0), "int8": (-128.0, 127.0), "float8": (-448.0, 448.0)}


class ExecutionError(RuntimeError):
    """An op the CPU executor does not implement, or inputs TensorRT would reject."""


def _shape(tensor: torch.Tensor) -> list[int]:
    """A 1-D int32 shape tensor as a list of ints."""
    return [int(v) for v in tensor.tolist()]


def _in_float32(function):
    """Runs a float16/bfloat16 op in float32 and rounds the result back (float32 accumulation)."""

    def wrapped(op, *inputs):
        dtype = inputs[0].dtype
        if dtype in (torch.float16, torch.bfloat16):
            return function(op, *(t.float() if t.is_floating_point() else t for t in inputs)).to(dtype)
        return function(op, *inputs)

    return wrapped


def _same_rank(op, *tensors: torch.Tensor) -> None:
    ranks = {t.dim() for t in tensors}
    if len(ranks) != 1:
        raise ExecutionError(f"{type(op).__name__}: TensorRT needs inputs of equal rank, got ranks {sorted(ranks)}")


def _elementwise(function):
    def run(op, a, b):
        _same_rank(op, a, b)
        return function(a, b)

    return run


def _divide(a, b):
    return a / b if a.is_floating_point() else torch.div(a, b, rounding_mode="trunc")


def _expand_scale(op, scale: torch.Tensor, input_shape: torch.Size, dim) -> torch.Tensor:
    """The scale broadcast to the input's shape: per tensor, per channel along `dim`, or block-wise."""
    name = type(op).__name__
    if scale.dim() == 0:
        return scale
    if scale.dim() == 1:
        if dim is None or scale.shape[0] != input_shape[dim]:
            raise ExecutionError(f"{name}: a 1-D scale of {scale.shape[0]} needs dim with that size, got dim={dim}")
        view = [1] * len(input_shape)
        view[dim] = scale.shape[0]
        return scale.reshape(view)
    if scale.dim() != len(input_shape):
        raise ExecutionError(f"{name}: a block-wise scale needs the input's rank, got {scale.dim()}-D scale")
    for d, (size, blocks) in enumerate(zip(input_shape, scale.shape, strict=True)):
        if size % blocks:
            raise ExecutionError(f"{name}: dimension {d} of size {size} is not divisible into {blocks} blocks")
        scale = scale.repeat_interleave(size // blocks, dim=d)
    return scale


def _check_scale(op, scale: torch.Tensor) -> None:
    if not bool((scale > 0).all()):
        raise ExecutionError(
            f"{type(op).__name__}: every scale must be strictly positive (TensorRT), smallest is "
            f"{scale.min().item():.3g}"
        )


def _quantize(op, x, scale):
    _check_scale(op, scale)
    low, high = QUANTIZED_RANGE[op.dtype.name]
    scaled = x.float() / _expand_scale(op, scale.float(), x.shape, op.dim)
    if op.dtype.name == "float8":
        return scaled.clamp(low, high).to(torch.float8_e4m3fn)  # the cast rounds to nearest even
    return torch.round(scaled).clamp(low, high).to(torch.int8)  # torch.round: half to even


def _dequantize(op, q, scale):
    _check_scale(op, scale)
    return (q.float() * _expand_scale(op, scale.float(), q.shape, op.dim)).to(TORCH_DTYPE[op.dtype.name])


def _cast(op, x):
    target = TORCH_DTYPE[op.dtype.name]
    if op.dtype.name in ("int4", "float8"):
        raise ExecutionError(f"Cast to {op.dtype.name}: TensorRT's cast layer does not produce it (use quantize)")
    if target == torch.bool:
        return x != 0
    return x.to(target)  # float -> int truncates toward zero, as TensorRT's cast does


def _broadcast(op, x, target):
    target = _shape(target)
    if any(size < 0 for size in target):
        raise ExecutionError(f"Broadcast: negative target size in {target}")
    if x.dim() > len(target):
        raise ExecutionError(f"Broadcast: cannot broadcast rank {x.dim()} to rank {len(target)}")
    x = x.reshape([1] * (len(target) - x.dim()) + list(x.shape))
    for d, (have, want) in enumerate(zip(x.shape, target, strict=True)):
        if have != want and have != 1:
            raise ExecutionError(f"Broadcast: dimension {d} of size {have} cannot become {want}")
    return x.expand(target).contiguous()


def _slice(op, x, start, size, stride, *fill):
    if fill or type(op) is not slice.Slice:
        raise ExecutionError(f"{type(op).__name__}: only the default slice mode is implemented")
    for d, (first, count, step) in enumerate(zip(_shape(start), _shape(size), _shape(stride), strict=True)):
        index = first + step * torch.arange(count)
        if count and (int(index.min()) < 0 or int(index.max()) >= x.shape[d]):
            raise ExecutionError(f"Slice: dimension {d} of size {x.shape[d]} has no element {index.tolist()}")
        x = x.index_select(d, index)
    return x


def _gather(op, data, indices):
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= data.shape[op.dim]):
        raise ExecutionError(f"Gather: indices outside 0..{data.shape[op.dim] - 1} along dimension {op.dim}")
    out = data.index_select(op.dim, indices.reshape(-1).long())
    return out.reshape(*data.shape[: op.dim], *indices.shape, *data.shape[op.dim + 1 :])


def _linspace(op, size, start, step):
    """TensorRT's LINSPACE fill: out[i0, ..., in] = start + sum_k step[k] * i_k."""
    size = _shape(size)
    dtype = TORCH_DTYPE[op.dtype.name]
    out = start.reshape(()).to(dtype).expand(size)
    for k, n in enumerate(size):
        view = [1] * len(size)
        view[k] = n
        out = out + step[k].to(dtype) * torch.arange(n, dtype=dtype).reshape(view)
    return out.contiguous()


@_in_float32
def _layernorm(op, x, weight, bias):
    dims = tuple(range(x.dim() - len(op.normalized_shape), x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    variance = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    return (x - mean) / torch.sqrt(variance + op.eps) * weight + bias


@_in_float32
def _matmul(op, a, b):
    if a.dim() > 1 and b.dim() > 1:
        _same_rank(op, a, b)
    return torch.matmul(a, b)


@_in_float32
def _softmax(op, x):
    return torch.softmax(x, dim=op.dim)


def _product(x, dim, keepdim):
    for d in sorted(dim, reverse=True):
        x = x.prod(dim=d, keepdim=keepdim)
    return x


def _unary(function):
    def run(op, x):
        return function(x)

    return run


def _reduce(function):
    def run(op, x):
        return function(x, dim=tuple(op.dim), keepdim=op.keepdim)

    return run


OPS = {
    constant.Constant: lambda op: op.data.tensor,
    binary.Add: _elementwise(torch.add),
    binary.Sub: _elementwise(torch.sub),
    binary.Mul: _elementwise(torch.mul),
    binary.Div: _elementwise(_divide),
    binary.Pow: _elementwise(torch.pow),
    binary.FloorDiv: _elementwise(torch.floor_divide),
    binary.Max: _elementwise(torch.maximum),
    binary.Min: _elementwise(torch.minimum),
    binary.Less: _elementwise(torch.lt),
    binary.Greater: _elementwise(torch.gt),
    binary.Equal: _elementwise(torch.eq),
    binary.LogicalOr: _elementwise(torch.logical_or),
    unary.Exp: _unary(torch.exp),
    unary.Recip: _unary(torch.reciprocal),
    unary.Log: _unary(torch.log),
    unary.Sin: _unary(torch.sin),
    unary.Cos: _unary(torch.cos),
    unary.Sqrt: _unary(torch.sqrt),
    unary.Abs: _unary(torch.abs),
    unary.Not: _unary(torch.logical_not),
    unary.Neg: _unary(torch.neg),
    unary.Tanh: _unary(torch.tanh),
    unary.Relu: _unary(torch.relu),
    unary.Sigmoid: _unary(torch.sigmoid),
    unary.GeluErf: _unary(torch.nn.functional.gelu),
    reduce.Sum: _reduce(torch.sum),
    reduce.Prod: _reduce(_product),
    reduce.Avg: _reduce(torch.mean),
    reduce.Max: _reduce(torch.amax),
    reduce.Min: _reduce(torch.amin),
    broadcast.Broadcast: _broadcast,
    cast.Cast: _cast,
    concatenate.Concatenate: lambda op, *xs: torch.cat(xs, dim=op.dim),
    quantize.Quantize: _quantize,
    dequantize.Dequantize: _dequantize,
    gather.Gather: _gather,
    layernorm.LayerNorm: _layernorm,
    linspace.Linspace: _linspace,
    matmul.MatrixMultiply: _matmul,
    permute.Permute: lambda op, x: x.permute(*op.permutation).contiguous(),
    reshape.Reshape: lambda op, x, target: x.reshape(_shape(target)),
    shape.Shape: lambda op, x: torch.tensor(list(x.shape), dtype=torch.int32),
    shape.GetDimensionSize: lambda op, shape_tensor: shape_tensor[op.dim].clone(),  # element `dim` of a Shape
    slice.Slice: _slice,
    softmax.Softmax: _softmax,
    where.Where: lambda op, condition, a, b: torch.where(condition, a, b),
}


class Signature:
    def __init__(self, num_results: int):
        self.num_results = num_results

    def get_num_results(self) -> int:
        return self.num_results


class Program:
    """A traced function, "compiled": its ops in topological order, run one by one by `execute`."""

    def __init__(self, trace):
        self.name = trace.name
        self.ops = list(trace.ops)
        self.inputs = list(trace.inputs)
        self.outputs = list(trace.outputs)
        self.input_infos = list((trace.input_infos or {}).values())
        for op in self.ops:
            if type(op) not in OPS:
                raise ExecutionError(
                    f"the CPU executor does not implement nvtripy's {type(op).__name__} op "
                    f"(from {type(op).__module__}); TensorRT would run it on a GPU"
                )

    def get_signature(self, name: str) -> Signature:
        return Signature(len(self.outputs))

    def get_data_segments(self):
        raise ExecutionError("the CPU executor makes no TensorRT engine to serialize")

    def check_inputs(self, memrefs) -> None:
        """What TensorRT checks when an engine is run: data types, shapes within the profile, named dimensions."""
        from nvtripy.backend.api.input_info import InputInfo

        named = {}
        for memref, inp, info in zip(memrefs, self.inputs, self.input_infos or [None] * len(memrefs), strict=True):
            if TYPE_CODE[inp.dtype.name] is not memref.dtype:
                raise runtime.MTRTException(
                    f"function expects a memref type with element type {inp.dtype.name} but got {memref.dtype.name}"
                )
            if not isinstance(info, InputInfo):
                continue
            bounds = info.shape_bounds
            shape = memref.shape
            if len(shape) != len(bounds.min) or any(
                not low <= size <= high for size, low, high in zip(shape, bounds.min, bounds.max, strict=True)
            ):
                raise runtime.MTRTException(f"Runtime shape mismatch: {shape} outside {bounds.min}..{bounds.max}")
            for index, dim_name in info.dimension_names.items():
                if named.setdefault(dim_name, shape[index]) != shape[index]:
                    raise runtime.MTRTException(
                        f"Runtime shape mismatch: the dimensions named {dim_name!r} differ "
                        f"({named[dim_name]} and {shape[index]})"
                    )

    def execute(self, name: str, memrefs) -> list:
        if len(memrefs) != len(self.inputs):
            raise runtime.MTRTException(f"{self.name} takes {len(self.inputs)} inputs, got {len(memrefs)}")
        self.check_inputs(memrefs)
        values = {inp.name: memref.tensor for inp, memref in zip(self.inputs, memrefs, strict=True)}
        for op in self.ops:
            result = OPS[type(op)](op, *(values[inp.name] for inp in op.inputs))
            (out,) = op.outputs
            expected = TORCH_DTYPE[out.dtype.name]
            if result.dtype != expected or result.dim() != out.rank:
                raise ExecutionError(
                    f"{type(op).__name__} made a {result.dim()}-D {result.dtype} tensor; the trace says "
                    f"{out.rank}-D {out.dtype.name}: {op}"
                )
            values[out.name] = result
        return [
            runtime.MemRefValue(values[out.name], TYPE_CODE[out.dtype.name], runtime.PointerType.device)
            for out in self.outputs
        ]


class Compiler:
    """Stands in for nvtripy's MLIR-TensorRT compiler: "compiling" keeps the Trace to interpret."""

    def __init__(self, trt_builder_opt_level: int = 0):
        self.trt_builder_opt_level = trt_builder_opt_level

    def compile(self, module, trace=None) -> Program:
        return Program(trace)
