"""Errors a client raises: one line that says what went wrong and what to do."""

from __future__ import annotations

import grpc

REQUEST_ID = "x-request-id"


class PredictionError(grpc.RpcError):
    """A call the server refused or that could not reach it. It is a ``grpc.RpcError`` with
    ``code()`` and ``details()``, so code written against Azure's client keeps catching it."""

    def __init__(self, code: grpc.StatusCode, details: str, request_id: str = "") -> None:
        self._code, self._details, self.request_id = code, details, request_id
        suffix = f" (request id {request_id})" if request_id else ""
        super().__init__(f"{code.name}: {details}{suffix}")

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> PredictionError:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = (error.details() if hasattr(error, "details") else "") or code.name.lower()
        trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
        request_id = next((v for k, v in trailing or () if k == REQUEST_ID), "")
        lowered = details.lower()
        setting_up = ("failed to connect to all addresses", "errors resolving")
        if code == grpc.StatusCode.UNAVAILABLE and any(k in lowered for k in setting_up):
            hint = next((hint for keys, hint in _HINTS if any(k in lowered for k in keys)), None)
            details += f" ({hint})" if hint else ""
        return cls(code, details, request_id)


# What a failure to set up a connection most likely means, by what gRPC says (first match).
_HINTS = (
    (
        ("handshake",),
        "TLS failed: does the server speak TLS, and did the CA given (root_certificates, "
        "--ca) sign its certificate?",
    ),
    (
        ("socket closed", "connection reset"),
        "the server closed the connection as it was set up: a TLS server called without TLS "
        "(use_ssl, --ssl), one that wants a client certificate it trusts (certificate_chain "
        "and private_key, --cert and --key), or a server shutting down",
    ),
    (
        ("connection refused", "failed to connect to remote host", "errors resolving"),
        "is the server running, and are the address and port right?",
    ),
)
