"""Server reflection (what grpcurl and Postman ask) with a bound on the streams open at once.

A reflection stream holds one of gRPC's threads for as long as its client keeps it open, and it
is not an inference call, so ``--max-concurrent-calls`` does not count it. Unbounded, a few idle
reflection streams would take every thread kept for health checks (``RESERVED_THREADS``), and a
Kubernetes probe would be refused while the server is well.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc


class BoundedReflection(reflection.ReflectionServicer):
    """grpcio's reflection servicer; past ``limit`` open streams, RESOURCE_EXHAUSTED at once."""

    def __init__(self, service_names: Iterable[str], limit: int) -> None:
        super().__init__(tuple(service_names))
        self._limit = limit
        self._open = threading.BoundedSemaphore(limit)

    def ServerReflectionInfo(
        self, request_iterator: Iterator[reflection_pb2.ServerReflectionRequest], context
    ) -> Iterator[reflection_pb2.ServerReflectionResponse]:
        if not self._open.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._limit} reflection streams are open, the most this server keeps; "
                "close one (grpcurl closes its own when it is done)",
            )
        try:  # the client's cancel ends the request iterator with an error: the slot is freed
            yield from super().ServerReflectionInfo(request_iterator, context)
        finally:
            self._open.release()


def enable_reflection(server: grpc.Server, service_names: Iterable[str], limit: int) -> None:
    """Reflection for ``service_names`` (and itself) on ``server``, ``limit`` streams at once."""
    names = (*service_names, reflection.SERVICE_NAME)
    servicer = BoundedReflection(names, limit)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
