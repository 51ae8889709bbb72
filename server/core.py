"""What every protocol adapter shares: request ids, error answers, deadlines, metrics, logs.

Adapters translate wire messages to ``infer(model, inputs, outputs)`` and back; everything else a
request goes through (routing, admission, cancellation, status codes) happens here once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, TypeVar

import grpc
import numpy as np
from google.protobuf import message_factory
from google.protobuf.message import DecodeError, Message

from fpgaserve.wire import WireError

from .errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    ServingError,
    Unavailable,
)
from .metrics import Metrics
from .model import ServedModel
from .repository import ModelRepository

log = logging.getLogger("fpgaserve.server")
access_log = logging.getLogger("fpgaserve.access")

T = TypeVar("T")
M = TypeVar("M", bound=Message)
REQUEST_ID = "x-request-id"
# Brainwave's PredictionClient reads a failed call's id from this initial metadata key first and
# fails with KeyError, hiding the status, when it is missing.
BRAINWAVE_REQUEST_ID = "request_id"
# Sent without initial metadata: a call that got headers is "committed" and gRPC's own retry
# policies (this project's client's included) no longer retry it.
RETRYABLE = grpc.StatusCode.UNAVAILABLE
SERVER_TIMING = "server-timing"


def parsing_handler(servicer: Any, module: Any) -> grpc.GenericRpcHandler:
    """The handlers of the one service in generated ``module``, parsing requests themselves: a
    request that is not a valid message (corrupt bytes, a string field that is not UTF-8) gets
    INVALID_ARGUMENT, where grpcio's own parsing would answer INTERNAL. ``servicer.core`` counts
    and logs that refusal like any other answer."""
    (service,) = module.DESCRIPTOR.services_by_name.values()
    handlers = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        behaviour = getattr(servicer, method.name)
        if method.client_streaming and method.server_streaming:
            # The servicer parses each message: a bad one is answered in the stream.
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                behaviour, response_serializer=response_class.SerializeToString
            )
            continue
        if method.client_streaming or method.server_streaming:
            raise TypeError(f"{method.full_name}: only unary and bidirectional RPCs are served")
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _parsing(servicer.core, method.name, behaviour, request_class),
            response_serializer=response_class.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def parse(request_class: type[M], raw: bytes) -> M:
    """``raw`` as a ``request_class`` message, or INVALID_ARGUMENT saying what is wrong."""
    try:
        return request_class.FromString(raw)
    except DecodeError as exc:
        raise InvalidArgument(
            f"the request is not a valid {request_class.DESCRIPTOR.full_name} message "
            f"({exc}); check the client's protocol and that string fields are UTF-8"
        ) from None


def _parsing(core: ServingCore, method: str, behaviour: Callable, request_class: type) -> Callable:
    def handle(raw: bytes, context: grpc.ServicerContext):
        try:
            request = parse(request_class, raw)
        except InvalidArgument as exc:
            core.refuse(context, method, exc)
        return behaviour(request, context)

    return handle


def _send_request_id_early(context: grpc.ServicerContext, rid: str) -> None:
    """Before an error status other than ``RETRYABLE``: the request id as initial metadata,
    where Brainwave's clients look for it."""
    with contextlib.suppress(grpc.RpcError, ValueError):  # the call has already ended
        context.send_initial_metadata(((BRAINWAVE_REQUEST_ID, rid),))


def server_timing(timings: dict[str, float]) -> str:
    """Where a request's time went, in the W3C Server-Timing syntax (milliseconds), so that a
    client can tell the server's share of its latency from the network's."""
    return ", ".join(f"{name};dur={seconds * 1e3:.3f}" for name, seconds in timings.items())


def parse_server_timing(value: str) -> dict[str, float]:
    """The inverse of ``server_timing``: {name: seconds}."""
    parts = (part.split(";dur=") for part in value.split(", "))
    return {name: float(ms) / 1e3 for name, ms in parts}


# Fresh request ids: 32 hex digits as a UUID's, a random prefix per process and a counter. Unique
# (what a log needs) without uuid4's system call and object per request.
_ID_PREFIX = os.urandom(10).hex()
_ID_COUNTER = itertools.count()  # next() on it is atomic under the GIL


def request_id(context: grpc.ServicerContext) -> str:
    """The caller's ``x-request-id`` if it sent a sane one, else a fresh one."""
    for key, value in context.invocation_metadata() or ():
        sane = isinstance(value, str) and 0 < len(value) <= 128 and value.isprintable()
        if key == REQUEST_ID and sane:
            return value
    return f"{_ID_PREFIX}{next(_ID_COUNTER) % 2**48:012x}"


# Messages quote what clients sent; past ~8 KiB (non-ASCII is percent-encoded, 6 bytes a
# character) a status message overflows clients' metadata limit and the real status is lost.
MAX_MESSAGE_CHARS = 1000


