"""Model lifecycle on a real server: repository, reload under PHP load, unload, kill -9.

The long variants (more PHP callers, more reloads) run in ``make soak``: TB_RELOADS and
TB_RELOAD_CALLERS scale the reload test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from repo_fixtures import (
    LINEAR_CONFIG,
    free_port,
    metrics_text,
    write_config,
    write_version,
)

from tensorbridge import Client
from tensorbridge._errors import ConnectionError, ModelError, ModelNotFoundError

from conftest import PHP_DIR, ServerProcess, run_cli, wait_until

ECHO = ["echo=tensorbridge.models.testing:echo"]
#: The two answers the reloads alternate between: y = 2x + 1 and y = 3x.
ANSWERS = {"2x+1": (2.0, 1.0), "3x": (3.0, 0.0)}
RELOADS = int(os.environ.get("TB_RELOADS", "20"))
CALLERS = int(os.environ.get("TB_RELOAD_CALLERS", "16"))


def wait_for(check, what: str, timeout: float = 60.0):
    """Poll ``check()`` until it returns something truthy; fail naming ``what``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def answer_of(client: Client, x: float = 5.0, **kwargs) -> tuple[str, int]:
    """(which answer, version) of one call to ``linear``."""
    y = client.infer("linear", {"x": torch.tensor([[x]])}, **kwargs)["y"].item()
    names = [n for n, (a, b) in ANSWERS.items() if a * x + b == y]
    assert len(names) == 1, y
    return names[0], client.last_version


def versions(client: Client, name: str) -> list[tuple[int, str]]:
    (model,) = client.admin("list", name)
    return [(v["version"], v["state"]) for v in model["versions"]]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    write_config(path, "linear", LINEAR_CONFIG)
    write_version(path, "linear", 1, *ANSWERS["2x+1"])
    return path


