"""The OIP listeners' access control (loopback by default; beyond it a bearer token or TLS),
and the model repository extension (index, load, unload) on a model repository, through
tritonclient's REST and gRPC clients."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from repo_fixtures import LINEAR_CONFIG, free_port, metrics_text, write_config, write_version
from tritonclient.utils import InferenceServerException

from tensorbridge.listeners.grpc_api import GRPCInferenceStub, pb

from conftest import OipServer, ServerProcess, run_cli, wait_until

TOKEN = "s3cret-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GRPC_AUTH = {"authorization": f"Bearer {TOKEN}"}  # gRPC metadata keys are lower case


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OipServer]:
    """A server with a token file and a repository holding ``lin`` (y = 2x + 1)."""
    path = tmp_path_factory.mktemp("oip-admin")
    (path / "token").write_text(TOKEN + "\n")
    repo = path / "repo"
    write_version(repo, "lin", 1, 2.0, 1.0)
    write_config(repo, "lin", LINEAR_CONFIG)
    http, grpc_port = free_port(), free_port()
    srv = ServerProcess(str(path / "tb.sock"), [
        "--repository", str(repo), "--model", "echo=tensorbridge.models.testing:echo",
        "--http-port", str(http), "--grpc-port", str(grpc_port),
        "--http-token-file", str(path / "token")]).start()
    yield OipServer(srv, f"127.0.0.1:{http}", f"127.0.0.1:{grpc_port}", 0)
    srv.stop()


def _get(url: str, headers: dict[str, str] | None = None,
         context: ssl.SSLContext | None = None) -> tuple[int, Any, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def test_rest_needs_the_bearer_token_but_for_health(guarded: OipServer) -> None:
    base = f"http://{guarded.http}"
    status, body, headers = _get(f"{base}/v2/models/echo")
    assert status == 401 and "bearer token" in body["error"]
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert _get(f"{base}/v2", {"Authorization": "Bearer wrong-token-0123456789"})[0] == 401
    assert _get(f"{base}/v2/health/ready")[:2] == (200, {"ready": True})
    status, body, _ = _get(f"{base}/v2/models/echo", AUTH)
    assert status == 200 and body["name"] == "echo"
    client = thttp.InferenceServerClient(guarded.http)
    x = thttp.InferInput("x", [2], "INT32")
    x.set_data_from_numpy(np.array([4, 5], np.int32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("echo", [x])
    assert info.value.status() == "401"
    np.testing.assert_array_equal(client.infer("echo", [x], headers=AUTH).as_numpy("x"), [4, 5])


def test_grpc_needs_the_bearer_token_but_for_health(guarded: OipServer) -> None:
    client = tgrpc.InferenceServerClient(guarded.grpc)
    assert client.is_server_live() and client.is_server_ready()
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("echo")
    assert info.value.status() == "StatusCode.UNAUTHENTICATED"
    assert client.get_model_metadata("echo", headers=GRPC_AUTH).name == "echo"
    # Our own stub (importable beside tritonclient: its proto package is not ``inference``).
    stub = GRPCInferenceStub(grpc.insecure_channel(guarded.grpc))
    with pytest.raises(grpc.RpcError) as rpc:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="echo"), timeout=30)
    assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_repository_index_unload_load(guarded: OipServer, kind: str) -> None:
    if kind == "http":
        client: Any = thttp.InferenceServerClient(guarded.http)
        headers = AUTH
    else:
        client = tgrpc.InferenceServerClient(guarded.grpc)
        headers = GRPC_AUTH

    def index() -> dict[str, tuple[str, str]]:
        raw = client.get_model_repository_index(headers=headers)
        models = raw if kind == "http" else [
            {"name": m.name, "version": m.version, "state": m.state} for m in raw.models]
        return {m["name"]: (m.get("version", ""), m["state"]) for m in models}

    def y(value: float) -> float:
        mod = thttp if kind == "http" else tgrpc
        x = mod.InferInput("x", [1, 1], "FP32")
        x.set_data_from_numpy(np.array([[value]], np.float32))
        return float(client.infer("lin", [x], headers=headers).as_numpy("y")[0, 0])

    assert index()["lin"] == ("1", "READY")
    assert y(3.0) == 7.0
    client.unload_model("lin", headers=headers)
    assert not client.is_model_ready("lin", headers=headers)
    # Unloading until its last request is answered, then freed (UNAVAILABLE).
    wait_until(lambda: index()["lin"][1] == "UNAVAILABLE", "lin unloaded")
    with pytest.raises(InferenceServerException) as info:
        y(3.0)
    assert info.value.status() in ("404", "StatusCode.NOT_FOUND")
    client.load_model("lin", headers=headers)
    assert client.is_model_ready("lin", headers=headers)
    assert y(1.5) == 4.0
    with pytest.raises(InferenceServerException) as info:
        client.load_model("no_such_model", headers=headers)
    assert "no_such_model" in info.value.message()


def test_loopback_without_token_refuses_load_and_unload(oip_server: OipServer) -> None:
    client = thttp.InferenceServerClient(oip_server.http)
    assert {m["name"] for m in client.get_model_repository_index()} >= {"echo", "head"}
    for call in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException) as info:
            call("echo")
        assert info.value.status() == "403" and "http_token_file" in info.value.message()
    assert client.is_model_ready("echo")


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_beyond_loopback_needs_a_token_or_tls(tmp_path: Path, kind: str) -> None:
    port = str(free_port())
    result = run_cli("serve", "--socket", str(tmp_path / "tb.sock"), f"--{kind}-host",
                     "0.0.0.0", f"--{kind}-port", port, "--model",
                     "echo=tensorbridge.models.testing:echo")
    assert result.returncode == 2, result.stderr
    assert f"{kind}_host = '0.0.0.0' is not a loopback address" in result.stderr
    assert "http_token_file" in result.stderr
    config = tmp_path / "tb.toml"
    (tmp_path / "token").write_text(TOKEN)
    server = f'[server]\n{kind}_host = "0.0.0.0"\n{kind}_port = {port}\n'
    models = '[models.echo]\nsource = "tensorbridge.models.testing:echo"\n'
    config.write_text(server + models)
    refused = run_cli("check-config", str(config))
    assert refused.returncode == 2 and "is not a loopback address" in refused.stderr
    config.write_text(server + f'http_token_file = "{tmp_path / "token"}"\n' + models)
    accepted = run_cli("check-config", str(config))
    assert accepted.returncode == 0, accepted.stderr


def test_tls(tmp_path: Path, make_server: Any) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    http, grpc_port = free_port(), free_port()
    make_server(["echo=tensorbridge.models.testing:echo"], [
        "--http-port", str(http), "--grpc-port", str(grpc_port), "--tls-cert-file", str(cert),
        "--tls-key-file", str(key)])
    context = ssl.create_default_context(cafile=str(cert))
    status, body, _ = _get(f"https://127.0.0.1:{http}/v2", context=context)
    assert status == 200 and body["name"] == "tensorbridge"
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP: no answer
        urllib.request.urlopen(f"http://127.0.0.1:{http}/v2", timeout=10)
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}", ssl=True,
                                         root_certificates=str(cert))
    assert client.is_server_ready()
    x = tgrpc.InferInput("x", [3], "FP64")
    x.set_data_from_numpy(np.array([1.5, 2.5, -1.0]))
    np.testing.assert_array_equal(client.infer("echo", [x]).as_numpy("x"), [1.5, 2.5, -1.0])


def test_drain_answers_listener_requests_in_flight(make_server: Any) -> None:
    """SIGTERM while a REST request computes: it is answered, new ones are refused (503),
    then the server exits."""
    http, metrics = free_port(), free_port()
    srv = make_server(["sleep=tensorbridge.models.testing:sleep"],
                      ["--http-port", str(http), "--metrics-port", str(metrics),
                       "--drain-timeout", "30"])
    url = f"http://127.0.0.1:{http}/v2/models/sleep/infer"
    body = json.dumps({"inputs": [{"name": "ms", "shape": [1], "datatype": "FP32",
                                   "data": [1500]}]}).encode()
    answers: list[Any] = []

    def call() -> None:
        with urllib.request.urlopen(urllib.request.Request(url, body), timeout=30) as response:
            answers.append((response.status, json.loads(response.read())))

    caller = threading.Thread(target=call)
    caller.start()
    wait_until(lambda: "tensorbridge_in_flight_requests 1.0" in metrics_text(metrics),
               "the long request is in flight")
    srv.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: _get(f"http://127.0.0.1:{http}/v2/health/ready")[0] == 503,
               "draining shows on /v2/health/ready")
    try:
        urllib.request.urlopen(urllib.request.Request(url, body), timeout=30)
        raise AssertionError("a request during the drain was served")
    except urllib.error.HTTPError as exc:
        assert exc.code == 503 and "shutting down" in json.loads(exc.read())["error"]
    caller.join(30)
    assert answers == [(200, {"model_name": "sleep", "model_version": "1", "outputs": [
        {"name": "ms", "datatype": "FP32", "shape": [1], "data": [1500.0]}]})]
    assert srv.proc.wait(30) == 0
