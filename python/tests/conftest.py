"""Shared fixtures: a real ``tensorbridge serve`` process, a PHP runner, leak snapshots."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket as _socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PHP_DIR = Path(__file__).parent / "php"
VECTORS = json.loads((ROOT / "spec" / "vectors" / "vectors.json").read_text())
TEST_MODELS = [
    "echo=tensorbridge.models.testing:echo",
    "sleep=tensorbridge.models.testing:sleep",
    "fail=tensorbridge.models.testing:fail",
    "head=tensorbridge.models.testing:head",
    "digits=tensorbridge.models.digits:create",
]


@dataclass
class ServerProcess:
    """A running ``tensorbridge serve`` child process."""

    socket: str
    args: list[str]
    proc: subprocess.Popen | None = None
    log: list[str] = field(default_factory=list)
    #: Socket descriptors the server holds with no client connected (shared_server sets it).
    idle_sockets: int = 0

    def start(self) -> ServerProcess:
        ready = threading.Event()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tensorbridge", "serve", "--socket", self.socket,
             "--threads", "1", "--log-level", "info", *self.args],
            stderr=subprocess.PIPE, text=True)

        def drain(stream) -> None:
            for line in stream:
                self.log.append(line)
                if "ready on" in line:
                    ready.set()
            ready.set()

        self._drain = threading.Thread(target=drain, args=(self.proc.stderr,), daemon=True)
        self._drain.start()
        assert ready.wait(60), "server did not start"
        assert self.proc.poll() is None, "".join(self.log)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def fds(self) -> list[str]:
        """Targets of the server's open descriptors (sockets, memfds, files)."""
        base = f"/proc/{self.pid}/fd"
        out = []
        for fd in os.listdir(base):
            try:
                out.append(os.readlink(f"{base}/{fd}"))
            except FileNotFoundError:
                pass
        return sorted(out)

    def memfds(self) -> int:
        """Number of region memfds the server still holds or maps."""
        maps = Path(f"/proc/{self.pid}/maps").read_text()
        return maps.count("memfd:tensorbridge-region") + sum(
            "memfd:tensorbridge-region" in t for t in self.fds())

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._close_log()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        """Read the dead server's last lines, then close the pipe (no ResourceWarning)."""
        if self.proc is not None and self.proc.stderr is not None and self.proc.poll() is not None:
            self._drain.join(10)
            self.proc.stderr.close()


#: /dev/shm entries of programs other tests run at the same time (pytest-xdist): Chromium's
#: renderer memory and PostgreSQL's dynamic shared memory. TensorBridge itself never creates a
#: named entry (its regions are memfds), so anything else that appears is a leak.
_FOREIGN_SHM = (".org.chromium.", "PostgreSQL.")


def shm_snapshot() -> tuple[list[str], str]:
    """What /dev/shm and ``ipcs -m`` hold now (other than _FOREIGN_SHM and PostgreSQL's)."""
    segs = subprocess.run(["ipcs", "-m"], capture_output=True, text=True).stdout
    segs = "\n".join(line for line in segs.splitlines()
                     if line[:2] == "0x" and " postgres " not in line)
    return sorted(n for n in os.listdir("/dev/shm") if not n.startswith(_FOREIGN_SHM)), segs


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``tensorbridge ARGS`` run in this process (the same ``main`` the console script calls,
    without a fresh interpreter importing torch each time); stdout and stderr captured."""
    import contextlib
    import io

    from tensorbridge._cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(["tensorbridge", *args], code, out.getvalue(),
                                       err.getvalue())


def headless_chromium(window: str) -> Iterator[Any]:
    """Debian's Chromium under selenium, headless, for the demo pages' browser tests; skips
    the test when chromium or chromium-driver is missing. A generator for fixtures to yield
    from: the browser quits when the fixture ends."""
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("the browser tests need Debian's chromium and chromium-driver (make setup)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={window}",
                # Chromium's own shared memory goes to /tmp, so /dev/shm stays as it was.
                "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(condition: Callable[[], object], what: str, timeout: float = 30,
               every: float = 0.005) -> None:
    """Poll ``condition`` until it is true; fail the test naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not true within {timeout} s"
        time.sleep(every)


_RAW_SOCKETS: list[_socket.socket] = []


def raw_connect(path: str, timeout: float = 10) -> _socket.socket:
    """A plain Unix socket connected to ``path`` for hand-made frames; closed after the test."""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    _RAW_SOCKETS.append(s)
    s.connect(path)
    s.settimeout(timeout)
    return s


