"""Dynamic batching, model instances, the watchdog and draining, against real servers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import tensorbridge as tb
from tensorbridge._request import Request
from tensorbridge._scheduler import ModelQueue
from tensorbridge._spec import BY_NAME, FrameType
from tensorbridge._wire import (
    InferRequest,
    TensorDesc,
    decode_error,
    decode_header,
    decode_infer_ok,
    encode_frame,
    encode_infer,
)

from conftest import PHP_DIR, raw_connect, wait_until

ROWS = "tensorbridge.models.testing:rows"


class _Recorder(nn.Module):
    """``y = x + 1`` for ``x`` [-1, -1]; records the shape of every call and its time span."""

    tensorbridge_signature = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, -1]}]}
    calls: list[tuple[tuple[int, ...], float, float, str]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = time.monotonic()
        ms = float(x[0, 0]) if x.shape[1] and x[0, 0] >= 1000 else 0.0
        time.sleep(0.02 + (ms - 1000) / 1000 if ms else 0.02)
        self.calls.append((tuple(x.shape), start, time.monotonic(),
                           threading.current_thread().name))
        return x + 1


def _model(name: str, **config) -> tb.LoadedModel:
    return tb.load_model(tb.ModelConfig(name, f"{__name__}:_Recorder", warmup=0, **config))


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(*models: tb.LoadedModel) -> tb.Server:
        server = tb.Server(tb.ServerConfig(socket=str(tmp_path / f"b{len(servers)}.sock")),
                           models)
        server.start()
        servers.append(server)
        return server

    _Recorder.calls.clear()
    yield start
    for server in servers:
        server.stop()


def _frame(rid: int, model: str, x: torch.Tensor, timeout_us: int = 0) -> bytes:
    data = x.numpy().tobytes()
    desc = TensorDesc("x", BY_NAME["FP32"], tuple(x.shape), 1, 0, len(data))
    return encode_frame(FrameType.INFER, rid, encode_infer(
        InferRequest(timeout_us, model, 0, 0, [desc], data)))


def _read(s: socket.socket):
    head = b""
    while len(head) < 24:
        head += s.recv(24 - len(head))
    h = decode_header(head)
    body = b""
    while len(body) < h.body_len:
        body += s.recv(h.body_len - len(body))
    return h, body


def _raw(server: tb.Server) -> socket.socket:
    return raw_connect(server.config.socket, timeout=20)


def _concurrently(n: int, fn) -> list:
    results: list = [None] * n

    def run(i: int) -> None:
        try:
            results[i] = fn(i)
        except Exception as exc:  # collected and asserted by the caller
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


# -- splitting ------------------------------------------------------------------------------


def test_32_php_processes_each_get_their_own_rows(make_server, tmp_path, leak_check) -> None:
    config = tmp_path / "rows.toml"
    config.write_text(f'[models.rows]\nsource = "{ROWS}"\nmax_batch_size = 32\n'
                      'max_queue_delay_us = 2000\nmax_queue = 1024\n')
    srv = make_server(models=[], extra=["--config", str(config)])
    procs = [subprocess.Popen(["php", str(PHP_DIR / "batch_worker.php"), srv.socket, str(w),
                               "12"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for w in range(32)]
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, out + err
        reports.append(json.loads(out))
    assert sum(r["ok"] for r in reports) == 32 * 12, reports
    assert sum(r["bad"] for r in reports) == 0
    # With 32 callers and a 10 ms call, requests wait together and are merged.
    assert max(r["max_rows"] for r in reports) > 1


def test_pipelined_requests_of_one_connection_are_batched_and_answered_in_order(serve) -> None:
    server = serve(_model("rec", max_batch_size=64, max_queue_delay_us=50_000))
    s = _raw(server)
    xs = [torch.full((1 + i % 3, 2), float(i)) for i in range(12)]
    s.sendall(b"".join(_frame(100 + i, "rec", x) for i, x in enumerate(xs)))
    for i, x in enumerate(xs):
        h, body = _read(s)
        assert h.type == FrameType.INFER_OK and h.request_id == 100 + i
        reply = decode_infer_ok(body)
        (desc,) = reply.outputs
        y = torch.frombuffer(bytearray(reply.inline[desc.offset:desc.offset + desc.nbytes]),
                             dtype=torch.float32).view(desc.shape)
        assert torch.equal(y, x + 1)
        assert reply.batch_size >= x.shape[0]
    assert max(shape[0] for shape, *_ in _Recorder.calls) > 3  # rows of several requests


def test_inputs_whose_other_dims_differ_are_never_merged(serve) -> None:
    server = serve(_model("rec", max_batch_size=64, max_queue_delay_us=20_000))

    def call(i: int) -> bool:
        x = torch.full((1, 3 if i % 2 else 5), float(i))
        with tb.Client(server.config.socket, timeout=20) as c:
            return torch.equal(c.infer("rec", {"x": x})["y"], x + 1)

    assert _concurrently(16, call) == [True] * 16
    widths = {shape[1] for shape, *_ in _Recorder.calls}
    assert widths == {3, 5}
    assert sum(shape[0] for shape, *_ in _Recorder.calls) == 16


def test_a_failing_row_fails_only_its_own_request(make_server, tmp_path) -> None:
    config = tmp_path / "rows.toml"
    config.write_text(f'[models.rows]\nsource = "{ROWS}"\nmax_batch_size = 16\n'
                      'max_queue_delay_us = 30000\n')
    srv = make_server(models=[], extra=["--config", str(config)])

    def call(i: int) -> str:
        x = torch.full((1, 4), -1.0 if i == 3 else float(i))
        with tb.Client(srv.socket, timeout=20) as c:
            try:
                y = c.infer("rows", {"x": x})["y"]
            except tb.ModelError as exc:
                return f"error: {exc}"
            return "ok" if torch.equal(y, x * 2 + 1) else "wrong"

    results = _concurrently(8, call)
    assert results[3].startswith("error: model 'rows' raised ValueError")
    assert [r for i, r in enumerate(results) if i != 3] == ["ok"] * 7


class _WithScalar(nn.Module):
    """Batchable input, but one output has no batch dim: a merged call cannot be split."""

    tensorbridge_signature = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]},
                    {"name": "total", "datatype": "FP32", "shape": []}]}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(0.02)
        return x + 1, x.sum()


def test_a_merged_call_that_cannot_be_split_is_rerun_request_by_request(serve) -> None:
    server = serve(tb.load_model(tb.ModelConfig(
        "scalar", f"{__name__}:_WithScalar", warmup=0, max_batch_size=8,
        max_queue_delay_us=30_000)))

    def call(i: int) -> bool:
        x = torch.full((1, 2), float(i))
        with tb.Client(server.config.socket, timeout=20) as c:
            out = c.infer("scalar", {"x": x})
        return torch.equal(out["y"], x + 1) and float(out["total"]) == 2.0 * i

    assert _concurrently(4, call) == [True] * 4  # every caller answered, with its own total


# -- queue: deadlines, overload, policies -----------------------------------------------------


def test_a_deadline_shorter_than_the_batching_delay_still_runs_on_an_idle_model(serve) -> None:
    server = serve(_model("rec", max_batch_size=8, max_queue_delay_us=2_000_000))
    s = _raw(server)
    s.sendall(_frame(1, "rec", torch.full((1, 2), 3.0), timeout_us=300_000))
    h, body = _read(s)
    assert h.type == FrameType.INFER_OK  # it did not wait 2 s for company and expire
    assert [shape for shape, *_ in _Recorder.calls] == [(1, 2)]


def test_drain_with_no_timeout_still_stops(serve) -> None:
    server = serve(_model("rec"))
    assert server.drain(0) is True
    assert not os.path.exists(server.config.socket)


def test_a_request_that_expires_in_the_batch_queue_is_not_computed(serve) -> None:
    server = serve(_model("rec", max_batch_size=8))
    busy = _raw(server)
    busy.sendall(_frame(1, "rec", torch.full((1, 1), 1500.0)))  # holds the model 0.5 s
    wait_until(lambda: server.queue("rec").pending(), "the busy request is queued")
    s = _raw(server)
    s.sendall(_frame(2, "rec", torch.full((1, 7), 7.0), timeout_us=50_000))
    h, body = _read(s)
    assert h.type == FrameType.ERROR and decode_error(body)[0] == 4  # DEADLINE_EXCEEDED
    assert len(_Recorder.calls) == 0  # answered while the 0.5 s call still runs
    h, _ = _read(busy)
    assert h.type == FrameType.INFER_OK
    assert all(shape[1] != 7 for shape, *_ in _Recorder.calls)  # never computed


def test_a_full_queue_answers_overloaded_at_once(serve) -> None:
    server = serve(_model("rec", max_batch_size=8, max_queue=2))
    busy = _raw(server)
    busy.sendall(_frame(1, "rec", torch.full((1, 1), 1500.0)))
    wait_until(lambda: server.queue("rec").pending(), "the busy request is queued")
    waiting = [_raw(server) for _ in range(2)]
    for i, s in enumerate(waiting):
        s.sendall(_frame(10 + i, "rec", torch.zeros(1, 2)))
    wait_until(lambda: server.queue("rec").pending() >= 3, "three requests are queued")
    extra = _raw(server)
    extra.sendall(_frame(99, "rec", torch.zeros(1, 2)))
    h, body = _read(extra)
    assert h.type == FrameType.ERROR and decode_error(body)[0] == 5  # OVERLOADED
    assert len(_Recorder.calls) == 0  # refused before the busy call ended
    for s in [busy, *waiting]:
        assert _read(s)[0].type == FrameType.INFER_OK


class _NoReply:
    """The connection of a request that the test drives by hand: nobody to answer."""

    def answer(self, request: Request) -> None:
        pass


def _take(queue: ModelQueue, now: float) -> tuple[list, float | None]:
    with queue._cv:  # as the instance threads call it
        return queue._take(now)


def _jobs(queue: ModelQueue, n: int, rows: int = 1) -> None:
    for _ in range(n):
        frame = InferRequest(0, queue.model.name, 0, 0, [])
        queue._jobs.append(Request(frame, 0, 0, _NoReply(), queue.model, {}, time.monotonic(),
                                   None, rows=rows, key=("k",)))


def test_queue_depth_policy_takes_half_the_queue_above_50() -> None:
    queue = ModelQueue(_model("q", batch_policy="queue_depth"))
    queue.stop()  # no workers: the test drives _take itself
    for depth, want in [(10, 1), (50, 1), (51, 25), (60, 30), (200, 32), (9, 1)]:
        queue._jobs.clear()
        _jobs(queue, depth)
        batch, _ = _take(queue, time.monotonic())
        assert len(batch) == want, depth
        assert len(queue._jobs) == depth - want


def test_delay_policy_waits_then_prefers_the_configured_sizes() -> None:
    queue = ModelQueue(_model("q", max_batch_size=16, max_queue_delay_us=1_000_000,
                              preferred_batch_sizes=[4, 8]))
    queue.stop()
    _jobs(queue, 5)
    batch, wait = _take(queue, time.monotonic())
    assert batch == [] and 0 < wait <= 1.0  # too few for 8, the delay has not passed
    _jobs(queue, 4)  # 9 waiting: the largest preferred size is reached
    batch, _ = _take(queue, time.monotonic())
    assert len(batch) == 8
    _jobs(queue, 5)  # 6 waiting, delay over: the largest preferred size that fits
    batch, _ = _take(queue, time.monotonic() + 2)
    assert len(batch) == 4
    batch, _ = _take(queue, time.monotonic() + 2)  # 2 left, delay over: what there is
    assert len(batch) == 2
    _jobs(queue, 1, rows=40)  # a request larger than max_batch_size still runs, alone
    batch, _ = _take(queue, time.monotonic() + 2)
    assert len(batch) == 1


def test_idle_instances_share_the_waiting_requests() -> None:
    queue = ModelQueue(_model("q", max_batch_size=16, instances=2))
    queue.stop()
    _jobs(queue, 5)
    batch, _ = _take(queue, time.monotonic())
    assert len(batch) == 3  # two idle instances: 3 + 2 rather than 5 on one core
    queue._instances[1].busy_since = time.monotonic()  # the other one is busy now
    _jobs(queue, 2)
    batch, _ = _take(queue, time.monotonic())
    assert len(batch) == 4  # all that waits


def test_batching_is_off_for_models_without_a_batch_dim(serve) -> None:
    sleep = tb.load_model(tb.ModelConfig("sleep", "tensorbridge.models.testing:sleep",
                                         max_batch_size=8))
    server = serve(sleep, _model("rec", max_batch_size=8), _model("off"))
    assert not server.queue("sleep").batching  # its input is [1]: no dim to stack on
    assert server.queue("rec").batching
    assert not server.queue("off").batching  # max_batch_size 1 (the default)


# -- instances and the watchdog ---------------------------------------------------------------


def test_two_instances_run_two_requests_at_the_same_time(serve) -> None:
    server = serve(_model("rec", instances=2))

    def call(i: int) -> bool:
        x = torch.full((1, 1), 1200.0 + i)  # 200 ms each
        with tb.Client(server.config.socket, timeout=20) as c:
            return torch.equal(c.infer("rec", {"x": x})["y"], x + 1)

    assert _concurrently(2, call) == [True, True]
    (_, s1, e1, t1), (_, s2, e2, t2) = sorted(_Recorder.calls, key=lambda c: c[1])
    assert s2 < e1  # the second call started before the first ended: they overlapped
    assert t1 != t2


def test_watchdog_fails_a_stuck_call_and_replaces_its_instance(serve) -> None:
    server = serve(_model("rec", watchdog_timeout=0.3))
    stuck = _raw(server)
    stuck.sendall(_frame(1, "rec", torch.full((1, 1), 3000.0)))  # 2 s, past the watchdog
    h, body = _read(stuck)
    assert h.type == FrameType.ERROR
    code, message = decode_error(body)
    assert code == 6 and "watchdog_timeout" in message and "replaced" in message
    assert _Recorder.calls == []  # the stuck call has not returned yet
    # The replacement instance serves the next request while the old one is still stuck.
    with tb.Client(server.config.socket, timeout=20) as c:
        x = torch.ones(1, 2)
        assert torch.equal(c.infer("rec", {"x": x})["y"], x + 1)
    assert [shape for shape, *_ in _Recorder.calls] == [(1, 2)]
    queue = server.queue("rec")
    assert queue.replaced == 1 and queue.healthy_instances() == 1


# -- SIGTERM drains ---------------------------------------------------------------------------


def test_sigterm_finishes_in_flight_requests_then_exits_0(make_server) -> None:
    srv = make_server(models=["sleep=tensorbridge.models.testing:sleep"])
    result: dict = {}

    def call() -> None:
        with tb.Client(srv.socket, timeout=20) as c:
            result["ms"] = c.infer("sleep", {"ms": torch.tensor([800.0])})["ms"]

    t = threading.Thread(target=call)
    t.start()
    with tb.Client(srv.socket) as probe:
        wait_until(lambda: probe.ping()["requests_in_flight"] > 0 or not t.is_alive(),
                   "the request is in flight", every=0.01)
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(20) == 0
    t.join(20)
    assert result["ms"].tolist() == [800.0]  # answered, not cut off
    assert not os.path.exists(srv.socket)
    assert any("draining" in line for line in srv.log)


def test_restart_after_kill_clears_the_stale_socket(make_server) -> None:
    srv = make_server(models=["echo=tensorbridge.models.testing:echo"])
    srv.kill()
    assert Path(srv.socket).exists()  # a SIGKILLed server leaves its socket file
    again = make_server(models=["echo=tensorbridge.models.testing:echo"], socket=srv.socket)
    with tb.Client(again.socket) as c:
        assert c.ping()["pid"] == again.pid
