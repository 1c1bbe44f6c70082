"""End to end, PHP -> Python: real `tensorbridge serve` processes and real PHP processes."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PHP_DIR, VECTORS, php, php_popen, wait_until

pytestmark = pytest.mark.usefixtures("leak_check")


@pytest.fixture
def server(shared_server):
    """The worker's shared server: no test here kills, stops or reconfigures it (those that
    do start their own with make_server). Each test starts once the previous one's
    connections are closed, so that descriptor counts compare like with like."""
    def sockets() -> int:
        return sum(t.startswith("socket:") for t in shared_server.fds())

    wait_until(lambda: sockets() == shared_server.idle_sockets and shared_server.memfds() == 0,
               "the previous test's connections are closed", every=0.02)
    return shared_server


def test_ping_and_models(server) -> None:
    pong, models = php({"socket": server.socket, "calls": [{"op": "ping"}, {"op": "models"}]})
    assert pong["pong"]["server"] == "tensorbridge" and pong["pong"]["protocol"] == 1
    digits = next(m for m in models["models"] if m["name"] == "digits")
    assert digits["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]


@pytest.mark.parametrize("vec", VECTORS["tensors"], ids=lambda v: v["name"])
def test_every_dtype_round_trips(server, vec) -> None:
    calls = [
        {"op": "infer", "model": "echo",
         "inputs": {"x": {"dtype": vec["dtype"], "values": vec["values"]}}},
        {"op": "infer", "model": "echo",
         "inputs": {"x": {"dtype": vec["dtype"], "shape": vec["shape"], "hex": vec["hex"]}}},
    ]
    for result in php({"socket": server.socket, "calls": calls}):
        assert set(result["timing"]) == {"queue_us", "compute_us", "preprocess_us", "batch_size",
                                         "version"}
        out = result["outputs"]["x"]
        assert out["hex"] == vec["hex"] and out["shape"] == vec["shape"]
        assert out["dtype"] == vec["dtype"]
        if vec["dtype"] != "BYTES":
            assert out["values"] == vec["values"]


def test_checksummed_connection_round_trips(server) -> None:
    (r,) = php({"socket": server.socket, "checksums": True, "calls": [
        {"op": "infer", "model": "echo", "inputs": {
            "a": {"dtype": "FP64", "values": [[1.5, 2.5], [3.5, 4.5]]},
            "b": {"dtype": "BYTES", "values": ["jpeg-bytes", "ü"]}}}]})
    assert r["outputs"]["a"]["values"] == [[1.5, 2.5], [3.5, 4.5]]


def test_digits_from_plain_php_arrays(server) -> None:
    samples = json.loads((PHP_DIR.parents[2] / "examples" / "digits_samples.json").read_text())
    (r,) = php({"socket": server.socket, "calls": [{"op": "infer", "model": "digits", "inputs": {
        "input": {"array": [s["pixels"] for s in samples]}}}]})
    logits = r["outputs"]["logits"]
    assert logits["shape"] == [len(samples), 10] and logits["dtype"] == "FP32"
    guesses = [row.index(max(row)) for row in logits["values"]]
    assert sum(g == s["label"] for g, s in zip(guesses, samples, strict=True)) >= 9


def test_64_mib_tensor(server) -> None:
    (r,) = php({"socket": server.socket, "timeout": 60, "calls": [
        {"op": "big", "bytes": 64 << 20}]})
    assert r.get("equal") is True, r
    assert r["shape"] == [64 << 20]


def test_pipelined_infer_many(server) -> None:
    inputs = [{"x": {"dtype": "INT64", "values": list(range(i, i + 5 * i + 1))}}
              for i in range(12)]
    (r,) = php({"socket": server.socket, "calls": [
        {"op": "infer_many", "model": "echo", "inputs": inputs}]})
    assert [o["x"]["values"] for o in r["many"]] == [i["x"]["values"] for i in inputs]


def test_32_processes_x_200_requests_all_answers_checked(server) -> None:
    before = server.fds()
    procs = [subprocess.Popen(["php", str(PHP_DIR / "worker.php"), server.socket, str(w), "200"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in range(32)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert [r["errors"] for r in results if r["errors"]] == []
    assert sum(r["ok"] for r in results) == 32 * 200
    assert sum(r["bad"] for r in results) == 0
    _settle(server, before)


def _settle(server, before: list[str]) -> None:
    """Wait (bounded) for the server to close what the finished clients left behind."""
    deadline = time.monotonic() + 10
    while server.fds() != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.fds() == before
    assert server.memfds() == 0


@pytest.mark.parametrize(("call", "error", "match"), [
    ({"model": "nope", "inputs": {"x": {"dtype": "FP32", "values": [1.0]}}},
     "ModelNotFoundException", "loaded models"),
    ({"model": "digits", "inputs": {"input": {"dtype": "FP64", "values": [[0.0] * 64]}}},
     "InvalidInputException", "must be FP32"),
    ({"model": "digits", "inputs": {"input": {"dtype": "FP32", "values": [[0.0] * 63]}}},
     "InvalidInputException", "shape"),
    ({"model": "digits", "inputs": {"pixels": {"dtype": "FP32", "values": [[0.0] * 64]}}},
     "InvalidInputException", "missing"),
    ({"model": "fail", "inputs": {"x": {"dtype": "FP32", "values": [1.0]}}},
     "ModelException", "ValueError: this model always fails"),
])
def test_bad_requests_get_typed_errors_and_server_keeps_serving(server, call, error,
                                                                match) -> None:
    bad, good = php({"socket": server.socket, "calls": [
        {"op": "infer", **call},
        {"op": "infer", "model": "echo", "inputs": {"x": {"dtype": "INT8", "values": [1, 2]}}}]})
    assert bad["error"] == error and match in bad["message"] and bad["is_base"]
    assert good["outputs"]["x"]["values"] == [1, 2]


def test_oversized_payload(make_server) -> None:
    server = make_server(extra=["--region-cap-mb", "4"])
    bad, good = php({"socket": server.socket, "calls": [
        {"op": "big", "bytes": 8 << 20}, {"op": "ping"}]})
    assert bad["error"] == "PayloadTooLargeException" and "cap" in bad["message"]
    assert good["pong"]["server"] == "tensorbridge"


def test_ragged_array_rejected_before_sending(server) -> None:
    (r,) = php({"socket": server.socket, "calls": [{"op": "infer", "model": "echo", "inputs": {
        "x": {"dtype": "FP32", "values": [[1.0, 2.0], [3.0]]}}}]})
    assert r["error"] == "InvalidInputException" and "ragged" in r["message"]


def test_client_timeout_keeps_connection_usable(server) -> None:
    slow, _, late, again = php({"socket": server.socket, "timeout": 0.2, "calls": [
        {"op": "infer", "model": "sleep", "inputs": {"ms": {"dtype": "FP32", "values": [1500.0]}}},
        {"op": "sleep", "us": 1_500_000},
        # The sleeper's late reply is now waiting in the socket: it must be dropped, and
        # this call must get its own answer on the same connection.
        {"op": "infer", "model": "echo", "inputs": {"x": {"dtype": "INT16", "values": [7]}}},
        {"op": "infer", "model": "echo", "inputs": {"x": {"dtype": "INT16", "values": [8]}}},
    ]})
    assert slow["error"] == "TimeoutException" and slow["deadline"] == "client"
    assert "the client's own deadline" in slow["message"]
    # Not before its deadline, and long before the reply could exist (ordering, not speed).
    assert 200 <= slow["ms"] < 1500
    assert late["outputs"]["x"]["values"] == [7]
    assert again["outputs"]["x"]["values"] == [8]
    pong = php({"socket": server.socket, "calls": [{"op": "ping"}]})[0]["pong"]
    assert pong["connections_open"] == 1  # the driver above is gone; this one is open


def test_server_deadline_exceeded_is_a_timeout(server) -> None:
    # Another client keeps the model busy; this request's deadline passes in the queue.
    blocker = php_popen({"socket": server.socket, "timeout": 5, "calls": [
        {"op": "infer", "model": "sleep", "inputs": {"ms": {"dtype": "FP32", "values": [800.0]}},
         "print_now": True}]})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until the blocker's request is in the server
        pong = php({"socket": server.socket, "calls": [{"op": "ping"}]})[0]["pong"]
        if pong["requests_in_flight"] > 0:
            break
    (r,) = php({"socket": server.socket, "timeout": 0.3, "calls": [
        {"op": "infer", "model": "sleep", "inputs": {"ms": {"dtype": "FP32", "values": [1.0]}}}]})
    # The server's deadline and the client's are the same instant: whichever side notices first
    # says so, and the exception tells which one it was.
    assert (r["error"], r["deadline"]) in {("TimeoutException", "client"),
                                           ("DeadlineExceededException", "server")}, r
    blocker.communicate(timeout=30)


def test_server_killed_mid_request_then_restarted(make_server, tmp_path: Path) -> None:
    server = make_server()
    go = tmp_path / "restarted"
    p = php_popen({"socket": server.socket, "persistent": True, "timeout": 5, "calls": [
        {"op": "ping"},
        {"op": "infer", "model": "sleep", "inputs": {"ms": {"dtype": "FP32", "values": [3000.0]}},
         "print_now": True},
        {"op": "wait_file", "path": str(go)},
        {"op": "infer", "model": "echo", "inputs": {"x": {"dtype": "UINT8", "values": [9]}}}]})
    deadline = time.monotonic() + 10
    while server.memfds() == 0 and time.monotonic() < deadline:
        time.sleep(0.02)  # until the PHP client has attached its region
    time.sleep(0.2)
    server.kill()
    assert p.stderr is not None
    first = json.loads(p.stderr.readline())
    assert first["error"] == "ConnectionException", first
    # Raised by the death itself: before both the 5 s deadline and the 3 s model could end.
    assert first["ms"] < 3000
    make_server()
    go.touch()
    out, _ = p.communicate(timeout=30)
    results = json.loads(out)
    assert results[3]["outputs"]["x"]["values"] == [9]


def test_php_killed_mid_request_region_is_freed(server) -> None:
    before = server.fds()
    p = php_popen({"socket": server.socket, "timeout": 5, "calls": [
        {"op": "infer", "model": "sleep", "inputs": {"ms": {"dtype": "FP32", "values": [500.0]}}}]})
    deadline = time.monotonic() + 10
    while server.memfds() == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.memfds() > 0
    p.kill()
    p.communicate()
    _settle(server, before)
    (r,) = php({"socket": server.socket, "calls": [{"op": "ping"}]})
    assert r["pong"]["connections_open"] == 1


def test_garbage_from_another_client_does_not_disturb_php(server) -> None:
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(server.socket)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
    s.settimeout(5)
    assert s.recv(24)[:4] == b"TBR1"  # an ERROR frame, then the server hangs up
    s.close()
    (r,) = php({"socket": server.socket, "calls": [{"op": "ping"}]})
    assert r["pong"]["protocol"] == 1


def test_last_timing_reports_server_compute_time(server) -> None:
    (r,) = php({"socket": server.socket, "calls": [
        {"op": "infer", "model": "sleep", "inputs": {"ms": {"dtype": "FP32", "values": [30.0]}}}]})
    assert r["timing"]["compute_us"] >= 30_000  # the model slept 30 ms
    assert r["timing"]["queue_us"] >= 0