@pytest.fixture(autouse=True)
def _close_what_tests_opened(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Close raw sockets and the pipes of exited child processes once a test is over.

    The suite turns warnings into errors, so an unclosed pipe of a PHP driver or server that
    a test already killed would otherwise fail it with a ResourceWarning. A child that still
    runs is left alone (a wider-scoped fixture may own it).
    """
    started: list[subprocess.Popen] = []
    real_init = subprocess.Popen.__init__

    def recording_init(self: subprocess.Popen, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]
        started.append(self)

    monkeypatch.setattr(subprocess.Popen, "__init__", recording_init)
    threads = set(threading.enumerate())
    yield
    for s in _RAW_SOCKETS:
        s.close()
    _RAW_SOCKETS.clear()
    exited = [p for p in started if p.poll() is not None
              and any(f is not None and not f.closed for f in (p.stdin, p.stdout, p.stderr))]
    if exited:  # let the threads reading those pipes reach EOF first (5 s for all of them)
        end = time.monotonic() + 5
        for t in set(threading.enumerate()) - threads:
            t.join(max(0.0, end - time.monotonic()))
    for p in exited:
        for stream in (p.stdin, p.stdout, p.stderr):
            if stream is not None and not stream.closed:
                try:
                    stream.close()
                except OSError:  # a stdin whose reader is gone
                    pass


@pytest.fixture
def leak_check() -> Iterator[None]:
    """Fail the test if it leaves anything in /dev/shm or ipcs -m."""
    before = shm_snapshot()
    yield
    assert shm_snapshot() == before


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator:
    servers: list[ServerProcess] = []

    def make(models: list[str] | None = None, extra: list[str] | None = None,
             socket: str | None = None) -> ServerProcess:
        args = [a for m in (models or TEST_MODELS) for a in ("--model", m)] + (extra or [])
        srv = ServerProcess(socket or str(tmp_path / "tb.sock"), args).start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop()


@pytest.fixture
def server(make_server) -> ServerProcess:
    return make_server()


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server (TEST_MODELS) per xdist worker for the tests that neither kill, stop nor
    reconfigure it: each server start imports torch again (~2 s of CPU)."""
    path = tmp_path_factory.mktemp("shared")
    srv = ServerProcess(str(path / "tb.sock"),
                        [a for m in TEST_MODELS for a in ("--model", m)]).start()
    srv.idle_sockets = sum(t.startswith("socket:") for t in srv.fds())  # listener and co.
    yield srv
    srv.stop()


def php(cmd: dict, timeout: float = 120) -> list[dict]:
    """Run the PHP test driver with one command; return its per-call results."""
    proc = subprocess.run(["php", str(PHP_DIR / "call.php")], input=json.dumps(cmd),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == "" or "print_now" in json.dumps(cmd), proc.stderr
    return json.loads(proc.stdout)


def php_popen(cmd: dict) -> subprocess.Popen:
    """Start the PHP driver without waiting (for kill tests)."""
    p = subprocess.Popen(["php", str(PHP_DIR / "call.php")], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdin is not None
    p.stdin.write(json.dumps(cmd))
    p.stdin.close()
    p.stdin = None  # so that communicate() does not touch it again
    return p


@dataclass
class OipServer:
    """A server with both Open Inference Protocol listeners (the test_oip_* modules)."""

    proc: ServerProcess
    http: str  #: ``127.0.0.1:PORT`` of the REST listener
    grpc: str  #: ``127.0.0.1:PORT`` of the gRPC listener
    metrics_port: int


@pytest.fixture(scope="session")
def oip_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OipServer]:
    """One server per xdist worker: TEST_MODELS plus ``rows`` (batching on), REST and gRPC
    listeners on loopback without a token, and /metrics."""
    from repo_fixtures import free_port

    path = tmp_path_factory.mktemp("oip")
    (path / "tb.toml").write_text('[models.rows]\nsource = "tensorbridge.models.testing:rows"\n'
                                  "max_batch_size = 8\nmax_queue_delay_us = 5000\n")
    for attempt in range(3):  # a port free a moment ago may be taken by then: pick again
        http, grpc, metrics = free_port(), free_port(), free_port()
        srv = ServerProcess(str(path / "tb.sock"), [
            "--config", str(path / "tb.toml"), *[a for m in TEST_MODELS for a in ("--model", m)],
            "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)])
        try:
            srv.start()
            break
        except AssertionError:
            srv.stop()
            if attempt == 2:
                raise
    yield OipServer(srv, f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", metrics)
    srv.stop()
