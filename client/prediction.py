"""Prediction clients: Azure's ``PredictionClient`` interface over either protocol, sync or async.

``score_file(path)``, ``score_image(bytes)`` and ``score_numpy_arrays({name: array})`` behave as
in Azure's client: without ``outputs`` the model's single (final) output comes back as one NumPy
array; ``outputs="name"`` gives that array; a list of names gives a list of arrays. For one image
(``score_file``, ``score_image``) the batch dimension is removed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from .channel import DEFAULT_MAX_MESSAGE_MB, DEFAULT_TIMEOUT_S, ChannelSettings, target
from .errors import PredictionError
from .protocols import TfServingProtocol, V2Protocol

Outputs = str | Sequence[str] | None


def _wanted(outputs: Outputs) -> list[str] | None:
    return [outputs] if isinstance(outputs, str) else list(outputs) if outputs else None


def _select(results: dict[str, np.ndarray], outputs: Outputs) -> Any:
    if isinstance(outputs, str):
        return results[outputs]
    if outputs:
        return [results[name] for name in outputs]
    # v2 answers with every output when none is named; the model's final one comes last.
    return list(results.values())[-1]


def _first_item(result: Any) -> Any:
    return [array[0] for array in result] if isinstance(result, list) else result[0]


def _image(image: bytes) -> np.ndarray:
    batch = np.empty(1, dtype=object)
    batch[0] = bytes(image)
    return batch


class _Client:
    """Settings, request building and result shaping shared by the sync and async clients."""

    protocol_class: type = V2Protocol

    def __init__(
        self,
        address: str,
        port: int | None = None,
        use_ssl: bool = False,
        access_token: str = "",
        service_name: str = "",
        channel_shutdown_timeout: timedelta = timedelta(minutes=2),
        *,
        model_name: str = "",
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        max_message_mb: float = DEFAULT_MAX_MESSAGE_MB,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_attempts: int = 5,
    ) -> None:
        if not address:
            raise ValueError("address is required, e.g. 'localhost:8500'")
        route = (("x-ms-aml-grpc-service-route", f"/api/v1/service/{service_name}"),)
        self.settings = ChannelSettings(
            target(address, port, use_ssl),
            use_ssl,
            root_certificates,
            certificate_chain,
            private_key,
            access_token,
            int(max_message_mb * 2**20),
            timeout,
            max_attempts,
            extra_metadata=route if service_name else (),
        )
        self.model_name = model_name
        self.protocol = self.protocol_class()
        # As Azure's client: a channel idle longer than this is replaced by a fresh one.
        self._idle_limit = channel_shutdown_timeout.total_seconds()
        self._channel: Any = None
        self._last_use = 0.0

    def _request(self, inputs: Mapping[str, Any], outputs: Outputs) -> Any:
        arrays = {name: np.asarray(value) for name, value in inputs.items()}
        return self.protocol.build(self.model_name, arrays, _wanted(outputs))

    def _method(self, channel: Any) -> Any:
        """The Predict/ModelInfer call on ``channel`` (sync or grpc.aio alike)."""
        protocol = self.protocol
        return channel.unary_unary(protocol.method, protocol.serialize, protocol.deserialize)

    def _call_options(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": timeout or self.settings.timeout_s, "metadata": self.settings.metadata}

    def _stale(self) -> bool:
        now = time.monotonic()
        stale = self._channel is None or now - self._last_use > self._idle_limit
        self._last_use = now
        return stale


class PredictionClient(_Client):
    """Azure's ``PredictionClient`` over TensorFlow Serving's Predict (needs TensorFlow)."""

    protocol_class = TfServingProtocol

    def _call(self, request: Any, timeout: float | None) -> dict[str, np.ndarray]:
        if self._stale():
            if self._channel is not None:
                self._channel.close()
            self._channel = self.settings.open()
            self._stub = self._method(self._channel)
        try:
            response = self._stub(request, **self._call_options(timeout))
        except grpc.RpcError as error:
            raise PredictionError.from_rpc(error) from None
        return self.protocol.read(response)

    def score_numpy_arrays(
        self, input_map: Mapping[str, Any], outputs: Outputs = None, timeout: float | None = None
    ) -> Any:
        return _select(self._call(self._request(input_map, outputs), timeout), outputs)

    def score_image(
        self,
        image: bytes,
        input_name: str = "images",
        outputs: Outputs = None,
        timeout: float | None = None,
    ) -> Any:
        return _first_item(self.score_numpy_arrays({input_name: _image(image)}, outputs, timeout))

    def score_file(
        self,
        path: str | Path,
        input_name: str = "images",
        outputs: Outputs = None,
        timeout: float | None = None,
    ) -> Any:
        return self.score_image(Path(path).read_bytes(), input_name, outputs, timeout)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def __enter__(self) -> PredictionClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class V2PredictionClient(PredictionClient):
    """The same calls over KServe v2: needs only grpcio, protobuf and NumPy."""

    protocol_class = V2Protocol


class AsyncPredictionClient(_Client):
    """``PredictionClient`` for asyncio: the same methods as coroutines, one grpc.aio channel."""

    protocol_class = TfServingProtocol

    async def _call(self, request: Any, timeout: float | None) -> dict[str, np.ndarray]:
        if self._stale():
            if self._channel is not None:
                await self._channel.close()
            self._channel = self.settings.open_async()
            self._stub = self._method(self._channel)
        try:
            response = await self._stub(request, **self._call_options(timeout))
        except grpc.RpcError as error:
            raise PredictionError.from_rpc(error) from None
        return self.protocol.read(response)

    async def score_numpy_arrays(
        self, input_map: Mapping[str, Any], outputs: Outputs = None, timeout: float | None = None
    ) -> Any:
        return _select(await self._call(self._request(input_map, outputs), timeout), outputs)

    async def score_image(
        self,
        image: bytes,
        input_name: str = "images",
        outputs: Outputs = None,
        timeout: float | None = None,
    ) -> Any:
        inputs = {input_name: _image(image)}
        return _first_item(await self.score_numpy_arrays(inputs, outputs, timeout))

    async def score_file(
        self,
        path: str | Path,
        input_name: str = "images",
        outputs: Outputs = None,
        timeout: float | None = None,
    ) -> Any:
        return await self.score_image(Path(path).read_bytes(), input_name, outputs, timeout)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> AsyncPredictionClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class AsyncV2PredictionClient(AsyncPredictionClient):
    """The asyncio client over KServe v2 (no TensorFlow needed)."""

    protocol_class = V2Protocol
