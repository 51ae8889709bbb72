"""Wire tensors written in place into a message, as the server's responses and the client's
requests are built."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2

from fpgaserve.protos import grpc_predict_v2_pb2 as v2
from fpgaserve.wire import (
    MAX_COMPACT_ELEMENTS,
    WireError,
    from_tensor_proto,
    from_v2,
    to_tensor_proto,
)


def test_a_tensor_written_into_a_message_replaces_what_was_there():
    response = predict_pb2.PredictResponse()
    to_tensor_proto(np.array([[b"old"]], dtype=object), response.outputs["x"])
    floats = np.arange(6, dtype=np.float32).reshape(2, 3)
    to_tensor_proto(floats, response.outputs["x"])
    received = predict_pb2.PredictResponse.FromString(response.SerializeToString())
    assert received.outputs["x"] == to_tensor_proto(floats)
    np.testing.assert_array_equal(from_tensor_proto("x", received.outputs["x"]), floats)


def test_images_written_into_a_request_keep_their_bytes_and_shape():
    request = predict_pb2.PredictRequest()
    images = np.array([b"\xff\xd8one", b"\xff\xd8two"], dtype=object)
    to_tensor_proto(images, request.inputs["images"])
    decoded = from_tensor_proto("images", request.inputs["images"])
    assert decoded.shape == (2,) and list(decoded) == list(images)


def _compact(dtype: int, field: str, values: list, shape: list[int]) -> tensor_pb2.TensorProto:
    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in shape]
    proto = tensor_pb2.TensorProto(
        dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims)
    )
    getattr(proto, field).extend(values)
    return proto


@pytest.mark.parametrize(
    "proto",
    [
        tf.make_tensor_proto(0.5, shape=[1, 2, 2, 3]),  # what TensorFlow itself sends
        _compact(types_pb2.DT_FLOAT, "float_val", [1.0, 2.0], [2, 3]),
        _compact(types_pb2.DT_DOUBLE, "double_val", [1.0, -3.0], [5]),
        _compact(types_pb2.DT_HALF, "half_val", [np.float16(1.5).view(np.uint16)], [4]),
        _compact(types_pb2.DT_STRING, "string_val", [b"\xff\xd8a", b"\xff\xd8b"], [3]),
    ],
    ids=["make_tensor_proto", "float", "double", "half", "strings"],
)
def test_compact_tensors_are_read_as_tensorflow_reads_them(proto):
    """Fewer values than the shape holds: the last repeats (TensorFlow Serving accepts it)."""
    expected = tf.make_ndarray(proto)
    decoded = from_tensor_proto("x", proto)
    assert decoded.shape == expected.shape
    if expected.dtype == object:
        assert list(decoded) == list(expected)
    else:
        np.testing.assert_array_equal(decoded, expected.astype(np.float32))


@pytest.mark.parametrize(
    ("values", "shape", "error"),
    [
        ([], [3], "0 values do not fill shape [3]"),  # not a tensor of zeros
        ([1.0, 2.0, 3.0], [2], "3 values do not fill shape [2]"),
        ([1.0], [MAX_COMPACT_ELEMENTS + 1], "over the limit"),
    ],
)
def test_compact_tensors_need_values_and_a_bounded_size(values, shape, error):
    proto = _compact(types_pb2.DT_FLOAT, "float_val", values, shape)
    with pytest.raises(WireError, match=error.replace("[", r"\[").replace("]", r"\]")):
        from_tensor_proto("x", proto)


@pytest.mark.parametrize("shape", [[1], [3]], ids=["whole", "compact"])
def test_half_values_outside_16_bits_are_refused(shape):
    """Found in review: NumPy raised OverflowError (the server answered INTERNAL) or, from a
    protobuf container, wrapped the value silently to another float16."""
    proto = _compact(types_pb2.DT_HALF, "half_val", [70000], shape)
    with pytest.raises(WireError, match=r"outside 0\.\.65535"):
        from_tensor_proto("x", proto)


def test_a_shape_over_the_callers_limit_is_refused_before_its_content_is_read():
    proto = _compact(types_pb2.DT_FLOAT, "float_val", [1.0], [4, 5])
    assert from_tensor_proto("x", proto, max_elements=20).shape == (4, 5)
    with pytest.raises(WireError, match=r"holds 20 elements, more than one request may carry"):
        from_tensor_proto("x", proto, max_elements=19)


@pytest.mark.parametrize(
    ("shape", "error"),
    [
        ([-1, -2], "has a negative dimension"),  # their product is positive
        ([0, 2**31, 2**31], "is impossibly large"),  # empty, but NumPy cannot hold its shape
    ],
)
def test_shapes_numpy_cannot_hold_are_refused(shape, error):
    proto = _compact(types_pb2.DT_FLOAT, "float_val", [1.0, 2.0], shape)
    with pytest.raises(WireError, match=error):
        from_tensor_proto("x", proto)


# Found by review: every element of a v2 raw BYTES content was read before the count was
# compared with the shape, so 60 MiB of empty elements for shape [1] took 5-7 s of Python.
def test_v2_raw_bytes_are_read_no_further_than_the_shape():
    tensor = v2.ModelInferRequest.InferInputTensor(name="images", datatype="BYTES", shape=[2])
    framed = b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"
    assert list(from_v2(tensor, framed)) == [b"ab", b"c"]
    with pytest.raises(WireError, match="1 strings do not fill shape"):
        from_v2(tensor, framed[:6])
    # Empty elements, then a cut length: read to the end, this content would be "truncated".
    with pytest.raises(WireError, match="more than the 2 strings of shape"):
        from_v2(tensor, framed + bytes(4 << 20) + b"\x05")


# Found by review: a finite double past float32's range became infinity in the conversion, and
# the request was refused for "NaN or infinite values" the client never sent.
def test_doubles_beyond_float32s_range_are_refused_as_such():
    huge = _compact(types_pb2.DT_DOUBLE, "double_val", [1.0, 1e300], [2])
    with pytest.raises(WireError, match="beyond float32's range"):
        from_tensor_proto("x", huge)
    tensor = v2.ModelInferRequest.InferInputTensor(name="x", datatype="FP64", shape=[2])
    with pytest.raises(WireError, match="beyond float32's range"):
        from_v2(tensor, np.array([1.0, -1e39], "<f8").tobytes())
    sent = np.array([1e30, np.nan, -np.inf], "<f8")  # in range, or not finite to begin with
    tensor.shape[:] = [3]
    converted = from_v2(tensor, sent.tobytes())
    assert converted.dtype == np.float32
    np.testing.assert_array_equal(converted, sent.astype(np.float32))