def test_reload_under_php_load_drops_nothing(make_server, repo: Path, tmp_path: Path,
                                             leak_check) -> None:
    srv = make_server(ECHO, ["--repository", str(repo)])
    stop = tmp_path / "stop"
    event_files = [tmp_path / f"events-{i}.jsonl" for i in range(CALLERS)]
    callers = [subprocess.Popen(
        ["php", str(PHP_DIR / "linear_caller.php"), json.dumps({
            "socket": srv.socket, "worker": i, "stop_file": str(stop),
            "events_file": str(event_files[i]), "answers": ANSWERS})],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(CALLERS)]

    def calls() -> int:
        return sum(f.read_bytes().count(b"\n") for f in event_files if f.exists())

    # (reload started, reload returned, answer expected from then on)
    swaps: list[tuple[float, float, str]] = [(0.0, time.time(), "2x+1")]
    try:
        wait_for(lambda: calls() >= 2 * CALLERS, "the PHP callers to get going")
        with Client(srv.socket, timeout=5) as admin:
            for k in range(RELOADS):
                name = "3x" if k % 2 == 0 else "2x+1"
                write_version(repo, "linear", k + 2, *ANSWERS[name])
                started = time.time()
                admin.admin("reload", "linear", timeout=120)
                swaps.append((started, time.time(), name))
                # Once reload returns, a new request gets the new version at once ...
                assert answer_of(admin) == (name, k + 2)
                # ... and every PHP caller has a moment on it before the next reload.
                done = calls()
                wait_for(lambda d=done: calls() >= d + CALLERS, "calls after a reload")
    finally:
        stop.touch()
        for p in callers:
            p.wait(60)
    for p in callers:
        assert p.returncode == 0, p.stderr.read() if p.stderr else ""
    events = [json.loads(line) for f in event_files for line in f.read_text().splitlines()]
    failed = [e for e in events if e[2] not in ANSWERS]
    assert not failed, (len(failed), failed[:5])
    assert len(events) > RELOADS * CALLERS
    # A call that began after reload k returned and ended before reload k+1 began was
    # decoded while only version k was routed: it must have k's answer.
    checked = 0
    for (_, returned, name), (next_started, _, _) in zip(
            swaps, [*swaps[1:], (float("inf"), 0.0, "")], strict=True):
        window = [e for e in events if e[0] >= returned and e[1] <= next_started]
        assert all(e[2] == name for e in window), (name, [e for e in window if e[2] != name])
        checked += len(window)
    assert checked >= RELOADS  # the windows were not all empty
    print(f"{len(events)} calls by {CALLERS} PHP processes over {RELOADS} reloads, 0 failed; "
          f"{checked} checked against the version routed when they ran")
    # The old versions drained and were freed: only the newest is listed.
    with Client(srv.socket, timeout=5) as client:
        wait_for(lambda: versions(client, "linear") == [(RELOADS + 1, "ready")],
                 "the old versions to be freed")


def test_failed_load_keeps_the_old_version_serving(make_server, repo: Path) -> None:
    port = free_port()
    srv = make_server(ECHO, ["--repository", str(repo), "--metrics-port", str(port)])
    broken = repo / "linear" / "2"
    broken.mkdir()
    (broken / "model.pt").write_text("not a TorchScript file")
    with Client(srv.socket, timeout=5) as client:
        with pytest.raises(ModelError, match="version 2.*not a TorchScript file.*keep serving"):
            client.admin("reload", "linear", timeout=60)
        assert answer_of(client) == ("2x+1", 1)
        (model,) = client.admin("list", "linear")
        failed = [v for v in model["versions"] if v["state"] == "failed"]
        assert [v["version"] for v in failed] == [2]
        assert "not a TorchScript file" in failed[0]["reason"]
        (meta,) = [m for m in client.models() if m["name"] == "linear"]
        assert meta["versions"] == [{"version": 2, "state": "failed"},
                                    {"version": 1, "state": "ready"}]
    # The log line goes out through the log buffer's thread: the reply may overtake it.
    wait_until(lambda: any("version 2 failed to load" in line for line in srv.log),
               "the failed load is logged")
    text = metrics_text(port)
    assert 'tensorbridge_model_load_failures_total{model="linear"} 1.0' in text
    assert 'tensorbridge_model_version_ready{model="linear",version="1"} 1.0' in text
    # Fixed on disk, the next reload serves it and forgets the failure.
    shutil.rmtree(broken)
    write_version(repo, "linear", 2, *ANSWERS["3x"])
    with Client(srv.socket, timeout=5) as client:
        client.admin("reload", "linear", timeout=60)
        assert answer_of(client) == ("3x", 2)
        wait_for(lambda: versions(client, "linear") == [(2, "ready")], "v1 to be freed")


def test_pinned_version_and_unknown_version(make_server, repo: Path) -> None:
    write_config(repo, "linear", LINEAR_CONFIG + 'version_policy = "all"\n')
    write_version(repo, "linear", 2, *ANSWERS["3x"])
    srv = make_server(ECHO, ["--repository", str(repo)])
    with Client(srv.socket, timeout=5) as client:
        assert answer_of(client) == ("3x", 2)  # no split: the newest
        assert answer_of(client, version=1) == ("2x+1", 1)
        with pytest.raises(ModelNotFoundError, match=r"no version 7; versions: \[1, 2\]"):
            answer_of(client, version=7)
        (meta,) = [m for m in client.models() if m["name"] == "linear"]
        assert meta["versions"] == [{"version": 2, "state": "ready"},
                                    {"version": 1, "state": "ready"}]


def test_unload_returns_the_memory(make_server, repo: Path) -> None:
    srv = make_server(ECHO, ["--repository", str(repo)])
    big = repo / "big" / "1"
    big.mkdir(parents=True)
    # 64 M floats = 256 MiB of parameters, touched (random), so they really are resident.
    (big / "model.py").write_text(
        "import torch\n\n"
        "class Big(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.w = torch.nn.Parameter(torch.rand(64 << 20), requires_grad=False)\n\n"
        "    def forward(self, x: torch.Tensor) -> torch.Tensor:\n"
        "        return x + self.w[:1]\n\n"
        "def create():\n"
        "    return Big()\n")
    write_config(repo, "big", 'inputs = [{name = "x", datatype = "FP32", shape = [1]}]\n')

    def rss() -> int:
        status = Path(f"/proc/{srv.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines()
                        if line.startswith("VmRSS:"))) * 1024

    with Client(srv.socket, timeout=5) as client:
        assert answer_of(client)[0] == "2x+1"
        before = rss()
        client.admin("load", "big", timeout=120)
        assert client.infer("big", {"x": torch.zeros(1)})["output"].shape == (1,)
        loaded = rss()
        assert loaded - before > 200 << 20, (before, loaded)  # the load is visible at all
        client.admin("unload", "big")
        wait_for(lambda: versions(client, "big") == [], "the big model to be freed")
        after = rss()
        with pytest.raises(ModelNotFoundError, match="no ready version"):
            client.infer("big", {"x": torch.zeros(1)})
    print(f"RSS before load {before >> 20} MiB, loaded {loaded >> 20} MiB, "
          f"after unload {after >> 20} MiB")
    assert abs(after - before) <= 0.10 * before, (before, loaded, after)


SLOW_MODEL = """
import time
from pathlib import Path

import torch

class Linear(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 3.0

def create():
    # A slow load: the test kills the server while this version loads.
    Path(__file__).with_name("loading").touch()
    time.sleep(float(Path(__file__).with_name("delay").read_text()))
    return Linear()
"""


