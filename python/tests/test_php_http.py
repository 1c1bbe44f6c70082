"""The PHP client over HTTP (php/src/Transport/HttpTransport.php): real PHP processes calling a
real Open Inference Protocol server written elsewhere (KServe's ModelServer, PyPI `kserve`,
python/tests/php/kserve_peer.py) and TensorBridge's own REST listener (`serve --http-port`),
both serving echo, fail, sleep and digits. Every call carries a bearer token the server checks."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_fpm import fpm  # noqa: F401 - the php-fpm fixture

from conftest import PHP_DIR, ROOT, TEST_MODELS, wait_until
from fcgi import get

# one worker starts each peer once (module-scoped) instead of every worker its own
pytestmark = pytest.mark.xdist_group("php_http")

TOKEN = "s3cret-token-for-php-tests"
DTYPE_VALUES: dict[str, list[Any]] = {
    "BOOL": [True, False, True],
    "UINT8": [0, 200, 255],
    "INT8": [-128, 0, 127],
    "INT16": [-30000, 7],
    "INT32": [-2147483648, 2147483647],
    "INT64": [-(2**62), 2**40],
    "FP16": [0.5, -2.0, 1024.0],
    "FP32": [1.5, -2.25, 0.0],
    "FP64": [1e-300, -3.5],
    "BF16": [1.0, -0.5],
    "BYTES": ["aGk=", "", "AMOp"],  # base64 of "hi", "", "\0é"
}
#: BYTES items that are not UTF-8 (KServe's Python server turns binary inputs into JSON-ready
#: strings and refuses these; TensorBridge passes any bytes)
RAW_BYTES = ["AP8A", "/w=="]  # base64 of b"\0\xff\0", b"\xff"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, ca_file: str | None = None) -> dict[str, Any]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None
    with urllib.request.urlopen(req, timeout=5, context=context) as resp:  # noqa: S310 - a local test server
        return json.loads(resp.read())  # type: ignore[no-any-return]


def _answers(url: str, ca_file: str | None) -> bool:
    try:
        _get(url + "/v2/health/ready", ca_file)
        return True
    except (OSError, urllib.error.URLError):
        return False


def _flat(rows: list[list[float]]) -> list[float]:
    return [v for row in rows for v in row]


class Peer:
    """A running OIP server: its name in v2 metadata, its URL, its process and the CA file that
    signed its TLS certificate (None for plain HTTP)."""

    def __init__(self, kind: str, url: str, proc: subprocess.Popen, ca_file: str | None) -> None:
        self.kind, self.url, self.proc, self.ca_file = kind, url, proc, ca_file

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module", params=["kserve", "tensorbridge"])
def peer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    """KServe over plain HTTP, TensorBridge over HTTPS (a self-signed certificate): both with a token."""
    port = _free_port()
    ca_file = None
    if request.param == "kserve":
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, str(PHP_DIR / "kserve_peer.py"), str(port), TOKEN]
    else:
        url = f"https://127.0.0.1:{port}"
        tmp = tmp_path_factory.mktemp("http")
        token_file, cert, key = tmp / "token", tmp / "cert.pem", tmp / "key.pem"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
        ca_file = str(cert)
        cmd = [sys.executable, "-m", "tensorbridge", "serve", "--socket", str(tmp / "tb.sock"),
               "--threads", "2", "--http-port", str(port), "--http-token-file", str(token_file),
               "--tls-cert-file", str(cert), "--tls-key-file", str(key),
               *[a for m in TEST_MODELS for a in ("--model", m)]]
    log = tmp_path_factory.mktemp("log") / "peer.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    srv = Peer(request.param, url, proc, ca_file)
    try:
        wait_until(lambda: _answers(url, ca_file) or proc.poll() is not None, "the peer answers",
                   timeout=90, every=0.2)
        assert proc.poll() is None, log.read_text()
        yield srv
    finally:
        srv.stop()


def run(target: Peer | str, ops: list[dict[str, Any]], token: str | None = TOKEN,
        timeout: float = 5.0, **extra: Any) -> list[dict[str, Any]]:
    """Run the PHP HTTP driver with these operations on one Client (to a peer, trusting its CA,
    or to a URL); its results."""
    url, ca_file = (target.url, target.ca_file) if isinstance(target, Peer) else (target, None)
    cmd = {"url": url, "token": token, "timeout": timeout, "ops": ops, "ca_file": ca_file, **extra}
    proc = subprocess.run(["php", str(PHP_DIR / "http_calls.php")], input=json.dumps(cmd),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stdout + proc.stderr
    results: list[dict[str, Any]] = json.loads(proc.stdout)
    return results


def infer(model: str, **inputs: tuple[str, list[Any]]) -> dict[str, Any]:
    return {"op": "infer", "model": model,
            "inputs": {name: {"dtype": dt, "data": data} for name, (dt, data) in inputs.items()}}


def test_metadata_names_the_server_and_the_model_signatures(peer: Peer) -> None:
    pong, models = run(peer, [{"op": "ping"}, {"op": "models"}])
    assert pong["server"] == peer.kind and pong["protocol"] == "oip-v2"
    by_name = {m["name"]: m for m in models}
    assert {"echo", "fail", "sleep", "digits"} <= set(by_name)
    assert by_name["digits"]["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert by_name["digits"]["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]


def test_every_datatype_round_trips_through_echo(peer: Peer) -> None:
    names = list(DTYPE_VALUES)
    ops = [infer("echo", x=(dt, DTYPE_VALUES[dt])) for dt in names]
    ops.append({"op": "infer", "model": "echo",
                "inputs": {"m": {"dtype": "INT32", "data": list(range(6)), "shape": [2, 3]}}})
    ops.append(infer("echo", raw=("BYTES", RAW_BYTES)))
    results = run(peer, ops)
    for dt, result in zip(names, results[:len(names)], strict=True):
        if peer.kind == "kserve" and dt == "BF16":
            # KServe's Python server decodes tensors with numpy, which has no bfloat16: a typed
            # refusal carrying the server's message, not a wrong answer
            assert result["error"] == "InvalidInputException" and "(HTTP 400)" in result["message"], result
            continue
        assert "error" not in result, (dt, result)
        values = DTYPE_VALUES[dt]
        assert result["outputs"]["x"] == {"dtype": dt, "shape": [len(values)], "data": values}
    assert results[-2]["outputs"]["m"] == {"dtype": "INT32", "shape": [2, 3], "data": [[0, 1, 2], [3, 4, 5]]}
    if peer.kind == "kserve":
        assert results[-1]["error"] == "ModelException" and "UTF-8" in results[-1]["message"]
    else:
        assert results[-1]["outputs"]["raw"]["data"] == RAW_BYTES


def test_a_digits_batch_gives_the_models_logits(peer: Peer) -> None:
    import torch

    from tensorbridge.models.digits import create

    rows = (torch.arange(4 * 64, dtype=torch.float32).reshape(4, 64) * 7 % 17).tolist()
    with torch.no_grad():
        expected = create().eval()(torch.tensor(rows)).tolist()
    (one, many, batch) = run(peer, [
        infer("digits", input=("FP32", rows)),
        {"op": "infer_many", "model": "echo",
         "inputs": [{"v": {"dtype": "INT64", "data": [i] * (i + 1)}} for i in range(3)]},
        {"op": "infer_batch", "model": "digits", "inputs": [
            {"input": {"dtype": "FP32", "data": rows[:1]}},
            {"input": {"dtype": "FP32", "data": [[1.0, 2.0]]}},
            {"input": {"dtype": "FP32", "data": rows[1:3]}}]},
    ])
    logits = one["outputs"]["logits"]
    assert logits["shape"] == [4, 10]
    assert _flat(logits["data"]) == pytest.approx(_flat(expected), abs=1e-4)
    assert [r["v"]["data"] for r in many] == [[0], [1, 1], [2, 2, 2]]
    assert _flat(batch[0]["outputs"]["logits"]["data"]) == pytest.approx(_flat(expected[:1]), abs=1e-4)
    assert batch[1]["error"] == "InvalidInputException"  # one bad item fails alone
    assert _flat(batch[2]["outputs"]["logits"]["data"]) == pytest.approx(_flat(expected[1:3]), abs=1e-4)


def test_server_errors_become_the_typed_exceptions(peer: Peer) -> None:
    unknown, shape, failing, after, breaker = run(peer, [
        infer("no-such-model", x=("FP32", [1.0])),
        infer("digits", input=("FP32", [[1.0, 2.0]])),
        infer("fail", x=("FP32", [1.0])),
        infer("echo", x=("FP32", [1.0])),
        {"op": "breaker"},
    ])
    assert unknown["error"] == "ModelNotFoundException" and unknown["code"] == "MODEL_NOT_FOUND"
    assert 'model "no-such-model" is not loaded on the server' in unknown["message"]
    assert shape["error"] == "InvalidInputException" and shape["code"] == "INVALID_INPUT"
    assert failing["error"] == "ModelException" and failing["code"] == "MODEL_ERROR"
    assert after["outputs"]["x"]["data"] == [1.0]
    assert breaker["state"] == "closed"  # the server answered every time: it is up


def test_a_timeout_is_a_timeout_and_the_next_call_works(peer: Peer) -> None:
    slow, fine = run(peer, [infer("sleep", ms=("FP32", [1500.0])), infer("echo", x=("INT32", [3]))],
                     timeout=0.3)
    assert slow["error"] in ("TimeoutException", "DeadlineExceededException"), slow
    assert "0.300 s" in slow["message"] or slow["code"] == "DEADLINE_EXCEEDED", slow
    assert fine["outputs"]["x"]["data"] == [3]


def test_keep_alive_serves_every_call_on_one_connection(peer: Peer) -> None:
    before = _get(peer.url + "/test/connections")["connections"] if peer.kind == "kserve" else None
    results = run(peer, [{"op": "models"}] + [infer("echo", x=("FP32", [float(i)])) for i in range(20)]
                  + [{"op": "connects"}])
    assert all("error" not in r for r in results[:-1])
    assert results[-1]["connects"] == 1
    if before is not None:  # the server saw one client port for all 21 + metadata requests
        assert _get(peer.url + "/test/connections")["connections"] == before + 1


def test_a_missing_or_wrong_token_is_unauthorized(peer: Peer) -> None:
    for token in (None, "wrong-token"):
        denied, breaker = run(peer, [infer("echo", x=("FP32", [1.0])), {"op": "breaker"}], token=token)
        assert denied["error"] == "UnauthorizedException" and denied["code"] == "UNAUTHORIZED", denied
        assert "check the bearer token" in denied["message"]
        assert breaker["state"] == "closed"  # a refusal is not an outage


def test_a_server_that_is_down_fails_fast_then_the_breaker_opens(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    ops = [infer("echo", x=("FP32", [1.0]))] * 3 + [{"op": "breaker"}]
    first, second, third, breaker = run(url, ops, timeout=30.0, breaker_threshold=2, state_dir=str(tmp_path))
    for failed in (first, second):
        # refused at once, not after the 30 s timeout; retried (3 connect attempts) first
        assert failed["error"] == "ConnectionException" and "cannot connect to " + url in failed["message"]
        assert "3 attempts" in failed["message"]
    assert third["error"] == "CircuitOpenException"
    assert breaker["state"] == "open"


@pytest.mark.parametrize("peer", ["tensorbridge"], indirect=True)
def test_the_client_contract_holds_over_http(peer: Peer) -> None:
    """The PHPUnit contract cases that LocalTransport and FakeTransport pass (versions, routing
    keys, timings, batches included), over HTTP against TensorBridge's own REST listener."""
    proc = subprocess.run(
        ["phpunit", "--group", "server", "--filter", "HttpTransportContractTest"],
        cwd=ROOT / "php",
        env={**os.environ, "TENSORBRIDGE_CONTRACT_URL": peer.url, "TENSORBRIDGE_CONTRACT_TOKEN": TOKEN,
             "TENSORBRIDGE_CONTRACT_CA": str(peer.ca_file)},
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ran = re.search(r"OK \((\d+) tests?", proc.stdout)
    cases = (ROOT / "php" / "tests" / "ClientContractTestCase.php").read_text()
    assert ran is not None and int(ran.group(1)) == len(re.findall(r"public function test\w+\(", cases))


@pytest.mark.parametrize("peer", ["tensorbridge"], indirect=True)
def test_https_checks_the_servers_certificate(peer: Peer) -> None:
    assert peer.url.startswith("https://")
    (untrusted,) = run(peer.url, [infer("echo", x=("FP32", [1.0]))])  # the system CAs only
    assert untrusted["error"] == "ConnectionException", untrusted
    assert "TLS with " + peer.url in untrusted["message"] and "caFile" in untrusted["message"]
    (trusted,) = run(peer, [infer("echo", x=("FP32", [1.0]))])
    assert trusted["outputs"]["x"]["data"] == [1.0]


@pytest.mark.parametrize("peer", ["kserve"], indirect=True)
def test_under_php_fpm_a_web_request_keeps_one_connection(peer: Peer, fpm: str) -> None:  # noqa: F811
    """PHP 8.2 frees curl handles when a web request ends: each web request opens one connection
    and makes all its calls on it (PHP >= 8.5 keeps it across requests: HttpChannel)."""
    before = _get(peer.url + "/test/connections")["connections"]
    query = urllib.parse.urlencode({"url": peer.url, "token": TOKEN, "n": 5})
    pages = [json.loads(get(fpm, str(PHP_DIR / "http_page.php"), query)) for _ in range(3)]
    assert [(p.get("ok"), p.get("connects")) for p in pages] == [(True, 1)] * 3, pages
    assert len({p["pid"] for p in pages}) == 1  # one worker served them all
    assert _get(peer.url + "/test/connections")["connections"] == before + 3


def test_a_server_killed_mid_call_is_a_connection_error_not_a_timeout(tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorbridge", "serve", "--socket", str(tmp_path / "tb.sock"),
         "--http-port", str(port), "--model", "sleep=tensorbridge.models.testing:sleep"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _answers(url, None) or server.poll() is not None, "the server answers",
                   timeout=90, every=0.2)
        cmd = {"url": url, "token": None, "timeout": 30.0, "connect_attempts": 1,
               "ops": [infer("sleep", ms=("FP32", [5000.0])), infer("sleep", ms=("FP32", [1.0]))]}
        php = subprocess.Popen(["php", str(PHP_DIR / "http_calls.php")], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert php.stdin is not None
        php.stdin.write(json.dumps(cmd))
        php.stdin.close()
        php.stdin = None
        wait_until(lambda: _in_flight(port), "the call reached the server", timeout=30)
        server.kill()
        out, err = php.communicate(timeout=60)
    finally:
        server.kill()
        server.wait()
    assert php.returncode == 0, err
    during, after = json.loads(out)
    assert during["error"] == "ConnectionException", during  # at once, not after the 30 s timeout
    assert "closed the connection" in during["message"]
    # refused, or reset when it raced the dying listener: a ConnectionException either way
    assert after["error"] == "ConnectionException", after


def _in_flight(port: int) -> bool:
    """Whether a client connection to the port is established (seen in /proc/net/tcp)."""
    suffix = f":{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()  # sl, local address, remote address, state (01: established), ...
        if fields[3] == "01" and fields[1].endswith(suffix):
            return True
    return False
