"""The server through the Python reference client and raw frames: zero copy, errors,
deadlines, pipelining, garbage, and cleanup of regions."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

import tensorbridge as tb
from tensorbridge._spec import BY_NAME, FrameType
from tensorbridge._wire import (
    InferRequest,
    TensorDesc,
    decode_error,
    decode_header,
    decode_infer_ok,
    encode_attach,
    encode_frame,
    encode_infer,
)

from conftest import VECTORS, raw_connect


class _Pointer(torch.nn.Module):
    """Records where its input lives, to compare with the connection's region."""

    tensorbridge_signature = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
                              "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}]}
    seen: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((x.data_ptr(), x.numel() * 4))
        return x * 2


@pytest.fixture(params=["c", "python"])
def inproc(tmp_path, request):
    """A Server running in this process, so tests can look at its connections; each test runs
    against the compiled loop and the Python one."""
    models = [tb.load_model(tb.ModelConfig("pointer", f"{__name__}:_Pointer", warmup=0)),
              tb.load_model(tb.ModelConfig("echo", "tensorbridge.models.testing:echo")),
              tb.load_model(tb.ModelConfig("sleep", "tensorbridge.models.testing:sleep",
                                           max_queue=1))]
    config = tb.ServerConfig(socket=str(tmp_path / "in.sock"), region_cap=64 << 20,
                             loop=request.param)
    server = tb.Server(config, models)
    server.start()
    yield server
    server.stop()


def test_inputs_are_views_of_the_region_not_copies(inproc) -> None:
    _Pointer.seen.clear()
    with tb.Client(inproc.config.socket) as client:
        x = torch.arange(100_000, dtype=torch.float32)
        out = client.infer("pointer", {"x": x})
        assert torch.equal(out["y"], x * 2)
        (conn,) = inproc.connections
        region = conn.region
        ptr, nbytes = _Pointer.seen[-1]
        assert region.address <= ptr and ptr + nbytes <= region.address + region.size


def test_region_is_released_when_the_client_goes(inproc) -> None:
    client = tb.Client(inproc.config.socket)
    client.infer("echo", {"a": torch.ones(10)})
    assert len(inproc.connections) == 1
    client.close()
    deadline = time.monotonic() + 5
    while inproc.connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not inproc.connections


def _raw(server_socket: str) -> socket.socket:
    return raw_connect(server_socket)


def _read_frame(s: socket.socket) -> tuple:
    head = b""
    while len(head) < 24:
        chunk = s.recv(24 - len(head))
        if not chunk:
            return None, None
        head += chunk
    h = decode_header(head)
    body = b""
    while len(body) < h.body_len:
        body += s.recv(h.body_len - len(body))
    return h, body


@pytest.mark.parametrize("vec", [v for v in VECTORS["invalid"] if v["stage"] == "header"],
                         ids=lambda v: v["name"])
def test_garbage_header_gets_protocol_error_and_server_keeps_serving(inproc, vec) -> None:
    s = _raw(inproc.config.socket)
    s.sendall(bytes.fromhex(vec["hex"]))
    h, body = _read_frame(s)
    assert h.type == FrameType.ERROR and decode_error(body)[0] == 7
    assert _read_frame(s) == (None, None)  # framing lost: the server hangs up
    s.close()
    with tb.Client(inproc.config.socket) as c:
        assert c.ping()["protocol"] == 1


@pytest.mark.parametrize("vec", [v for v in VECTORS["invalid"] if v["stage"] == "body"],
                         ids=lambda v: v["name"])
def test_bad_body_gets_protocol_error_and_connection_stays(inproc, vec) -> None:
    s = _raw(inproc.config.socket)
    s.sendall(bytes.fromhex(vec["hex"]))
    h, body = _read_frame(s)
    assert h.type == FrameType.ERROR and decode_error(body)[0] == 7, decode_error(body)
    s.sendall(encode_frame(FrameType.PING, 99))
    h, _ = _read_frame(s)
    assert h.type == FrameType.PONG and h.request_id == 99
    s.close()


def _infer_frame(rid: int, model: str, values: list[float], timeout_us: int = 0) -> bytes:
    data = torch.tensor(values, dtype=torch.float32).numpy().tobytes()
    desc = TensorDesc("ms" if model == "sleep" else "x", BY_NAME["FP32"], (len(values),), 1, 0,
                      len(data))
    return encode_frame(FrameType.INFER, rid, encode_infer(
        InferRequest(timeout_us, model, 0, 0, [desc], data)))


def test_pipelined_requests_are_answered_in_order(inproc) -> None:
    s = _raw(inproc.config.socket)
    s.sendall(b"".join(_infer_frame(100 + i, "echo", [float(i)] * (i + 1)) for i in range(20)))
    for i in range(20):
        h, body = _read_frame(s)
        assert h.request_id == 100 + i and h.type == FrameType.INFER_OK
        reply = decode_infer_ok(body)
        (out,) = reply.outputs
        assert out.shape == (i + 1,) and out.location == 1  # no region: inline
        got = torch.frombuffer(bytearray(reply.inline), dtype=torch.float32)
        assert got.tolist() == [float(i)] * (i + 1)
    s.close()


