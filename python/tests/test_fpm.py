"""Under a real php-fpm: connections are reused across web requests and re-made after a
server restart."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PHP_DIR
from fcgi import get

FPM = shutil.which("php-fpm8.2") or shutil.which("php-fpm")


@pytest.fixture
def fpm(tmp_path: Path):
    if FPM is None:
        pytest.fail("php-fpm is not installed; `make setup` installs php8.2-fpm")
    sock = tmp_path / "fpm.sock"
    conf = tmp_path / "fpm.conf"
    conf.write_text(f"""[global]
error_log = {tmp_path}/fpm.log
daemonize = no
[www]
user = root
group = root
listen = {sock}
pm = static
pm.max_children = 1
catch_workers_output = yes
""")
    proc = subprocess.Popen([FPM, "-R", "-F", "-y", str(conf)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.05)
    yield str(sock)
    proc.terminate()
    proc.wait(10)


def _page(fpm: str, server, n: int) -> dict:
    return json.loads(get(fpm, str(PHP_DIR / "fpm_page.php"), f"socket={server.socket}&n={n}"))


@pytest.mark.usefixtures("leak_check")
def test_fpm_worker_reuses_its_connection_and_reconnects_after_restart(fpm, make_server):
    server = make_server()
    pages = [_page(fpm, server, n) for n in range(5)]
    assert all(p["ok"] for p in pages), pages
    assert len({p["pid"] for p in pages}) == 1  # one worker served them all
    # Every web request after the first found the same server connection.
    assert [p["pong"]["connections_accepted"] for p in pages] == [1] * 5
    server.kill()
    server = make_server()
    page = _page(fpm, server, 7)
    assert page["ok"] and page["pong"]["connections_accepted"] == 1
    assert page["pong"]["pid"] == server.pid
