"""Every error the server answers on purpose carries its gRPC status code and a message that says
what to fix. HAL and archive errors are mapped here, in one place, so adapters never guess."""

from __future__ import annotations

import re

import grpc
import tensorflow as tf

from fpgaserve.hal import (
    DeviceClosedError,
    DeviceFaultError,
    InvalidInputError,
    InvalidProgramError,
    UnknownProgramError,
)


class ServingError(Exception):
    """An error answered to the client with ``code`` and this message."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidArgument(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServingError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServingError):
    code = grpc.StatusCode.CANCELLED


class Unauthenticated(ServingError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Unimplemented(ServingError):
    code = grpc.StatusCode.UNIMPLEMENTED


def as_serving_error(exc: BaseException) -> ServingError:
    """The status a failure inside a pipeline stage deserves."""
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, InvalidInputError):
        return InvalidArgument(str(exc))
    if isinstance(exc, DeviceFaultError | DeviceClosedError):
        return Unavailable(f"the accelerator failed; retry the request ({exc})")
    if isinstance(exc, tf.errors.InvalidArgumentError):  # a CPU stage refused the input
        return InvalidArgument(f"the input could not be processed: {_tf_message(exc)}")
    if isinstance(exc, InvalidProgramError | UnknownProgramError):
        return FailedPrecondition(f"the model cannot run on this device: {exc}")
    return ServingError(f"internal error: {type(exc).__name__}: {exc}")


def _tf_message(exc: tf.errors.OpError) -> str:
    """TensorFlow's message without its graph-node decorations."""
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", exc.message.split("\n")[0])
    return re.sub(r"\s*\[\[.*", "", text).strip()
