"""Resource exhaustion and self-healing, each fault applied while PHP callers run, each
followed by a check that service is back and that nothing leaked.

Faults: descriptors exhausted at a low limit, a connection flood past max_connections, one
uid over its quota while another is served, SIGSTOP/SIGCONT, peers that connect and never
speak, a log sink that stops reading, an event loop that hangs (systemd's notify protocol, and
the Supervisor watchdog that restarts it).

Measured, never asserted (timings depend on the machine): the callers' errors by kind, the
server's CPU seconds and log lines while the fault lasts, the time from the fault's end to the
first successful call. They are printed and, with ``TB_FAULT_REPORT=FILE``, written as the
markdown table of docs/operations.md. ``TB_FAULTS_LONG=1`` (``make soak``) holds each fault
longer with more callers.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import tensorbridge as tb

from conftest import PHP_DIR, ServerProcess, php

LONG = os.environ.get("TB_FAULTS_LONG") == "1"
#: The second user of the quota test (its own: test_access's may be created and removed
#: by a parallel worker meanwhile).
USER = "tbtest-quota"
#: How long each fault is held, and how many PHP callers run through it.
HOLD = 10.0 if LONG else 1.0
CALLERS = 6 if LONG else 2
ECHO = ["echo=tensorbridge.models.testing:echo"]
_ROWS: list[dict[str, object]] = []


def _wait(what: str, check: Callable[[], bool], limit: float = 30.0) -> float:
    """Wait (bounded) until ``check()`` holds; return how long it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > limit:
            raise AssertionError(f"not within {limit} s: {what}")
        time.sleep(0.01)
    return time.monotonic() - start


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Callers:
    """PHP processes (python/tests/php/stress.php) calling ``echo`` until stopped."""

    def __init__(self, socket_path: str, workdir: Path, n: int = CALLERS,
                 client: dict[str, object] | None = None, timeout: float = 2.0,
                 user: tuple[int, int] | None = None) -> None:
        self.stop_file = workdir / "stop-callers"
        self.procs = []
        for worker in range(n):
            cfg = {"socket": socket_path, "worker": worker + 1, "count": 0,
                   "stop_file": str(self.stop_file), "timeout": timeout, "error_pause_ms": 20,
                   "mix": {"echo": 1}, "client": {"breakerStateDir": str(workdir / "breaker"),
                                                  **(client or {})}}
            extra = ({"user": user[0], "group": user[1], "extra_groups": [],
                      "env": {"PATH": os.environ["PATH"], "HOME": "/tmp"}, "cwd": "/tmp"}
                     if user else {})
            self.procs.append(subprocess.Popen(
                ["php", str(PHP_DIR / "stress.php"), json.dumps(cfg)], stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, **extra))  # type: ignore[call-overload]

    def abort(self) -> None:
        """Kill the callers that still run and close their pipes (a failing test's cleanup,
        so no process or pipe is left for the garbage collector to warn about later)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()

    def stop(self) -> dict[str, object]:
        """Stop every caller; their summaries added up (calls, ok, bad, errors by kind)."""
        self.stop_file.touch()
        total: dict[str, object] = {"calls": 0, "ok": 0, "bad": 0}
        errors: Counter[str] = Counter()
        examples: list[str] = []
        for proc in self.procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, out + err
            summary = json.loads(out.strip().splitlines()[-1])
            for key in ("calls", "ok", "bad"):
                total[key] = int(total[key]) + summary[key]  # type: ignore[call-overload]
            errors.update(summary["errors"])
            examples += summary["error_examples"][:2]
        total["errors"] = dict(errors)
        total["examples"] = examples
        return total


@dataclass
class Measure:
    """CPU and log volume of a server while a fault lasts, and the recovery after it."""

    name: str
    server: ServerProcess
    cpu0: float = 0.0
    log0: int = 0
    t0: float = 0.0
    row: dict[str, object] = field(default_factory=dict)

    def start(self) -> Measure:
        # The same span before the fault, callers running: what the fault's CPU compares to.
        cpu = cpu_seconds(self.server.pid)
        time.sleep(HOLD)
        self.row["baseline_cpu_s"] = round(cpu_seconds(self.server.pid) - cpu, 2)
        self.cpu0, self.log0 = cpu_seconds(self.server.pid), len(self.server.log)
        self.t0 = time.monotonic()
        return self

    def fault_over(self) -> None:
        lines = self.server.log[self.log0:]
        self.row.update(fault=self.name, held_s=round(time.monotonic() - self.t0, 1),
                        server_cpu_s=round(cpu_seconds(self.server.pid) - self.cpu0, 2),
                        log_lines=len(lines), log_bytes=sum(len(x) for x in lines))

    def done(self, callers: dict[str, object], recovery_s: float | None,
             leaks: int = 0) -> None:
        self.row.update(caller_calls=callers["calls"], caller_errors=callers["errors"],
                        recovery_s=None if recovery_s is None else round(recovery_s, 3),
                        leaks=leaks)
        _ROWS.append(self.row)
        print(f"\nFAULT {json.dumps(self.row)}")


def first_success(socket_path: str, limit: float = 60.0) -> float:
    """Seconds until a real INFER through a new connection succeeds."""
    def ok() -> bool:
        try:
            with tb.Client(socket_path, timeout=0.5) as client:
                return client.infer("echo", {"x": [7]})["x"].tolist() == [7]
        except tb.TensorBridgeError:
            return False
    return _wait(f"a call to {socket_path} succeeds", ok, limit)


def flood(socket_path: str, n: int) -> list[socket.socket]:
    """``n`` connections that never send anything (refused ones included)."""
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(socket_path)
        except BlockingIOError:
            pass  # the backlog is full: it waits
        except OSError:
            s.close()
            continue
        socks.append(s)
    return socks


def _settled(server: ServerProcess, fds: int) -> int:
    """Wait until the server holds ``fds`` descriptors again; return how many it leaks."""
    try:
        _wait("the server's descriptors back to the baseline",
              lambda: fd_count(server.pid) <= fds, 30)
    except AssertionError:
        pass
    return max(0, fd_count(server.pid) - fds)


def _fault_setup(make_server, workdir: Path, extra: list[str],
                 name: str) -> tuple[ServerProcess, int, Callers, Measure]:
    """A server with ``extra`` flags and PHP callers connected to it, measured from now."""
    server = make_server(ECHO, ["--warmup", "0", *extra])
    base = _baseline(server)
    callers = Callers(server.socket, workdir)
    _callers_connected(server.socket)
    return server, base, callers, Measure(name, server).start()


def _end_fault(m: Measure, socks: list[socket.socket], callers: Callers,
               base: int) -> dict[str, object]:
    """The fault ends (its connections close): time to the first success, the callers'
    totals, leaks; every answer the callers got was right and nothing leaked."""
    m.fault_over()
    for s in socks:
        s.close()
    recovery = first_success(m.server.socket)
    totals = callers.stop()
    leaks = _settled(m.server, base)
    m.done(totals, recovery, leaks)
    assert totals["bad"] == 0 and int(totals["ok"]) > 0 and leaks == 0, (totals, leaks)  # type: ignore[call-overload]
    return totals


def _php_error(sock: str, workdir: Path) -> dict[str, str]:
    (result,) = php({"socket": sock, "timeout": 2.0, "breaker_state_dir": str(workdir / "b2"),
                     "calls": [{"op": "infer", "model": "echo",
                                "inputs": {"x": {"array": [1]}}}]})
    return result


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    path = os.environ.get("TB_FAULT_REPORT")
    if path and _ROWS:
        Path(path).write_text(json.dumps(_ROWS, indent=1))


def _open_connections(sock: str) -> int:
    """Connections the server has open, besides the one asking."""
    try:
        with tb.Client(sock, timeout=2.0) as client:
            return int(client.ping()["connections_open"]) - 1
    except tb.TensorBridgeError:
        return -1


def _callers_connected(sock: str, n: int = CALLERS) -> None:
    _wait("the callers are connected", lambda: _open_connections(sock) >= n, 60)


def _baseline(server: ServerProcess) -> int:
    first_success(server.socket)
    return fd_count(server.pid)


def test_descriptors_exhausted_at_a_low_limit(make_server, tmp_path: Path,
                                              leak_check: None) -> None:
    server = make_server(ECHO, ["--warmup", "0"])
    base = _baseline(server)
    callers = Callers(server.socket, tmp_path)
    _callers_connected(server.socket)
    limit = fd_count(server.pid) + 40
    subprocess.run(["prlimit", f"--pid={server.pid}", f"--nofile={limit}:{limit}"], check=True)
    m = Measure("descriptors exhausted (prlimit, 300 idle connections)", server).start()
    socks = flood(server.socket, 300)
    # The server holds every descriptor it may, and no more than that.
    _wait("the server is at its descriptor limit", lambda: fd_count(server.pid) >= limit - 1)
    time.sleep(HOLD)  # the fault lasts: no busy loop, no log flood
    refused = _php_error(server.socket, tmp_path)  # a newcomer is told why at once
    totals = _end_fault(m, socks, callers, base)
    assert refused.get("error") == "OverloadedException", refused
    assert "out of file descriptors" in refused["message"]
    assert set(totals["errors"]) <= {"OverloadedException"}, totals  # type: ignore[arg-type]
    log = "".join(server.log)
    assert log.count("out of file descriptors") == 1, log[-3000:]  # once, not per accept
    _wait("the end of the episode is logged",  # by the first normal accept after it
          lambda: "accepting again" in "".join(server.log))


def test_connection_flood_past_max_connections(make_server, tmp_path: Path,
                                               leak_check: None) -> None:
    server, base, callers, m = _fault_setup(
        make_server, tmp_path, ["--max-connections", "20"],
        "connection flood past max_connections (20; 300 idle connections)")
    socks = flood(server.socket, 300)
    _wait("the flood fills max_connections", lambda: fd_count(server.pid) >= base + 17)
    time.sleep(HOLD)
    refused = _php_error(server.socket, tmp_path)
    totals = _end_fault(m, socks, callers, base)
    assert refused.get("error") == "OverloadedException", refused
    assert "max_connections" in refused["message"]
    assert totals["errors"] == {}, totals


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run callers as a second user")
@pytest.mark.xdist_group("users")  # useradd/userdel must not run in two workers at once
def test_one_uid_over_quota_while_another_is_served(make_server, leak_check: None) -> None:
    import pwd
    import shutil
    import tempfile

    try:
        entry = pwd.getpwnam(USER)
        created = False
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", USER], check=True)
        entry, created = pwd.getpwnam(USER), True
    workdir = Path(tempfile.mkdtemp(prefix="tb-quota-", dir="/tmp"))
    workdir.chmod(0o777)
    try:
        server = make_server(ECHO, ["--warmup", "0", "--max-connections-per-uid", "10",
                                    "--socket-mode", "666"], socket=str(workdir / "tb.sock"))
        base = _baseline(server)
        callers = Callers(server.socket, workdir, user=(entry.pw_uid, entry.pw_gid))
        _callers_connected(server.socket)
        m = Measure(f"uid 0 over max_connections_per_uid (10), uid {entry.pw_uid} served",
                    server).start()
        socks = flood(server.socket, 50)  # root's
        time.sleep(HOLD)
        refused = _php_error(server.socket, workdir)  # root again: over its quota
        totals = _end_fault(m, socks, callers, base)
        assert refused.get("error") == "OverloadedException", refused
        assert "max_connections_per_uid" in refused["message"] and "uid 0" in refused["message"]
        assert totals["errors"] == {}, totals  # the other uid never noticed
        server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if created:
            subprocess.run(["userdel", USER], check=False)


def test_sigstop_then_sigcont(make_server, tmp_path: Path, leak_check: None) -> None:
    server = make_server(ECHO, ["--warmup", "0"])
    base = _baseline(server)
    breaker = {"breakerThreshold": 2, "breakerCoolDown": 0.5}
    callers = Callers(server.socket, tmp_path, client=breaker, timeout=0.3)
    _callers_connected(server.socket)
    m = Measure("SIGSTOP, then SIGCONT", server).start()
    os.kill(server.pid, signal.SIGSTOP)
    try:
        time.sleep(max(HOLD, 2.0))  # callers time out within 0.3 s, then the breaker opens
        m.row["server_cpu_s"] = 0.0
    finally:
        os.kill(server.pid, signal.SIGCONT)
    m.fault_over()
    recovery = first_success(server.socket)
    # The PHP callers themselves come back once the breaker's cool-down has passed.
    (after,) = php({"socket": server.socket, "timeout": 2.0,
                    "breaker_state_dir": str(tmp_path / "b3"),
                    "calls": [{"op": "infer", "model": "echo", "inputs": {"x": {"array": [1]}}}]})
    totals = callers.stop()
    assert "outputs" in after, after
    errors = totals["errors"]
    assert errors.get("TimeoutException", 0) > 0, totals  # type: ignore[union-attr]
    assert errors.get("CircuitOpenException", 0) > 0, totals  # type: ignore[union-attr]
    assert set(errors) <= {"TimeoutException", "CircuitOpenException",  # type: ignore[arg-type]
                           "ConnectionException"}, totals
    assert totals["bad"] == 0, totals
    leaks = _settled(server, base)
    m.done(totals, recovery, leaks)
    assert leaks == 0


def test_peers_that_never_speak_are_closed(make_server, tmp_path: Path,
                                           leak_check: None) -> None:
    server, base, callers, m = _fault_setup(
        make_server, tmp_path, ["--silent-timeout", "1"],
        "50 peers that connect and never speak (silent_timeout 1 s)")
    quiet = tb.Client(server.socket, timeout=2.0)
    quiet.ping()  # spoke once, then stays quiet: idle_timeout (off) is what applies to it
    socks = flood(server.socket, 50)

    def all_closed() -> bool:
        for s in socks:
            try:
                if s.recv(1, socket.MSG_DONTWAIT) != b"":
                    return False
            except BlockingIOError:
                return False
        return True

    closed_after = _wait("the server closes the silent peers", all_closed, 30)
    m.row["silent_peers_closed_after_s"] = round(closed_after, 2)
    with quiet:  # closed before the descriptors are counted: it is not a leak
        assert quiet.ping()["server"] == "tensorbridge"
    totals = _end_fault(m, socks, callers, base)
    assert totals["errors"] == {}, totals
    assert any("silent for more than silent_timeout" in line for line in server.log)


def _pipe_bytes(fd: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, sys.byteorder)


def test_log_sink_that_stops_reading(tmp_path: Path, leak_check: None) -> None:
    """stderr is a pipe nobody reads: every request is logged (slow_ms tiny) until the pipe
    is full; serving goes on, the lines beyond log_buffer are dropped and counted."""
    sock = str(tmp_path / "tb.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorbridge", "serve", "--socket", sock, "--threads", "1",
         "--model", ECHO[0], "--warmup", "0", "--slow-ms", "0.000001", "--log-buffer", "200"],
        stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err_fd = proc.stderr.fileno()
    callers: Callers | None = None
    try:
        _wait("the server is ready", lambda: os.path.exists(sock) and _answers(sock), 60)
        # A small pipe (8 KiB, not 64) fills after ~60 request lines even when a loaded
        # machine serves few requests; it cannot shrink below what the start-up left in it.
        try:
            full = fcntl.fcntl(err_fd, fcntl.F_SETPIPE_SZ, 8192) - 1024
        except OSError:
            full = 60_000
        callers = Callers(sock, tmp_path)
        with tb.Client(sock, timeout=2.0) as filler:  # fills it even while the callers start

            def filled() -> bool:
                for i in range(20):
                    filler.infer("echo", {"x": [i]})
                return _pipe_bytes(err_fd) >= full

            _wait("the log pipe is full", filled, 60)
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        served = 0
        while time.monotonic() - t0 < HOLD:  # calls go on while nobody reads the log
            with tb.Client(sock, timeout=2.0) as client:
                assert client.infer("echo", {"x": [served]})["x"].tolist() == [served]
            served += 1
        row: dict[str, object] = {"fault": "log sink stops reading (stderr pipe full)",
                                  "held_s": round(time.monotonic() - t0, 1),
                                  "server_cpu_s": round(cpu_seconds(proc.pid) - cpu0, 2),
                                  "calls_while_pipe_full": served}
        chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: chunks.extend(iter(
            lambda: os.read(err_fd, 65536), b"")), daemon=True)
        reader.start()  # the sink reads again
        _wait("the server reports the dropped lines",
              lambda: b"log line(s) dropped" in b"".join(chunks), 30)
        totals = callers.stop()
        text = b"".join(chunks).decode(errors="replace")
        dropped = [line for line in text.splitlines() if "log line(s) dropped" in line]
        row["log_lines"] = len(text.splitlines())
        row["dropped_reported"] = dropped[0].split(" tensorbridge WARNING ")[-1]
        row.update(caller_calls=totals["calls"], caller_errors=totals["errors"],
                   recovery_s=0.0, leaks=0)
        _ROWS.append(row)
        print(f"\nFAULT {json.dumps(row)}")
        assert served > 0 and totals["bad"] == 0 and totals["errors"] == {}, totals
        callers = None
    finally:
        if callers is not None:
            callers.abort()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _answers(sock: str) -> bool:
    try:
        with tb.Client(sock, timeout=1.0) as client:
            client.ping()
        return True
    except tb.TensorBridgeError:
        return False


def test_systemd_watchdog_pings_stop_when_the_loop_hangs(make_server, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The notify protocol as systemd speaks it (systemd is not PID 1 here): READY=1 after
    warm-up, WATCHDOG=1 from the loop, and none once the loop hangs."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # WatchdogSec=1: a tick every 0.25 s
    server = make_server([*ECHO, "hang=tensorbridge.models.testing:hang"], ["--warmup", "0"])
    got: list[str] = []

    def receive(until: Callable[[], bool], limit: float) -> None:
        end = time.monotonic() + limit
        while not until() and time.monotonic() < end:
            try:
                got.append(notify.recv(4096).decode())
            except TimeoutError:
                pass
    try:
        receive(lambda: sum(m == "WATCHDOG=1" for m in got) >= 3, 30)
        assert got[0].startswith("READY=1\n") and "MAINPID=" in got[0], got
        assert got.count("WATCHDOG=1") >= 3, got
        with pytest.raises(tb.TimeoutError), tb.Client(server.socket, timeout=1.0) as client:
            client.infer("hang", {"x": [1]})
        notify.setblocking(False)  # what was sent before the hang is queued: drop it
        try:
            while notify.recv(4096):
                pass
        except BlockingIOError:
            pass
        notify.settimeout(0.2)
        got.clear()
        receive(lambda: False, 3.0)  # 12 ticks' worth: the hung loop sends none
        assert "WATCHDOG=1" not in got, got
    finally:
        notify.close()
        server.kill()


def test_supervisor_watchdog_restarts_a_hung_server(tmp_path: Path, leak_check: None) -> None:
    from test_deploy import _pid_when_healthy, _supervisor_copy

    sock = str(tmp_path / "tb.sock")
    command = (f"{sys.executable} -m tensorbridge serve --socket {sock} --threads 1 --warmup 0 "
               f"--model {ECHO[0]} --model hang=tensorbridge.models.testing:hang")
    conf = _supervisor_copy(tmp_path, command, sock, failures=2)
    daemon = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-c", str(conf)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = _pid_when_healthy(sock, None)
        callers = Callers(sock, tmp_path, client={"breakerThreshold": 3,
                                                  "breakerCoolDown": 1.0}, timeout=1.0)
        with pytest.raises(tb.TimeoutError), tb.Client(sock, timeout=1.0) as client:
            client.infer("hang", {"x": [1]})
        hung_at = time.monotonic()
        second = _pid_when_healthy(sock, first, 90)
        restart_s = time.monotonic() - hung_at
        recovery = first_success(sock)
        totals = callers.stop()
        assert second != first
        assert totals["bad"] == 0, totals
        assert set(totals["errors"]) <= {"TimeoutException", "CircuitOpenException",  # type: ignore[arg-type]
                                         "ConnectionException"}, totals
        log = (tmp_path / "watchdog.log").read_text()
        assert f"killing the hung server (pid {first})" in log, log
        row = {"fault": "event loop hangs (C call holding the GIL), Supervisor watchdog",
               "held_s": round(restart_s, 1), "server_cpu_s": None, "log_lines": None,
               "caller_calls": totals["calls"], "caller_errors": totals["errors"],
               "recovery_s": round(restart_s + recovery, 3), "leaks": 0}
        _ROWS.append(row)
        print(f"\nFAULT {json.dumps(row)}")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    assert not os.path.exists(sock)
