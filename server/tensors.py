"""Wire tensors <-> NumPy for both protocols, strictly checked.

A request's declared shape must match its element count exactly, byte lengths must add up, and
only the dtypes a pipeline can take are accepted; anything else is INVALID_ARGUMENT naming the
tensor, before a byte is copied into a big array.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from fpgaserve.protos import grpc_predict_v2_pb2 as v2

from .errors import InvalidArgument

# TensorFlow Serving: the float dtypes accepted (converted to float32) and their value fields.
_TF_FLOATS = {
    types_pb2.DT_FLOAT: (np.float32, "float_val"),
    types_pb2.DT_DOUBLE: (np.float64, "double_val"),
    types_pb2.DT_HALF: (np.float16, "half_val"),
}
# KServe v2: datatype -> (NumPy type, typed contents field).
_V2_FLOATS = {
    "FP32": (np.float32, "fp32_contents"),
    "FP64": (np.float64, "fp64_contents"),
    "FP16": (np.float16, None),
}


def _count(name: str, shape: Sequence[int]) -> int:
    if any(size < 0 for size in shape):
        raise InvalidArgument(f"tensor {name!r}: shape {list(shape)} has a negative dimension")
    return math.prod(shape)


def _from_bytes(name: str, data: bytes, dtype: type, shape: Sequence[int]) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    if len(data) != _count(name, shape) * itemsize:
        raise InvalidArgument(
            f"tensor {name!r}: {len(data)} bytes of content do not fit shape {list(shape)} "
            f"of {np.dtype(dtype).name} ({_count(name, shape) * itemsize} bytes)"
        )
    return np.frombuffer(data, np.dtype(dtype).newbyteorder("<")).reshape(shape)


def _from_values(name: str, values, dtype: type, shape: Sequence[int]) -> np.ndarray:
    if len(values) != _count(name, shape):
        raise InvalidArgument(
            f"tensor {name!r}: {len(values)} values do not fill shape {list(shape)}"
        )
    return np.asarray(values, dtype).reshape(shape)


def _strings(name: str, values: Sequence[bytes], shape: Sequence[int]) -> np.ndarray:
    if len(values) != _count(name, shape):
        raise InvalidArgument(
            f"tensor {name!r}: {len(values)} strings do not fill shape {list(shape)}"
        )
    array = np.empty(len(values), dtype=object)
    array[:] = list(values)
    return array.reshape(shape)


def _as_float32(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32, copy=False)


# -- TensorFlow Serving ------------------------------------------------------------------------


def from_tensor_proto(name: str, proto: tensor_pb2.TensorProto) -> np.ndarray:
    """A request tensor as an array: strings as an object array of bytes, floats as float32."""
    if proto.tensor_shape.unknown_rank:
        raise InvalidArgument(f"tensor {name!r}: give its shape (unknown rank is not accepted)")
    shape = [dim.size for dim in proto.tensor_shape.dim]
    if proto.dtype == types_pb2.DT_STRING:
        return _strings(name, proto.string_val, shape)
    if proto.dtype not in _TF_FLOATS:
        raise InvalidArgument(
            f"tensor {name!r}: dtype {types_pb2.DataType.Name(proto.dtype)} is not accepted; "
            "send DT_STRING images (JPEG/PNG bytes) or DT_FLOAT tensors"
        )
    dtype, field = _TF_FLOATS[proto.dtype]
    if proto.tensor_content:
        return _as_float32(_from_bytes(name, proto.tensor_content, dtype, shape))
    values = getattr(proto, field)
    if dtype is np.float16:  # half_val holds the raw 16-bit patterns as ints
        bits = _from_values(name, values, np.uint16, shape)
        return _as_float32(bits.view(np.float16))
    return _as_float32(_from_values(name, values, dtype, shape))


def to_tensor_proto(array: np.ndarray) -> tensor_pb2.TensorProto:
    """A float32 result as a TensorProto with packed little-endian content."""
    array = np.ascontiguousarray(array, np.dtype(np.float32).newbyteorder("<"))
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in array.shape]
        ),
        tensor_content=array.tobytes(),
    )


# -- KServe v2 ---------------------------------------------------------------------------------


def _v2_bytes_elements(name: str, raw: bytes, shape: Sequence[int]) -> np.ndarray:
    """BYTES raw content: each element is a 4-byte little-endian length, then the bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidArgument(f"tensor {name!r}: raw BYTES content is truncated")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidArgument(f"tensor {name!r}: raw BYTES element overruns its content")
        elements.append(raw[offset : offset + length])
        offset += length
    return _strings(name, elements, shape)


def from_v2_input(tensor: v2.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray:
    """One ModelInfer input, from its typed contents or its raw_input_contents entry."""
    name, shape, datatype = tensor.name, list(tensor.shape), tensor.datatype
    if raw is not None and tensor.HasField("contents"):
        raise InvalidArgument(f"tensor {name!r}: give raw_input_contents or contents, not both")
    if datatype == "BYTES":
        if raw is not None:
            return _v2_bytes_elements(name, raw, shape)
        return _strings(name, tensor.contents.bytes_contents, shape)
    if datatype not in _V2_FLOATS:
        raise InvalidArgument(
            f"tensor {name!r}: datatype {datatype!r} is not accepted; send BYTES images "
            "(JPEG/PNG) or FP32 tensors"
        )
    dtype, field = _V2_FLOATS[datatype]
    if raw is not None:
        return _as_float32(_from_bytes(name, raw, dtype, shape))
    if field is None:
        raise InvalidArgument(f"tensor {name!r}: {datatype} needs raw_input_contents")
    return _as_float32(_from_values(name, getattr(tensor.contents, field), dtype, shape))


def to_v2_output(
    name: str, array: np.ndarray
) -> tuple[v2.ModelInferResponse.InferOutputTensor, bytes]:
    """A float32 result as an output tensor description and its raw little-endian content."""
    array = np.ascontiguousarray(array, np.dtype(np.float32).newbyteorder("<"))
    tensor = v2.ModelInferResponse.InferOutputTensor(name=name, datatype="FP32", shape=array.shape)
    return tensor, array.tobytes()


V2_DATATYPES = {"string": "BYTES", "float32": "FP32"}
TF_DTYPES = {"string": types_pb2.DT_STRING, "float32": types_pb2.DT_FLOAT}
