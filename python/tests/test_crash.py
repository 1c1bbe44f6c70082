"""Crash recovery with real processes: SIGKILL the server under waiting PHP clients and restart
it the way Supervisor does; SIGKILL PHP clients mid-request and count what the server keeps;
and a soak of PHP processes over mixed models and sizes, every answer checked.

`make test` runs small counts; `make soak` raises them through the environment:
TB_KILLS (server kills), TB_CLIENT_KILLS, TB_SOAK_PROCS x TB_SOAK_REQUESTS.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import tensorbridge as tb

from conftest import PHP_DIR, ServerProcess

KILLS = int(os.environ.get("TB_KILLS", "5"))
CLIENT_KILLS = int(os.environ.get("TB_CLIENT_KILLS", "20"))
SOAK_PROCS = int(os.environ.get("TB_SOAK_PROCS", "4"))
SOAK_REQUESTS = int(os.environ.get("TB_SOAK_REQUESTS", "300"))
WAIT = 60.0  # seconds before a wait counts as a hang (never reached when things work)
MODEL = {name: f"{name}=tensorbridge.models.testing:{name}"
         for name in ("echo", "sleep", "head", "fail")}
# Errors a call may see while its server is down: the one in flight gets a connection error
# (or its own deadline); later ones may also find the circuit breaker open.
OUTAGE_ERRORS = {"ConnectionException", "TimeoutException", "CircuitOpenException"}


class Driver:
    """A ``php/stress.php`` process; its per-call JSON lines are collected by a thread."""

    def __init__(self, **cfg: object) -> None:
        self.proc = subprocess.Popen(["php", str(PHP_DIR / "stress.php"), json.dumps(cfg)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[dict] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(json.loads(raw))
                self._cond.notify_all()
        with self._cond:
            self.lines.append({"eof": True})
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[dict], bool], start: int = 0) -> tuple[int, dict]:
        """The first line at or after index ``start`` that matches ``pred``."""
        end = time.monotonic() + WAIT
        with self._cond:
            while True:
                for i in range(start, len(self.lines)):
                    if self.lines[i].get("eof"):
                        raise AssertionError(f"driver ended early: {self.lines[-3:]} "
                                             f"{self.proc.stderr.read() if self.proc.stderr else ''}")
                    if pred(self.lines[i]):
                        return i, self.lines[i]
                start = len(self.lines)
                left = end - time.monotonic()
                assert left > 0, f"no matching line within {WAIT} s: {self.lines[-3:]}"
                self._cond.wait(left)

    def summary(self) -> dict:
        self.proc.wait(WAIT)
        _, line = self.wait_for(lambda e: bool(e.get("summary")))
        line["errors"] = dict(line["errors"] or {})
        return line

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(WAIT)


def _ping(socket: str) -> dict:
    with tb.Client(socket, timeout=5.0) as client:
        return client.ping()


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_server_sigkill_mid_request(tmp_path: Path, leak_check: None) -> None:
    """Kill -9 the server while PHP clients wait on it, restart it like Supervisor: each call
    in flight fails with a connection error before its deadline, and the same Client objects
    work again after the restart, with no step in between."""
    sock = str(tmp_path / "tb.sock")
    args = ["--model", MODEL["echo"], "--model", MODEL["sleep"], "--warmup", "0"]
    srv = ServerProcess(sock, args).start()
    stop = tmp_path / "stop"
    # Driver 0 is always inside a 400 ms model call; 1 and 2 send content-checked echoes.
    common = {"socket": sock, "count": 0, "stop_file": str(stop), "timeout": 3.0,
              "events": True, "sleep_ms": 400, "sizes": [64, 65536],
              "client": {"breakerCoolDown": 0.2}}
    drivers = [Driver(worker=0, mix={"sleep": 1}, **common),
               Driver(worker=1, mix={"echo": 3, "bytes": 1}, **common),
               Driver(worker=2, mix={"echo": 1, "bytes": 1}, **common)]
    in_flight_errors = []
    try:
        for _ in range(KILLS):
            # Every client has had a right answer from this server (after its restart).
            for d in drivers:
                d.wait_for(lambda e: e.get("r") == "ok", len(d.lines))
            slow = drivers[0]
            i, started = slow.wait_for(lambda e: e.get("phase") == "start", len(slow.lines))
            time.sleep(0.1)  # the request is now inside the model's 400 ms sleep
            srv.kill()
            n = started["i"]
            _, result = slow.wait_for(lambda e, n=n: e.get("i") == n and "r" in e, i)
            in_flight_errors.append(result["r"])
            srv = ServerProcess(sock, args).start()  # what Supervisor / systemd do
        for d in drivers:
            d.wait_for(lambda e: e.get("r") == "ok", len(d.lines))
    finally:
        stop.touch()
        summaries = [d.summary() for d in drivers]
        srv.stop()
    # The call under each kill failed as a lost connection (it was answered before its 3 s
    # deadline would have raised TimeoutException).
    assert in_flight_errors == ["ConnectionException"] * KILLS
    for d, s in zip(drivers, summaries, strict=True):
        assert s["bad"] == 0, s
        assert set(s["errors"]) <= OUTAGE_ERRORS, s
        starts = [e["i"] for e in d.lines if e.get("phase") == "start"]
        ends = [e["i"] for e in d.lines if "r" in e]
        assert starts == ends  # no call hung or vanished
    total = sum(s["calls"] for s in summaries)
    print(f"\nserver kills survived: {KILLS}; calls: {total}, ok: "
          f"{sum(s['ok'] for s in summaries)}, wrong answers: 0, errors during outages: "
          f"{sum(sum(s['errors'].values()) for s in summaries)}")


def test_client_sigkill_mid_request(make_server, leak_check: None) -> None:
    """Kill -9 PHP clients mid-request: the server frees each connection, region and
    descriptor, and its memory stays flat."""
    srv = make_server([MODEL["echo"], MODEL["sleep"]], ["--warmup", "0"])
    kinds = ["sleep", "bytes", "echo", "bytes"]

    def kill_one(n: int) -> None:
        kind = kinds[n % len(kinds)]
        d = Driver(socket=srv.socket, worker=n, count=0, timeout=5.0, events=True,
                   mix={kind: 1}, sleep_ms=300, sizes=[1 << 20, 4 << 20])
        # Kill during the second call: the region exists and a request is on its way.
        d.wait_for(lambda e: e.get("phase") == "start" and e["i"] == 1)
        if kind == "sleep":
            time.sleep(0.05)  # inside the model
        d.kill()

    def shape(fds: list[str]) -> tuple[int, list[str]]:
        """Sockets get new inode numbers: compare those by count, the rest by name."""
        return (sum(f.startswith("socket:") for f in fds),
                [f for f in fds if not f.startswith("socket:")])

    def settled(probe: tb.Client, want: tuple[int, list[str]] | None) -> tuple[int, ...]:
        """Wait (bounded) until the server has closed every dead client's connection."""
        end = time.monotonic() + WAIT
        while True:
            status = probe.ping()
            fds = shape(srv.fds())
            done = status["connections_open"] == 1 and (want is None or fds == want)
            if done or time.monotonic() > end:  # 1: the probe itself
                return status["connections_open"], fds, srv.memfds()
            time.sleep(0.05)

    with tb.Client(srv.socket, timeout=5.0) as probe:
        for n in range(4):  # warm-up: every kind once, so that lazy allocations are done
            kill_one(n)
        open_before, fds_before, memfds_before = settled(probe, None)
        rss_before = _rss(srv.pid)
        for n in range(CLIENT_KILLS):
            kill_one(n)
        open_after, fds_after, memfds_after = settled(probe, fds_before)
        rss_after = _rss(srv.pid)
    assert open_before == open_after == 1
    assert fds_after == fds_before
    assert memfds_before == memfds_after == 0
    # Memory: 4 MiB regions came and went CLIENT_KILLS times; allow allocator slack only.
    assert rss_after - rss_before < 64 << 20, (rss_before, rss_after)
    assert srv.proc is not None and srv.proc.poll() is None
    with tb.Client(srv.socket) as client:  # and it still serves
        assert client.infer("echo", {"x": [7]})["x"].tolist() == [7]
    print(f"\nclient kills: {CLIENT_KILLS}; leaks: connections {open_after - open_before}, "
          f"fds {fds_after[0] - fds_before[0]}, memfds {memfds_after}; server RSS "
          f"{rss_before >> 20} -> {rss_after >> 20} MiB")


