"""The stand-in for `mlir_tensorrt.runtime.api`: buffers ("memrefs") held as PyTorch CPU tensors, and a session that
runs a compiled program with the interpreter (interpreter.py) instead of a TensorRT engine.

nvtripy keeps every evaluated tensor as a memref with a scalar type code and an address space (host or device).
Here "device" memory is CPU memory too: the address space is only recorded, so that nvtripy's own checks on where a
tensor lives (constants on the host, executable inputs on the device) behave as they do on a GPU.
"""

import array
import enum

import torch


class MTRTException(Exception):
    """Raised where MLIR-TensorRT's runtime raises; nvtripy turns some of these messages into its own errors."""


class PointerType(enum.Enum):
    host = "host"
    device = "device"


class ScalarTypeCode(enum.Enum):
    i1 = "i1"
    i4 = "i4"
    i8 = "i8"
    i32 = "i32"
    i64 = "i64"
    f16 = "f16"
    f32 = "f32"
    bf16 = "bf16"
    f8e4m3fn = "f8e4m3fn"


# How each type is stored. torch has no arithmetic int4 type: int4 values, -8..7, are kept in int8 storage.
STORAGE_DTYPE = {
    ScalarTypeCode.i1: torch.bool,
    ScalarTypeCode.i4: torch.int8,
    ScalarTypeCode.i8: torch.int8,
    ScalarTypeCode.i32: torch.int32,
    ScalarTypeCode.i64: torch.int64,
    ScalarTypeCode.f16: torch.float16,
    ScalarTypeCode.f32: torch.float32,
    ScalarTypeCode.bf16: torch.bfloat16,
    ScalarTypeCode.f8e4m3fn: torch.float8_e4m3fn,
}
TYPE_CODE_OF_STORAGE = {dtype: code for code, dtype in STORAGE_DTYPE.items() if code is not ScalarTypeCode.i4}


class MemRefValue:
    """A buffer: `tensor` (a contiguous torch tensor), its type code and its address space."""

    def __init__(self, tensor: torch.Tensor, dtype: ScalarTypeCode, address_space: PointerType):
        if tensor.dtype != STORAGE_DTYPE[dtype]:
            raise MTRTException(f"a {dtype.name} memref cannot hold a torch {tensor.dtype} tensor")
        self.tensor = tensor.contiguous()
        self.dtype = dtype
        self.address_space = address_space

    @property
    def shape(self) -> list[int]:
        return list(self.tensor.shape)

    def __dlpack__(self, stream=None):
        if self.dtype is ScalarTypeCode.i4:
            raise MTRTException("int4 memrefs cannot be exported through DLPack")
        return self.tensor.__dlpack__()

    def __dlpack_device__(self):
        return self.tensor.__dlpack_device__()

    def tolist(self):
        """The values as (nested) Python numbers: what nvtripy reads through `memoryview(memref).tolist()`."""
        tensor = self.tensor
        if tensor.dtype in (torch.float16, torch.bfloat16, torch.float8_e4m3fn):
            tensor = tensor.float()
        return tensor.tolist()


class Device:
    def __init__(self, index: int = 0):
        self.index = index


class Stream:
    """Work runs synchronously on the CPU, so there is nothing to wait for."""

    def sync(self) -> None:
        pass


ARRAY_TYPECODE_DTYPE = {"b": torch.int8, "i": torch.int32, "l": torch.int64, "f": torch.float32}


class RuntimeClient:
    def get_devices(self) -> list[Device]:
        return [Device(0)]

    def create_stream(self) -> Stream:
        return Stream()

    def create_memref(self, array_data=None, *, shape, dtype: ScalarTypeCode, device=None, stream=None):
        """A memref of `shape` filled from `array_data` (an array.array), on `device`, or on the host without one."""
        storage = STORAGE_DTYPE[dtype]
        if array_data is None:
            tensor = torch.zeros(shape, dtype=storage)
        else:
            assert isinstance(array_data, array.array), type(array_data)
            values = torch.frombuffer(bytearray(array_data.tobytes()), dtype=ARRAY_TYPECODE_DTYPE[array_data.typecode])
            tensor = values.to(storage).reshape(shape)
        return MemRefValue(tensor, dtype, PointerType.host if device is None else PointerType.device)

    def create_memref_view_from_dlpack(self, capsule, assert_canonical_strides: bool = False) -> MemRefValue:
        tensor = torch.from_dlpack(capsule)
        if assert_canonical_strides and not tensor.is_contiguous():
            canonical = torch.empty(tensor.shape).stride()
            raise MTRTException(
                f"Given strides [{', '.join(map(str, tensor.stride()))}] do not match canonical strides "
                f"[{', '.join(map(str, canonical))}] for shape [{', '.join(map(str, tensor.shape))}]"
            )
        if tensor.dtype not in TYPE_CODE_OF_STORAGE:
            raise MTRTException(f"unsupported DLPack data type {tensor.dtype}")
        space = PointerType.device if tensor.device.type == "cuda" else PointerType.host
        return MemRefValue(tensor.cpu(), TYPE_CODE_OF_STORAGE[tensor.dtype], space)

    def copy_to_host(self, device_memref: MemRefValue, stream=None) -> MemRefValue:
        return MemRefValue(device_memref.tensor.clone(), device_memref.dtype, PointerType.host)

    def copy_to_device(self, host_memref: MemRefValue, device=None, stream=None) -> MemRefValue:
        return MemRefValue(host_memref.tensor.clone(), host_memref.dtype, PointerType.device)


class RuntimeSessionOptions:
    def __init__(self, num_devices: int = 1, device_id: int = 0):
        self.num_devices = num_devices
        self.device_id = device_id


class RuntimeSession:
    """Runs the functions of a compiled program (interpreter.Program): nvtripy's Executable calls this."""

    def __init__(self, options: RuntimeSessionOptions, executable):
        self.executable = executable

    def execute_function(self, name: str, in_args, stream=None, client=None) -> list[MemRefValue]:
        return self.executable.execute(name, in_args)


class Executable:
    """nvtripy.Executable.load deserializes a TensorRT engine, which the CPU executor never makes."""

    def __init__(self, data: bytes):
        raise MTRTException("the CPU executor cannot load a serialized TensorRT executable")
