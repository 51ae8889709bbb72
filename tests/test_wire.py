"""Wire tensors written in place into a message, as the server's responses and the client's
requests are built."""

from __future__ import annotations

import numpy as np
from tensorflow_serving.apis import predict_pb2

from fpgaserve.wire import from_tensor_proto, to_tensor_proto


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