def test_soak_mixed_models(make_server, leak_check: None) -> None:
    """PHP processes x requests over echo (int32, bytes, float64), head (602 KB in), sleep and
    fail, every answer compared with what was sent: no wrong answer, no error."""
    srv = make_server([MODEL["echo"], MODEL["head"], MODEL["sleep"], MODEL["fail"]])
    mix = {"echo": 6, "bytes": 3, "f64": 3, "head": 1, "sleep": 1, "fail": 1}
    started = time.monotonic()
    drivers = [Driver(socket=srv.socket, worker=w, count=SOAK_REQUESTS, timeout=20.0, mix=mix,
                      sleep_ms=1, sizes=[16, 4096, 65536, 1 << 20], seed=1000 + w)
               for w in range(SOAK_PROCS)]
    summaries = [d.summary() for d in drivers]
    elapsed = time.monotonic() - started
    for s in summaries:
        assert (s["calls"], s["ok"], s["bad"], s["errors"]) == (SOAK_REQUESTS, SOAK_REQUESTS,
                                                                0, {}), s
    status = _ping(srv.socket)
    assert status["connections_open"] == 1 and srv.memfds() == 0
    total = SOAK_PROCS * SOAK_REQUESTS
    print(f"\nsoak: {SOAK_PROCS} PHP processes x {SOAK_REQUESTS} requests = {total}, "
          f"wrong answers 0, errors 0, {total / elapsed:.0f} req/s")


