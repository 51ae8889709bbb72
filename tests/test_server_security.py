"""TLS, mutual TLS and bearer tokens on the real server, with certificates made by the test."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from servers import jpeg, make_pki, running
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)
from test_server import predict_request

from fpgaserve.cli import main as cli_main
from fpgaserve.protos import grpc_predict_v2_pb2 as v2
from fpgaserve.protos import grpc_predict_v2_pb2_grpc as v2_grpc
from fpgaserve.server import ServerConfig, TlsConfig
from fpgaserve.server.auth import load_keys

KEY = "s3cr3t-key-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def secure_channel(server, ca: Path, cert: Path | None = None, key: Path | None = None):
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    return grpc.secure_channel(f"localhost:{server.port}", credentials)


def predict(ch, metadata=()):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
    return stub.Predict(predict_request([jpeg()]), timeout=30, metadata=metadata)


def test_tls_and_mutual_tls(archive, pki, tmp_path):
    tls = TlsConfig(pki["server"], pki["server_key"])
    with running(ServerConfig(archives=[archive], tls=tls)) as server:
        with secure_channel(server, pki["ca"]) as ch:
            assert predict(ch).outputs["output_alias"].float_val
        other = make_pki(tmp_path, "other")
        with secure_channel(server, other["ca"]) as ch, pytest.raises(grpc.RpcError) as info:
            predict(ch)  # the server's certificate does not chain to this CA
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    mutual = TlsConfig(pki["server"], pki["server_key"], client_ca=pki["ca"])
    with running(ServerConfig(archives=[archive], tls=mutual)) as server:
        with secure_channel(server, pki["ca"], pki["client"], pki["client_key"]) as ch:
            assert predict(ch).outputs["output_alias"].float_val
        address = ["health", "--address", f"localhost:{server.port}", "--tls-ca", str(pki["ca"])]
        client = ["--tls-cert", str(pki["client"]), "--tls-key", str(pki["client_key"])]
        assert cli_main([*address, *client]) == 0  # the container's health check, over mTLS
        assert cli_main(address) == 1  # no client certificate
        with secure_channel(server, pki["ca"]) as ch, pytest.raises(grpc.RpcError) as info:
            predict(ch)  # no client certificate
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        foreign = make_pki(tmp_path, "foreign")
        with (
            secure_channel(server, pki["ca"], foreign["client"], foreign["client_key"]) as ch,
            pytest.raises(grpc.RpcError) as info,
        ):
            predict(ch)  # a client certificate from a CA the server does not trust
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_bad_tls_files_are_named_at_start(archive, pki, tmp_path, capsys):
    """Found in review: gRPC only said it failed to bind the port."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    TlsConfig(pki["server"], pki["server_key"], pki["ca"]).check()
    for tls, fragment in [
        (TlsConfig(pki["server"], pki["client_key"]), "its own, unencrypted private key"),
        (TlsConfig(garbage, pki["server_key"]), "must be a PEM certificate"),
        (TlsConfig(pki["server"], pki["server_key"], garbage), "must hold PEM CA certificates"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            tls.check()
    serve = ["serve", str(archive), "--port", "0", "--metrics-port", "-1"]
    tls = ["--tls-cert", str(pki["server"]), "--tls-key", str(pki["client_key"])]
    logger = logging.getLogger("fpgaserve")
    saved = logger.handlers[:], logger.level, logger.propagate
    try:
        assert cli_main([*serve, *tls]) == 1
    finally:  # serve configures the process's logging: leave it as the other tests expect
        logger.handlers[:], logger.level, logger.propagate = saved
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("fpgaserve serve: error: TLS:") and str(pki["client_key"]) in error


def test_bearer_tokens_guard_every_rpc_but_health(archive, caplog):
    caplog.set_level(logging.INFO, logger="fpgaserve")
    config = ServerConfig(archives=[archive], auth_keys=[b"other-key", KEY.encode()])
    with running(config) as server, grpc.insecure_channel(f"localhost:{server.port}") as ch:
        good = [("authorization", f"Bearer {KEY}")]
        assert predict(ch, good).outputs["output_alias"].float_val

        status = get_model_status_pb2.GetModelStatusRequest()
        status.model_spec.name = "tiny"
        calls = [
            lambda md: predict(ch, md),
            lambda md: model_service_pb2_grpc.ModelServiceStub(ch).GetModelStatus(
                status, timeout=10, metadata=md
            ),
            lambda md: v2_grpc.GRPCInferenceServiceStub(ch).ModelMetadata(
                v2.ModelMetadataRequest(name="tiny"), timeout=10, metadata=md
            ),
            lambda md: v2_grpc.GRPCInferenceServiceStub(ch).ServerLive(
                v2.ServerLiveRequest(), timeout=10, metadata=md
            ),
            lambda md: list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                timeout=10, metadata=md,
            )),
        ]  # fmt: skip
        bad_metadata = [
            (),
            [("authorization", "Bearer wrong")],
            [("authorization", KEY)],  # no scheme
            [("authorization", f"Basic {KEY}")],
        ]
        for call in calls:
            call(good)
            for metadata in bad_metadata:
                with pytest.raises(grpc.RpcError) as info:
                    call(metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "Bearer" in info.value.details()
                assert dict(info.value.initial_metadata())[
                    "request_id"
                ]  # as Brainwave's clients read it

        # Orchestrators' probes carry no token.
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert caplog.records, "the server logs requests"
    assert not [r for r in caplog.records if KEY in r.getMessage() or KEY in str(vars(r))]


# Found by review: the refusal was a unary handler, so its thread waited for the request body
# first; calls from a client without a token that never sent one took every thread (72 with
# the defaults), and health checks were refused RESOURCE_EXHAUSTED.
def test_calls_without_a_token_are_refused_before_their_request_arrives(archive):
    config = ServerConfig(archives=[archive], auth_keys=[KEY.encode()], max_concurrent_calls=1)
    never_sent = threading.Event()

    def no_body():  # the call's headers go out; its message never does
        never_sent.wait()
        yield from ()

    with running(config) as server, grpc.insecure_channel(f"localhost:{server.port}") as ch:
        predict_call = ch.stream_unary("/tensorflow.serving.PredictionService/Predict")
        stalled = [predict_call.future(no_body(), timeout=60) for _ in range(12)]  # > 1 + 8
        try:
            for call in stalled:
                assert call.exception(timeout=30).code() == grpc.StatusCode.UNAUTHENTICATED
            check = health_pb2_grpc.HealthStub(ch).Check
            reply = check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert predict(ch, [("authorization", f"Bearer {KEY}")]).outputs["output_alias"]
        finally:
            never_sent.set()


def test_keys_come_from_a_file_and_the_environment(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# operators' keys\nkey-one\n\n  key-two  \n")
    assert load_keys(path, {"FPGASERVE_AUTH_KEYS": "key-three, "}) == [
        b"key-three", b"key-one", b"key-two"
    ]  # fmt: skip
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no keys"):
        load_keys(path, {})
    with pytest.raises(ValueError, match="FPGASERVE_AUTH_KEYS is set but holds no keys"):
        load_keys(None, {"FPGASERVE_AUTH_KEYS": " , "})  # not a server open to all
    assert load_keys(None, {}) == []  # no authentication asked for
    path.write_text("\ufeffkey-one\n", encoding="utf-8")  # as some editors save it
    assert load_keys(path, {}) == [b"key-one"]  # found in review: the BOM was part of the key
