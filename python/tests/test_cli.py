"""``tensorbridge health`` against real servers: 0 ready (a real INFER answered), 1 answering
but not ready, 2 usage, 3 unreachable (nothing answers, or a stopped process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tensorbridge._exitcode import ExitCode

from conftest import run_cli


def _health(socket: str, *args: str) -> subprocess.CompletedProcess:
    return run_cli("health", "--socket", socket, "--timeout", "3", *args)


def test_health_exit_codes(tmp_path: Path, make_server) -> None:
    server = make_server(["digits=tensorbridge.models.digits:create",
                          "echo=tensorbridge.models.testing:echo"])
    ok = _health(server.socket, "--format", "json")
    assert ok.returncode == ExitCode.OK, ok.stderr
    report = json.loads(ok.stdout)
    # digits' inputs can be made up, so it got a real INFER; echo's are open, PING covers it.
    assert report["checked"] == {"digits": "ok"} and report["server"]["ready"] is True
    missing = _health(server.socket, "--model", "nope")
    assert missing.returncode == ExitCode.FAILURE and "'nope' is not loaded" in missing.stderr
    usage = subprocess.run([sys.executable, "-m", "tensorbridge", "health", "--timeout", "x"],
                           capture_output=True, text=True, timeout=60)
    assert usage.returncode == ExitCode.CONFIG
    os.kill(server.pid, signal.SIGSTOP)  # accepts (the kernel's backlog) but never answers
    try:
        stopped = _health(server.socket)
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert stopped.returncode == ExitCode.UNREACHABLE, stopped.stderr
    assert _health(server.socket).returncode == ExitCode.OK
    server.stop()
    down = _health(server.socket)
    assert down.returncode == ExitCode.UNREACHABLE and "running?" in down.stderr



def test_low_open_file_limit_is_raised_or_warned(tmp_path: Path) -> None:
    """Under a hard limit of 256 descriptors, max_connections = 4096 cannot be met: the
    server says so at start (and how many connections it can take), then serves."""
    sock = tmp_path / "tb.sock"
    proc = subprocess.Popen(
        ["prlimit", "--nofile=256:256", sys.executable, "-m", "tensorbridge", "serve",
         "--socket", str(sock), "--model", "echo=tensorbridge.models.testing:echo",
         "--warmup", "0", "--threads", "1"], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "ready on" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=60)
    text = "".join(lines) + rest
    assert proc.returncode == ExitCode.OK, text
    assert "the open-file limit (256) is too low for max_connections = 4096" in text, text
    assert "connections past about 96 get OVERLOADED" in text, text


def test_import_makes_torch_threads_wait_passively_unless_told() -> None:
    """The server shares cores with PHP workers: idle torch threads must not spin."""
    code = "import os, tensorbridge; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = [subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,
                          check=True).stdout.strip()
           for e in (env, {**env, "OMP_WAIT_POLICY": "ACTIVE"})]
    assert out == ["PASSIVE", "ACTIVE"]
