"""Shared fixtures: a real ``tensorbridge serve`` process, a PHP runner, leak snapshots."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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

        threading.Thread(target=drain, args=(self.proc.stderr,), daemon=True).start()
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

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


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