def test_kill_during_reload_restart_serves_policy_and_leaks_nothing(
        make_server, repo: Path, tmp_path: Path, leak_check) -> None:
    srv = make_server(ECHO, ["--repository", str(repo)])
    slow = repo / "linear" / "2"
    slow.mkdir()
    (slow / "model.py").write_text(SLOW_MODEL)
    (slow / "delay").write_text("30")
    reload = subprocess.Popen([sys.executable, "-m", "tensorbridge", "models", "reload",
                               "linear", "--socket", srv.socket], stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  sys.path)})
    wait_for(lambda: (slow / "loading").exists(), "the reload to begin loading version 2")
    srv.kill()
    assert reload.wait(30) == 3  # ExitCode.UNREACHABLE: the server went away
    assert "closed the connection" in (reload.stderr.read() if reload.stderr else "")
    # The restarted server serves what the policy says now: the newest version, 2.
    (slow / "delay").write_text("0")
    restarted = ServerProcess(srv.socket, srv.args).start()
    try:
        at_start = restarted.fds()
        assert not [f for f in at_start if str(repo) in f], at_start  # no model file open
        with Client(restarted.socket, timeout=5) as client:
            assert answer_of(client) == ("3x", 2)
            assert versions(client, "linear") == [(2, "ready")]
        wait_for(lambda: restarted.memfds() == 0, "the client's region to be released")
        # Its client gone, the restarted server holds what it held at start: nothing more.
        def kinds(fds: list[str]) -> list[str]:
            return sorted(f.split(":")[0] for f in fds)

        wait_for(lambda: kinds(restarted.fds()) == kinds(at_start), "the fds of the start")
    finally:
        restarted.stop()
    assert not Path(srv.socket).exists()


def test_polling_picks_up_new_and_removed_versions(make_server, repo: Path) -> None:
    srv = make_server(ECHO, ["--repository", str(repo), "--poll-interval", "0.2"])
    with Client(srv.socket, timeout=5) as client:
        assert answer_of(client) == ("2x+1", 1)
        write_version(repo, "linear", 2, *ANSWERS["3x"])
        wait_for(lambda: answer_of(client) == ("3x", 2), "the poll to load version 2")
        shutil.rmtree(repo / "linear" / "2")
        wait_for(lambda: answer_of(client) == ("2x+1", 1), "the poll to go back to 1")
        wait_for(lambda: versions(client, "linear") == [(1, "ready")], "v2 to be freed")


_ADMIN_AS_OTHER = """
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
def call(ftype, rid, body):
    s.sendall(struct.pack("<IBBHQII", 0x31524254, 1, ftype, 0, rid, len(body), 0) + body)
    head = b""
    while len(head) < 24:
        head += s.recv(24 - len(head))
    _, _, rtype, _, rrid, n, _ = struct.unpack("<IBBHQII", head)
    body = b""
    while len(body) < n:
        body += s.recv(n - len(body))
    return rtype, rrid, body
rtype, rid, body = call(0x05, 7, b'{"command":"reload","model":"linear"}')
code, _, m = struct.unpack("<HHI", body[:8])
pong = call(0x02, 8, b"")
print(json.dumps({"type": rtype, "rid": rid, "code": code, "message": body[8:8 + m].decode(),
                  "then": pong[0]}))
"""


