"""Prometheus metrics (prometheus-client), on their own registry so that several servers can live
in one process (tests) without clashing.

Latency is recorded as histograms per model and stage (queue, preprocess, device, classify,
total), so p50/p99 are read with ``histogram_quantile`` rather than averaged away.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

METRICS_PATH = "/metrics"

# 100 us .. 60 s: the server's own overhead sits at the low end, a ResNet-152 batch on the
# emulator at the high end.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._http = None
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self.requests = Counter(
            "fpgaserve_requests",
            "Requests answered, by model, protocol method and status code",
            ["model", "method", "code"],
            registry=self.registry,
        )
        self.images = Counter(
            "fpgaserve_images",
            "Images (batch items) answered successfully",
            ["model"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fpgaserve_stage_seconds",
            "Time a request spent in each stage, and in total",
            ["model", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "fpgaserve_batch_size",
            "Images per batch that a stage ran successfully",
            ["model", "stage"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "fpgaserve_in_flight_images",
            "Images admitted and not yet answered",
            ["model"],
            registry=self.registry,
        )
        self.model_ready = Gauge(
            "fpgaserve_model_ready",
            "1 when the model version is available on a healthy device",
            ["model", "version"],
            registry=self.registry,
        )

    def _labelled(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, remembered: prometheus-client validates and locks on every
        ``labels`` call, and a request makes about ten of them."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def observe_request(
        self,
        model: str,
        method: str,
        code: str,
        timings: dict[str, float] | None = None,
        images: int = 0,
    ) -> None:
        self._labelled(self.requests, model, method, code).inc()
        if images:
            self._labelled(self.images, model).inc(images)
        for stage, seconds in (timings or {}).items():
            self._labelled(self.latency, model, stage).observe(seconds)

    def observe_batch(self, model: str, stage: str, images: int) -> None:
        self._labelled(self.batch_size, model, stage).observe(images)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Expose ``/metrics`` over HTTP; returns the bound port (``port=0`` picks a free one)."""
        try:
            family = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0][0]
            server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
            app = _only_metrics(make_wsgi_app(self.registry))
            server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        except OSError as exc:
            raise OSError(
                f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}); is the port in "
                "use? choose another with --metrics-port, or -1 for none"
            ) from None
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        self._http = server
        return server.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


class _QuietHandler(WSGIRequestHandler):
    """Scrapes are not worth a stderr line each (the JSON logs carry what matters)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _only_metrics(app: Callable) -> Callable:
    """prometheus-client's app answers every path with the metrics; a probe or a typo pointed
    at another path should learn where they are instead."""

    def routed(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO") in (METRICS_PATH, METRICS_PATH + "/"):
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [f"not found; the metrics are at {METRICS_PATH}\n".encode()]

    return routed
