"""Wire tensors <-> NumPy for both protocols, strictly checked; shared by server and client.

A tensor's declared shape must match its element count exactly, byte lengths must add up, and
only image bytes and floats are accepted; anything else is a ``WireError`` naming the tensor
(INVALID_ARGUMENT in the server), before a byte is copied into a big array. The KServe v2 half
needs only NumPy and the generated protos, so the light client stays free of TensorFlow; the
TensorFlow Serving half imports TensorFlow's protos when first used.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np


class WireError(ValueError):
    """A tensor on the wire that cannot be what it claims (shape, length, dtype)."""


@cache
def _tf() -> Any:
    """TensorFlow's framework protos (importing them loads TensorFlow: only on first use)."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    return tensor_pb2, tensor_shape_pb2, types_pb2


@cache
def _tf_floats() -> dict[int, tuple[type, str]]:
    """TensorFlow Serving: the float dtypes accepted (converted to float32), their value fields."""
    types_pb2 = _tf()[2]
    return {
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
    if min(shape, default=0) < 0:
        raise WireError(f"tensor {name!r}: shape {list(shape)} has a negative dimension")
    count = math.prod(shape)
    # NumPy multiplies every dimension, zeros aside, in int64: refuse what it cannot hold.
    if (count or math.prod(size for size in shape if size)) >= 2**62:
        raise WireError(f"tensor {name!r}: shape {list(shape)} is impossibly large")
    return count


def _from_bytes(name: str, data: bytes, dtype: type, shape: Sequence[int]) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    if len(data) != _count(name, shape) * itemsize:
        raise WireError(
            f"tensor {name!r}: {len(data)} bytes of content do not fit shape {list(shape)} "
            f"of {np.dtype(dtype).name} ({_count(name, shape) * itemsize} bytes)"
        )
    return np.frombuffer(data, np.dtype(dtype).newbyteorder("<")).reshape(shape)


def _admitted(name: str, shape: Sequence[int], max_elements: int | None) -> None:
    """Refuse a shape larger than a request may carry before reading any content: decoding
    (or expanding) millions of elements first would let a small request cost seconds."""
    count = _count(name, shape)
    if max_elements is not None and count > max_elements:
        raise WireError(
            f"tensor {name!r}: shape {list(shape)} holds {count} elements, more than one "
            f"request may carry ({max_elements}); split it into smaller requests"
        )


def _from_values(name: str, values, dtype: type, shape: Sequence[int]) -> np.ndarray:
    if len(values) != _count(name, shape):
        raise WireError(f"tensor {name!r}: {len(values)} values do not fill shape {list(shape)}")
    return np.asarray(values, dtype).reshape(shape)


def _strings(name: str, values: Sequence[bytes], shape: Sequence[int]) -> np.ndarray:
    if len(values) != _count(name, shape):
        raise WireError(f"tensor {name!r}: {len(values)} strings do not fill shape {list(shape)}")
    array = np.empty(len(values), dtype=object)
    array[:] = list(values)
    return array.reshape(shape)


def _as_float32(name: str, array: np.ndarray) -> np.ndarray:
    if array.dtype != np.float64:  # float16 and float32 always fit
        return array.astype(np.float32, copy=False)
    with np.errstate(over="ignore"):
        converted = array.astype(np.float32)
    if not np.isfinite(converted).all() and (np.isfinite(array) & ~np.isfinite(converted)).any():
        raise WireError(
            f"tensor {name!r}: values beyond float32's range (+-3.4e38); the model computes in "
            "float32: scale them into range"
        )
    return converted


_FLOAT32_LE = np.dtype("<f4")


def _is_strings(array: np.ndarray) -> bool:
    return array.dtype == object or array.dtype.kind == "S"


# -- TensorFlow Serving ------------------------------------------------------------------------


# A compact TensorProto expands to at most this many elements: as many float32s as the
# default message limit (64 MiB) carries written out.
MAX_COMPACT_ELEMENTS = 2**24


def _filled(name: str, values: Sequence, shape: Sequence[int], dtype: type | None) -> Sequence:
    """TensorFlow's compact encoding: fewer values than the shape holds, the last repeated to
    fill it (``tf.make_tensor_proto(0.5, shape=[1, 224, 224, 3])`` sends one value), as
    TensorFlow Serving reads it. No values at all is still an error, not a tensor of zeros.
    Numbers are filled by NumPy (``dtype``), strings (``None``) as a list."""
    count = _count(name, shape)
    if not 0 < len(values) < count:
        return values
    if count > MAX_COMPACT_ELEMENTS:
        raise WireError(
            f"tensor {name!r}: {len(values)} values repeated to fill shape {list(shape)} would "
            f"make {count} elements, over the limit of {MAX_COMPACT_ELEMENTS}"
        )
    if dtype is None:
        return [*values, *[values[-1]] * (count - len(values))]
    given = np.asarray(values, dtype)
    return np.concatenate([given, np.full(count - len(given), given[-1], dtype)])


def from_tensor_proto(name: str, proto: Any, max_elements: int | None = None) -> np.ndarray:
    """A TensorProto as an array: strings as an object array of bytes, floats as float32. A
    shape of more than ``max_elements`` is refused before its content is read."""
    types_pb2 = _tf()[2]
    if proto.tensor_shape.unknown_rank:
        raise WireError(f"tensor {name!r}: give its shape (unknown rank is not accepted)")
    shape = [dim.size for dim in proto.tensor_shape.dim]
    _admitted(name, shape, max_elements)
    if proto.dtype == types_pb2.DT_STRING:
        return _strings(name, _filled(name, proto.string_val, shape, None), shape)
    floats = _tf_floats()
    if proto.dtype not in floats:
        known = proto.dtype in types_pb2.DataType.values()
        dtype_name = types_pb2.DataType.Name(proto.dtype) if known else f"#{proto.dtype}"
        raise WireError(
            f"tensor {name!r}: dtype {dtype_name} is not accepted; "
            "send DT_STRING images (JPEG/PNG bytes) or DT_FLOAT tensors"
        )
    dtype, field = floats[proto.dtype]
    if proto.tensor_content:
        return _as_float32(name, _from_bytes(name, proto.tensor_content, dtype, shape))
    if dtype is np.float16:  # half_val holds the 16-bit patterns, as ints
        bits = _from_values(name, _filled(name, proto.half_val, shape, np.int64), np.int64, shape)
        if bits.size and not 0 <= bits.min() <= bits.max() <= 0xFFFF:
            raise WireError(
                f"tensor {name!r}: half_val holds values outside 0..65535; it carries the "
                "16-bit patterns of float16 values"
            )
        return _as_float32(name, bits.astype(np.uint16).view(np.float16))
    values = _filled(name, getattr(proto, field), shape, dtype)
    return _as_float32(name, _from_values(name, values, dtype, shape))


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# TensorProto's ``repeated float float_val = 5 [packed = true]``: field 5, length-delimited.
_FLOAT_VAL_KEY = bytes([5 << 3 | 2])


def to_tensor_proto(array: np.ndarray, into: Any = None, typed: bool = False) -> Any:
    """Image bytes (object or bytes array) or floats (sent as float32), as a new TensorProto or
    in place of ``into``'s contents, one held by a message (``response.outputs[k]``): no copy of
    the tensor from one message into another.

    Floats go in ``tensor_content``, or with ``typed`` in ``float_val`` as TensorFlow Serving
    answers by default: clients that read ``outputs[k].float_val`` need that. Both are the same
    little-endian bytes on the wire, so ``float_val`` is written as its packed field, which
    costs what ``tensor_content`` does (a Python ``extend`` of 1000 floats takes 15x longer)."""
    tensor_pb2, _, types_pb2 = _tf()
    proto = tensor_pb2.TensorProto() if into is None else into
    proto.Clear()
    array = np.asarray(array)
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    if _is_strings(array):
        proto.dtype = types_pb2.DT_STRING
        proto.string_val.extend(array.ravel())
        return proto
    proto.dtype = types_pb2.DT_FLOAT
    data = np.ascontiguousarray(array, _FLOAT32_LE).tobytes()
    if typed:
        proto.MergeFromString(_FLOAT_VAL_KEY + _varint(len(data)) + data)
    else:
        proto.tensor_content = data
    return proto


def tf_dtype(dtype: str) -> int:
    """A pipeline tensor dtype ("string", "float32") as TensorFlow's DataType enum."""
    types_pb2 = _tf()[2]
    return {"string": types_pb2.DT_STRING, "float32": types_pb2.DT_FLOAT}[dtype]


# -- KServe v2 ---------------------------------------------------------------------------------

V2_DATATYPES = {"string": "BYTES", "float32": "FP32"}


def v2_shape(shape: Sequence[int | None]) -> list[int]:
    """A tensor spec's shape as v2 metadata (and Triton's configuration) write it: -1 for a
    size that varies."""
    return [-1 if size is None else size for size in shape]


def _v2_bytes_elements(name: str, raw: bytes, shape: Sequence[int]) -> np.ndarray:
    """BYTES raw content: each element is a 4-byte little-endian length, then the bytes. Read
    no more elements than the shape holds: 60 MiB of empty ones would cost seconds."""
    expected = _count(name, shape)
    elements, offset = [], 0
    while offset < len(raw):
        if len(elements) == expected:
            raise WireError(
                f"tensor {name!r}: raw BYTES content holds more than the {expected} strings "
                f"of shape {list(shape)}"
            )
        if offset + 4 > len(raw):
            raise WireError(f"tensor {name!r}: raw BYTES content is truncated")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise WireError(f"tensor {name!r}: raw BYTES element overruns its content")
        elements.append(raw[offset : offset + length])
        offset += length
    return _strings(name, elements, shape)


def from_v2(tensor: Any, raw: bytes | None, max_elements: int | None = None) -> np.ndarray:
    """A v2 input or output tensor, from its typed contents or its raw contents entry. A shape
    of more than ``max_elements`` is refused before its content is read."""
    name, shape, datatype = tensor.name, list(tensor.shape), tensor.datatype
    _admitted(name, shape, max_elements)
    if raw is not None and tensor.HasField("contents"):
        raise WireError(f"tensor {name!r}: give raw contents or typed contents, not both")
    if datatype == "BYTES":
        if raw is not None:
            return _v2_bytes_elements(name, raw, shape)
        return _strings(name, tensor.contents.bytes_contents, shape)
    if datatype not in _V2_FLOATS:
        raise WireError(
            f"tensor {name!r}: datatype {datatype!r} is not accepted; send BYTES images "
            "(JPEG/PNG) or FP32 tensors"
        )
    dtype, field = _V2_FLOATS[datatype]
    if raw is not None:
        return _as_float32(name, _from_bytes(name, raw, dtype, shape))
    if field is None:
        raise WireError(f"tensor {name!r}: {datatype} needs raw contents")
    return _as_float32(name, _from_values(name, getattr(tensor.contents, field), dtype, shape))


def to_v2(array: np.ndarray) -> tuple[str, list[int], bytes]:
    """(datatype, shape, raw contents) of image bytes (BYTES) or floats (FP32, little-endian)."""
    array = np.asarray(array)
    if _is_strings(array):
        raw = b"".join(struct.pack("<I", len(item)) + bytes(item) for item in array.ravel())
        return "BYTES", list(array.shape), raw
    return "FP32", list(array.shape), np.ascontiguousarray(array, _FLOAT32_LE).tobytes()