def _bounded(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 20] + " ... (message cut)"


# Served names are at most 128 characters; a longer one a client sends is cut in the access log.
MAX_LOGGED_NAME = 200


def _count_in_model(record: dict[str, Any], code: grpc.StatusCode, started: float) -> None:
    """A request a model admitted, in that version's statistics: before the answer is sent
    (a few microseconds), so that a client reading them after its answer finds it counted."""
    if record["served"] is not None:
        timings = record["timings"] or {}
        seconds = timings.get("total", time.perf_counter() - started)
        ok = code == grpc.StatusCode.OK
        record["served"].statistics.observe_request(ok, seconds, timings, record["images"])


_NOT_ADMITTED = contextlib.nullcontext(None)  # calls that are not counted: never refused


def _record(model_name: str) -> dict[str, Any]:
    """What a request's handling reports back for its accounting."""
    return {
        "timings": None,
        "images": 0,
        "model": model_name[:MAX_LOGGED_NAME],
        "version": None,
        "served": None,  # the ServedModel that admitted it
    }


class ServingCore:
    def __init__(
        self,
        repository: ModelRepository,
        metrics: Metrics,
        max_calls: int = 64,
        max_message_bytes: int = 64 * 2**20,
    ) -> None:
        self.repository, self.metrics, self.max_calls = repository, metrics, max_calls
        self.max_message_bytes = max_message_bytes
        self.draining = False
        self._active = 0  # inference calls and stream messages being answered
        self._held = 0  # gRPC threads held by inference calls and open streams
        self._idle = threading.Condition()

    @property
    def active(self) -> int:
        """Inference calls and stream messages accepted and not yet answered."""
        return self._active

    def drain(self, timeout: float) -> bool:
        """Answer new calls UNAVAILABLE (clients retry elsewhere) and wait for the calls already
        accepted to finish; True when they all did."""
        with self._idle:
            self.draining = True
            return self._idle.wait_for(lambda: self._active == 0, timeout)

    def refuse(
        self,
        context: grpc.ServicerContext,
        method: str,
        error: ServingError,
        model_name: str = "",
    ) -> NoReturn:
        """Answer a call refused before any model looks at it (bad credentials, a message that
        does not parse, a method not served) with ``error``: counted, logged and given its
        request id like any other."""

        def handle(record: dict[str, Any]) -> NoReturn:
            raise error

        self.call(context, method, model_name, handle, inference=False)
        raise AssertionError("unreachable: call aborts")

    def call(
        self,
        context: grpc.ServicerContext,
        method: str,
        model_name: str,
        handle: Callable[[dict[str, Any]], T],
        inference: bool = True,
    ) -> T:
        """Run ``handle`` for one RPC. A ``ServingError`` becomes its status; anything else is
        logged with its traceback and answered INTERNAL with the request id to quote.

        Only ``inference`` calls count against the call limit and are refused while draining:
        questions about models (readiness, metadata, status) are answered at any load, when
        orchestrators' probes need them most."""
        rid = request_id(context)
        record = _record(model_name)
        started = time.perf_counter()
        admission = self._admission(slot=True, work=True) if inference else _NOT_ADMITTED
        with admission as refusal:
            answer, code, message = self._attempt(rid, record, handle, inference, refusal)
        _count_in_model(record, code, started)
        # Trailing metadata travels with the status: no extra message on the wire.
        trailers = [(REQUEST_ID, rid)]
        if record["timings"]:
            trailers.append((SERVER_TIMING, server_timing(record["timings"])))
        context.set_trailing_metadata(trailers)
        if code not in (grpc.StatusCode.OK, RETRYABLE):
            _send_request_id_early(context, rid)
        # Metrics and the access line cost ~0.2 ms of Python, cold after a request's
        # stages: gRPC runs them once the answer is on its way, off the caller's latency.
        account = functools.partial(self._account, rid, method, record, code, started)
        if not context.add_callback(account):  # the call has already ended
            account()
        if code == grpc.StatusCode.OK:
            return answer
        context.abort(code, _bounded(message))
        raise AssertionError("unreachable: context.abort raises")

    @contextlib.contextmanager
    def stream(self, context: grpc.ServicerContext, method: str) -> Iterator[StreamCalls]:
        """Hold one call slot for a stream's whole life (it holds one of gRPC's threads), or
        refuse the stream as ``call`` refuses an inference call."""
        with self._admission(slot=True, work=False) as refusal:
            if refusal is not None:
                self.refuse(context, method, refusal)
            rid = request_id(context)
            context.set_trailing_metadata([(REQUEST_ID, rid)])  # its requests' ids: <rid>/<n>
            yield StreamCalls(self, rid, method)

    @contextlib.contextmanager
    def _admission(self, slot: bool, work: bool) -> Iterator[ServingError | None]:
        """Admit an inference call (``slot`` and ``work``), a stream (``slot``: one of the
        ``max_calls`` slots, each a gRPC thread) or a stream's request (``work``: what a drain
        waits for); yields why it is refused, or None."""
        with self._idle:
            busy = slot and self._held >= self.max_calls
            accepted = not self.draining and not busy
            self._held += accepted and slot
            self._active += accepted and work
        try:
            if busy:
                yield ResourceExhausted(
                    f"the server is handling {self.max_calls} calls, its limit; retry with backoff"
                )
            elif not accepted:
                yield Unavailable("the server is shutting down; retry on another replica")
            else:
                yield None
        finally:
            with self._idle:
                self._held -= accepted and slot
                self._active -= accepted and work
                self._idle.notify_all()

    def _attempt(
        self,
        rid: str,
        record: dict[str, Any],
        handle: Callable[[dict[str, Any]], T],
        inference: bool,
        refusal: ServingError | None,
    ) -> tuple[T | None, grpc.StatusCode, str]:
        """``handle``'s answer, or the status and message of its failure."""
        try:
            if refusal is not None:
                raise refusal
            answer = handle(record)
            if inference and (size := answer.ByteSize()) > self.max_message_bytes:
                # gRPC would refuse to send it; say why here, and count it as what it is.
                raise ResourceExhausted(
                    f"the answer is {size} bytes, over the server's limit of "
                    f"{self.max_message_bytes} (--max-message-mb); send fewer images per "
                    "request or ask for fewer outputs"
                )
            return answer, grpc.StatusCode.OK, ""
        except ServingError as exc:
            return None, exc.code, str(exc)
        except WireError as exc:
            return None, grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except Exception:
            log.exception("request %s failed", rid, extra={"request_id": rid})
            return None, grpc.StatusCode.INTERNAL, f"internal server error (request id {rid})"

    def _account(
        self,
        rid: str,
        method: str,
        record: dict[str, Any],
        code: grpc.StatusCode,
        started: float,
    ) -> None:
        """Count an answered call in the metrics and write its access log line; ``ms`` runs
        until the answer was sent."""
        ok = code == grpc.StatusCode.OK
        # Only served names become label values: clients cannot grow the metric set.
        label = record["model"] if self.repository.serves(record["model"]) else "unknown"
        self.metrics.observe_request(
            label,
            method,
            code.name,
            record["timings"] if ok else None,
            record["images"] if ok else 0,
        )
        access_log.info(
            "%s %s %s",
            method,
            record["model"],
            code.name,
            extra={
                "request_id": rid,
                "method": method,
                "model": record["model"],
                "version": record["version"],
                "code": code.name,
                "images": record["images"],
                "ms": round((time.perf_counter() - started) * 1e3, 3),
            },
        )

    def infer(
        self,
        context: grpc.ServicerContext,
        record: dict[str, Any],
        model: ServedModel,
        inputs: dict[str, Any],
        outputs: Sequence[str] | None,
    ) -> dict[str, np.ndarray]:
        """Submit one request to ``model`` and wait for it within the caller's deadline."""
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        record["model"], record["version"] = model.name, model.version
        job = model.submit(inputs, outputs, deadline, lambda: not context.is_active())
        record["served"] = model
        try:
            results = job.future.result(timeout=remaining)
            # Stages run on this thread finish late rather than time out: the same answer.
            if deadline is not None and time.monotonic() > deadline:
                raise concurrent.futures.TimeoutError
        except concurrent.futures.TimeoutError:
            job.cancel()
            raise DeadlineExceeded(
                f"model {model.name!r} did not answer within the request's deadline "
                f"({remaining:.3f} s); allow more time or reduce load"
            ) from None
        finally:
            record["timings"] = dict(job.timings) or None
        record["images"] = job.size
        return results


class StreamCalls:
    """The requests of one stream, each admitted, answered, counted and logged like a call of
    its own (request id ``<stream's id>/<n>``); a failure answers the request and the stream goes
    on, as Triton's streaming does."""

    def __init__(self, core: ServingCore, rid: str, method: str) -> None:
        self.core, self.rid, self.method = core, rid, method
        self._count = 0

    def answer(
        self, handle: Callable[[dict[str, Any]], T]
    ) -> tuple[T | None, str, Callable[[], None]]:
        """``handle``'s answer or the error message to send instead, and the accounting to
        run once it is sent. ``handle`` names the model in ``record["model"]``."""
        self._count += 1
        rid, record, started = f"{self.rid}/{self._count}", _record(""), time.perf_counter()
        core = self.core
        with core._admission(slot=False, work=True) as refusal:
            answer, code, message = core._attempt(rid, record, handle, True, refusal)
        _count_in_model(record, code, started)
        account = functools.partial(core._account, rid, self.method, record, code, started)
        return answer, "" if code == grpc.StatusCode.OK else _bounded(message), account
