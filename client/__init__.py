"""Clients of an fpgaserve (or TensorFlow Serving / KServe v2) server.

``PredictionClient`` keeps Azure's Brainwave client interface over TensorFlow Serving's
protocol (install ``fpgaserve[server]`` or ``tensorflow-serving-api``).
``V2PredictionClient`` does the same over KServe v2 with only grpcio, protobuf and NumPy: what a
plain ``pip install fpgaserve`` gives. Both have asyncio twins.
"""

from .errors import PredictionError
from .labels import imagenet_labels, top_k
from .prediction import (
    AsyncPredictionClient,
    AsyncV2PredictionClient,
    PredictionClient,
    V2PredictionClient,
)

__all__ = [
    "AsyncPredictionClient",
    "AsyncV2PredictionClient",
    "PredictionClient",
    "PredictionError",
    "V2PredictionClient",
    "imagenet_labels",
    "top_k",
]