def test_admin_needs_an_admin_uid(make_server, repo: Path) -> None:
    import pwd
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="tb-admin-", dir="/tmp"))
    shared.chmod(0o755)
    try:
        srv = make_server(ECHO, ["--repository", str(repo), "--socket-mode", "666"],
                          socket=str(shared / "tb.sock"))
        nobody = pwd.getpwnam("nobody")
        proc = subprocess.run(["/usr/bin/python3", "-c", _ADMIN_AS_OTHER, srv.socket],
                              capture_output=True, text=True, timeout=30, user=nobody.pw_uid,
                              group=nobody.pw_gid, extra_groups=[], cwd="/tmp",
                              env={"PATH": "/usr/bin:/bin"})
        assert proc.returncode == 0, proc.stderr
        refused = json.loads(proc.stdout)
        assert refused["type"] == 0xFF and refused["rid"] == 7 and refused["code"] == 8
        assert f"uid {nobody.pw_uid} may not send ADMIN" in refused["message"]
        assert refused["then"] == 0x82  # the connection still serves (PONG)
        # The server's own uid may (the default admin_uid).
        with Client(srv.socket, timeout=5) as client:
            assert [m["name"] for m in client.admin("list")] == ["echo", "linear"]
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_cli_models_commands(make_server, repo: Path) -> None:
    srv = make_server(ECHO, ["--repository", str(repo)])

    def cli(*args: str) -> subprocess.CompletedProcess:
        return run_cli("models", *args, "--socket", srv.socket)

    listed = cli("list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    assert {m["name"] for m in json.loads(listed.stdout)} == {"echo", "linear"}
    write_version(repo, "linear", 2, *ANSWERS["3x"])
    assert cli("reload", "linear").returncode == 0
    text = cli("list", "linear").stdout
    assert "linear (policy latest)" in text and "2: ready torchscript" in text
    assert cli("unload", "linear").returncode == 0
    missing = cli("reload", "nope")
    assert missing.returncode == 1 and "'nope' is not configured" in missing.stderr
    assert cli("load").returncode == 2  # no name
    assert cli("load", "linear").returncode == 0
    with Client(srv.socket, timeout=5) as client:
        assert answer_of(client) == ("3x", 2)
    with pytest.raises(ConnectionError):
        Client(str(Path(srv.socket).with_name("absent.sock"))).admin("list")


RECORDING_MODEL = """
import threading
from pathlib import Path

import torch

LOG = Path(__file__).with_name("calls.log")


class Recording(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) < 0:
            raise ValueError("negative inputs break this version")
        with LOG.open("a") as f:
            # thread names, not idents: a finished thread's ident can be given to the next
            f.write(f"{threading.current_thread().name.replace(' ', '_')} {float(x.sum())}\\n")
        return x * 3.0


def create():
    return Recording()
"""


def test_warm_up_uses_config_inputs_on_every_instance(make_server, repo: Path) -> None:
    """Warm-up inputs come from the config and run on as many threads as instances; a
    version whose warm-up raises is not served, and the old one stays."""
    srv = make_server(ECHO, ["--repository", str(repo)])
    folder = repo / "linear" / "2"
    folder.mkdir()
    (folder / "model.py").write_text(RECORDING_MODEL)
    write_config(repo, "linear", LINEAR_CONFIG + "instances = 3\nwarmup = 2\n"
                 "warmup_inputs = { x = [[7.0]] }\n")
    with Client(srv.socket, timeout=5) as client:
        client.admin("reload", "linear", timeout=120)
        lines = (folder / "calls.log").read_text().split()
        # 2 runs in the loading thread, then 2 on each of 3 threads at once; all with x = 7.
        assert lines[1::2] == ["7.0"] * 8, lines
        assert len(set(lines[0::2])) >= 3  # several threads
        assert answer_of(client) == ("3x", 2)
        write_config(repo, "linear", LINEAR_CONFIG + "warmup_inputs = { x = [[-1.0]] }\n")
        with pytest.raises(ModelError, match="negative inputs break this version"):
            client.admin("reload", "linear", timeout=120)
        assert answer_of(client) == ("3x", 2)  # the copy that warmed up fine still serves


def test_reload_of_a_model_given_with_model(make_server) -> None:
    srv = make_server(["digits=tensorbridge.models.digits:create"], [])
    x = {"input": torch.rand(1, 64) * 16}
    with Client(srv.socket, timeout=5) as client:
        before = client.infer("digits", x)["logits"]
        (listed,) = client.admin("reload", "digits", timeout=120)
        assert [v["version"] for v in listed["versions"] if v["state"] == "ready"] == [1]
        assert torch.equal(client.infer("digits", x)["logits"], before)
        assert client.last_version == 1


def test_one_connection_repeating_a_call_sees_every_switch(make_server, repo: Path) -> None:
    """The compiled loop admits a connection's INFER the long way once and remembers how
    (route, checks, views over the region) for the same call again: a new version, a
    reload, an unload and a load still reach that connection's very next call, and the
    remembered views read what the client wrote each time, also after the region grew."""
    # Every version stays loaded: the one a remembered call resolved to is not freed.
    write_config(repo, "linear", LINEAR_CONFIG + 'version_policy = "all"\n')
    srv = make_server(ECHO, ["--repository", str(repo)])
    with Client(srv.socket, timeout=5) as client:
        assert [answer_of(client, x=float(i)) for i in range(2, 5)] == [("2x+1", 1)] * 3
        write_version(repo, "linear", 2, *ANSWERS["3x"])
        client.admin("load", "linear", timeout=60)  # version 1 stays loaded beside 2
        assert [answer_of(client, x=float(i)) for i in range(2, 5)] == [("3x", 2)] * 3
        client.admin("reload", "linear", timeout=60)
        assert answer_of(client) == ("3x", 2)
        client.admin("unload", "linear", timeout=60)
        with pytest.raises(ModelNotFoundError, match="no ready version"):
            answer_of(client)
        client.admin("load", "linear", timeout=60)
        assert answer_of(client) == ("3x", 2)
        big = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB: the region grows
        assert torch.equal(client.infer("echo", {"x": big})["x"], big)
        assert [answer_of(client, x=float(i)) for i in range(2, 5)] == [("3x", 2)] * 3