@pytest.mark.parametrize("signum", [signal.SIGTERM])
def test_restart_after_sigterm_and_stale_socket(tmp_path: Path, signum: int) -> None:
    """A stopped server leaves no socket file; a killed one leaves one that the next start
    replaces (Supervisor restarts it with no manual step)."""
    sock = str(tmp_path / "tb.sock")
    args = ["--model", MODEL["echo"], "--warmup", "0"]
    srv = ServerProcess(sock, args).start()
    srv.kill()
    assert os.path.exists(sock)  # stale
    srv = ServerProcess(sock, args).start()
    assert _ping(sock)["pid"] == srv.pid
    assert srv.proc is not None
    srv.proc.send_signal(signum)
    assert srv.proc.wait(WAIT) == 0
    assert not os.path.exists(sock)


def test_peer_gone_before_its_reply_is_closed(make_server, leak_check: None) -> None:
    """A client that sends a request and dies at once (PHP-FPM's request timeout, kill -9)
    leaves nothing behind, even when the server's reply finds the socket already closed."""
    import socket as sockets

    from tensorbridge._spec import FrameType
    from tensorbridge._wire import encode_attach, encode_frame

    srv = make_server([MODEL["echo"]], ["--warmup", "0"])
    frames = [encode_frame(FrameType.PING, 1),
              encode_frame(FrameType.ATTACH, 2, encode_attach(0, 1 << 20))]
    with tb.Client(srv.socket, timeout=5.0) as probe:
        accepted = probe.ping()["connections_accepted"]
        before = probe.ping()["connections_open"], srv.memfds()
        for n in range(40):
            with sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM) as s:
                s.connect(srv.socket)
                s.sendall(frames[n % 2])

        def settled() -> bool:  # all 40 accepted (a loaded server may not be there yet), then closed
            ping = probe.ping()
            return ping["connections_accepted"] >= accepted + 40 and ping["connections_open"] <= 1

        end = time.monotonic() + 10  # closing takes milliseconds; this bounds a failing run
        while not settled() and time.monotonic() < end:
            time.sleep(0.05)
        after = probe.ping()["connections_open"], srv.memfds()
    assert before == (1, 0)
    assert after == before, "connections whose reply failed were never closed"