def test_expired_request_is_not_computed(inproc) -> None:
    s = _raw(inproc.config.socket)
    # The first request occupies the model for 1.5 s; the second's 50 ms deadline passes
    # while it waits, so it must come back DEADLINE_EXCEEDED without running, and before
    # the sleeper is done (answered at its deadline, not when the model frees up).
    import select

    s.sendall(_infer_frame(1, "sleep", [1500.0]))
    time.sleep(0.05)
    other = _raw(inproc.config.socket)
    other.sendall(_infer_frame(2, "sleep", [1.0], timeout_us=50_000))
    h, body = _read_frame(other)
    assert h.type == FrameType.ERROR and decode_error(body)[0] == 4
    assert select.select([s], [], [], 0)[0] == []  # the sleeper has not answered yet
    h, _ = _read_frame(s)
    assert h.type == FrameType.INFER_OK
    s.close()
    other.close()


def test_full_queue_is_overloaded_at_once(inproc) -> None:
    socks = [_raw(inproc.config.socket) for _ in range(3)]
    socks[0].sendall(_infer_frame(1, "sleep", [400.0]))
    time.sleep(0.05)
    socks[1].sendall(_infer_frame(2, "sleep", [1.0]))  # waits (max_queue=1)
    time.sleep(0.05)
    socks[2].sendall(_infer_frame(3, "sleep", [1.0]))  # finds the queue full
    h, body = _read_frame(socks[2])
    assert h.type == FrameType.ERROR and decode_error(body)[0] == 5
    assert "max_queue" in decode_error(body)[1]
    for s in socks[:2]:
        assert _read_frame(s)[0].type == FrameType.INFER_OK
        s.close()
    socks[2].close()


def test_region_grows_on_demand_up_to_the_cap(inproc) -> None:
    with tb.Client(inproc.config.socket) as c:
        big = torch.rand(4 << 20)  # 16 MiB, beyond the 1 MiB initial region
        assert torch.equal(c.infer("echo", {"a": big})["a"], big)
        with pytest.raises(tb.PayloadTooLargeError, match="cap"):
            c.infer("echo", {"a": torch.zeros(20 << 20)})  # 80 MiB > 64 MiB cap
        assert c.ping()["server"] == "tensorbridge"


def test_attach_replaces_and_frees_old_region(inproc) -> None:
    s = _raw(inproc.config.socket)
    for size in (1 << 20, 8 << 20):
        s.sendall(encode_frame(FrameType.ATTACH, 5, encode_attach(0, size)))
        h, _ = _read_frame(s)
        assert h.type == FrameType.ATTACH_OK
        _, fds, _, _ = socket.recv_fds(s, 1, 1)
        assert len(fds) == 1
        import os
        assert os.fstat(fds[0]).st_size >= size
        os.close(fds[0])
    (conn,) = inproc.connections
    assert conn.region.size == 8 << 20
    s.close()


def test_model_errors_and_unknown_models_are_typed(inproc) -> None:
    with tb.Client(inproc.config.socket) as c:
        with pytest.raises(tb.ModelNotFoundError, match="loaded models"):
            c.infer("nope", {"x": torch.zeros(1)})
        with pytest.raises(tb.InvalidInputError, match="must be FP32"):
            c.infer("pointer", {"x": torch.zeros(3, dtype=torch.int64)})
        with pytest.raises(tb.InvalidInputError, match="shape"):
            c.infer("pointer", {"x": torch.zeros(3, 2)})
        with pytest.raises(tb.InvalidInputError, match="missing"):
            c.infer("pointer", {"z": torch.zeros(3)})
        assert c.infer("pointer", {"x": torch.ones(3)})["y"].tolist() == [2.0] * 3


def test_checksums_round_trip(inproc) -> None:
    with tb.Client(inproc.config.socket, checksums=True) as c:
        x = torch.rand(1000)
        assert torch.equal(c.infer("echo", {"x": x, "b": [b"abc"]})["x"], x)


def test_many_threads_share_one_server(inproc) -> None:
    errors: list[str] = []

    def work(k: int) -> None:
        with tb.Client(inproc.config.socket, timeout=10) as c:
            for i in range(50):
                x = torch.full((k + 1,), float(k * 1000 + i))
                if not torch.equal(c.infer("echo", {"x": x})["x"], x):
                    errors.append(f"{k}/{i}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_slow_model_does_not_stall_other_connections(inproc) -> None:
    import select

    slow = _raw(inproc.config.socket)
    slow.sendall(_infer_frame(1, "sleep", [1500.0]))
    time.sleep(0.05)
    with tb.Client(inproc.config.socket) as c:
        assert c.infer("echo", {"x": torch.ones(2)})["x"].tolist() == [1.0, 1.0]
        assert c.ping()["connections_open"] == 2
    # The other connection got its answers while the sleeper is still computing.
    assert select.select([slow], [], [], 0)[0] == []
    h, _ = _read_frame(slow)
    assert h.type == FrameType.INFER_OK
    slow.close()
