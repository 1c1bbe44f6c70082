"""The remote backend (``[models.X] remote = "grpc://host:port"``) against real OIP servers.

A local ``tensorbridge serve`` forwards to a remote Open Inference Protocol gRPC server; PHP and
Python call the local socket as for any model. Across two network namespaces (two hosts made
on this machine with ``ip netns`` and a veth pair) the remote is killed and restarted under
PHP load.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tensorbridge import Client
from tensorbridge._errors import DeadlineExceededError, OverloadedError

from conftest import PHP_DIR, run_cli, shm_snapshot, wait_until

TESTS = Path(__file__).parent
#: Per-call timeout of the PHP callers (s); their remote_timeout is longer, so a deadline the
#: remote cannot meet comes from the request's own deadline.
PHP_TIMEOUT = 2.0


@dataclass
class Proc:
    """A server child process whose output is collected (and scanned for a ready line)."""

    args: list[str]
    ready_text: str
    proc: subprocess.Popen | None = None
    log: list[str] = field(default_factory=list)

    def start(self) -> Proc:
        ready = threading.Event()
        self.log = []
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)

        def drain(stream) -> None:
            for line in stream:
                self.log.append(line)
                if self.ready_text in line:
                    ready.set()
            ready.set()

        self._drain = threading.Thread(target=drain, args=(self.proc.stdout,), daemon=True)
        self._drain.start()
        assert ready.wait(90), "".join(self.log)
        assert any(self.ready_text in line for line in self.log), "".join(self.log)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._drain.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kserve_peer(port: int, prefix: list[str] = ()) -> Proc:
    """KServe's ModelServer (PyPI ``kserve``) with gRPC on ``port``: double, head, slow."""
    return Proc([*prefix, sys.executable, str(TESTS / "kserve_peer.py"), str(port),
                 str(free_port())], "Uvicorn running")


def tensorbridge(tmp: Path, name: str, toml: str, prefix: list[str] = (),
                 extra: list[str] = ()) -> tuple[Proc, str]:
    """A ``tensorbridge serve`` with the models of ``toml``; (process, socket path)."""
    config = tmp / f"{name}.toml"
    config.write_text(toml)
    sock = str(tmp / f"{name}.sock")
    return Proc([*prefix, sys.executable, "-m", "tensorbridge", "serve", "--socket", sock,
                 "--threads", "1", "--log-level", "info", "--config", str(config), *extra],
                "ready on"), sock


def local_server(tmp: Path, toml: str, prefix: list[str] = (), extra: list[str] = ()
                 ) -> tuple[Proc, str]:
    """The local server, whose models are remote ones."""
    return tensorbridge(tmp, "local", toml, prefix, extra)


#: The remote TensorBridge's model: ``double`` is y = 2x + 1 for x FP32 [-1, 4] (and ``rows``).
DOUBLE = """[models.double]
source = "tensorbridge.models.testing:rows"
options = {ms = 0.0}
"""


def remote_toml(url: str, models: tuple[str, ...] = ("double", "head", "slow"),
                **extra: object) -> str:
    lines = []
    for model in models:
        lines += [f"[models.{model}]", f'remote = "{url}"']
        lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


@dataclass
class Pair:
    """A remote OIP server and a local server forwarding to it."""

    peer: Proc
    local: Proc
    socket: str
    metrics: str


@pytest.fixture
def kserve_remote(tmp_path: Path) -> Iterator[Pair]:
    """A KServe peer on loopback and a local server forwarding to it."""
    port = free_port()
    peer = kserve_peer(port).start()
    metrics = free_port()
    local, sock = local_server(tmp_path, remote_toml(f"grpc://127.0.0.1:{port}",
                                                     remote_poll_interval=0.2),
                               extra=["--metrics-port", str(metrics)])
    try:
        local.start()
        yield Pair(peer, local, sock, f"http://127.0.0.1:{metrics}/metrics")
    finally:
        local.stop()
        peer.stop()


def test_remote_model_takes_the_signature_and_answers_of_kserve(kserve_remote) -> None:
    sock = kserve_remote.socket
    with Client(sock, timeout=5.0) as client:
        models = {m["name"]: m for m in client.models()}
        assert models["double"]["inputs"] == [{"name": "x", "datatype": "FP32",
                                               "shape": [-1, 4]}]
        assert models["head"]["outputs"] == [{"name": "output", "datatype": "FP32",
                                              "shape": [-1, 1000]}]
        x = torch.arange(8, dtype=torch.float32).reshape(2, 4)
        assert torch.equal(client.infer("double", {"x": x})["y"], x * 2 + 1)
        image = torch.rand(1, 3, 224, 224)
        out = client.infer("head", {"input": image})["output"]
        assert torch.equal(out, image.reshape(1, -1)[:, :1000] + 1)
        status = client.ping()
        assert status["ready"] is True
    assert 'tensorbridge_instances_alive{model="double"} 1.0' in _metrics(kserve_remote)


def test_remote_deadline_is_the_requests_remaining_deadline(kserve_remote) -> None:
    """A remote slower than the caller's deadline: the local server answers
    DEADLINE_EXCEEDED (typed, from the server) before the client gives up."""
    sock = kserve_remote.socket
    with Client(sock, timeout=1.0) as client:
        with pytest.raises(DeadlineExceededError, match="DEADLINE_EXCEEDED"):
            client.infer("slow", {"ms": torch.tensor([3000.0])})
        assert client.infer("slow", {"ms": torch.tensor([1.0])})["ms"].item() == 1.0


def test_remote_that_is_down_gives_a_typed_error_and_opens_the_breaker(kserve_remote) -> None:
    sock = kserve_remote.socket
    with Client(sock, timeout=2.0) as client:
        assert client.ping()["ready"] is True
    kserve_remote.peer.stop(signal.SIGKILL)
    with Client(sock, timeout=2.0) as client:
        with pytest.raises(OverloadedError, match="remote"):
            client.infer("double", {"x": torch.zeros(1, 4)})
        wait_until(lambda: client.ping()["ready"] is False, "PING shows the remote down")
        with pytest.raises(OverloadedError, match="breaker is open"):
            client.infer("double", {"x": torch.zeros(1, 4)})
    health = run_cli("health", "--socket", sock)
    assert health.returncode != 0
    assert "not ready" in health.stderr
    assert 'tensorbridge_instances_alive{model="double"} 0.0' in _metrics(kserve_remote)


def _metrics(pair: Pair) -> str:
    import urllib.request

    with urllib.request.urlopen(pair.metrics, timeout=5) as reply:
        return str(reply.read().decode())


@dataclass
class Hosts:
    """Two network namespaces joined by a veth pair: ``local`` and ``remote`` hosts."""

    local: str
    remote: str
    local_ip: str
    remote_ip: str

    def run_in(self, ns: str) -> list[str]:
        """The command prefix that runs a program on host ``ns``."""
        return ["ip", "netns", "exec", ns]


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    """Two hosts made with ``ip netns`` and a veth pair (10.77.N.1 and 10.77.N.2), deleted
    afterwards whatever happened; skipped where network namespaces are not permitted."""
    tag = f"{os.getpid() % 100000}"
    subnet = 10 + os.getpid() % 240
    made = Hosts(f"tbl{tag}", f"tbr{tag}", f"10.77.{subnet}.1", f"10.77.{subnet}.2")
    first = _ip("netns", "add", made.local)
    if first.returncode != 0:
        pytest.skip(f"`ip netns add` is not permitted here: {first.stderr.strip()}")
    try:
        steps = [
            ("netns", "add", made.remote),
            ("link", "add", f"v{tag}a", "netns", made.local, "type", "veth", "peer", "name",
             f"v{tag}b", "netns", made.remote),
            ("-n", made.local, "addr", "add", f"{made.local_ip}/24", "dev", f"v{tag}a"),
            ("-n", made.remote, "addr", "add", f"{made.remote_ip}/24", "dev", f"v{tag}b"),
            ("-n", made.local, "link", "set", f"v{tag}a", "up"),
            ("-n", made.remote, "link", "set", f"v{tag}b", "up"),
            ("-n", made.local, "link", "set", "lo", "up"),
            ("-n", made.remote, "link", "set", "lo", "up"),
        ]
        for step in steps:
            result = _ip(*step)
            assert result.returncode == 0, f"ip {' '.join(step)}: {result.stderr}"
        yield made
    finally:
        for ns in (made.local, made.remote):  # deleting a namespace deletes its veth end
            _ip("netns", "del", ns)


def _progress(path: Path) -> tuple[int, int]:
    """(calls, ok calls) a PHP caller has made so far."""
    try:
        calls, ok = path.read_text().split()
    except (FileNotFoundError, ValueError):
        return 0, 0
    return int(calls), int(ok)


#: The answers a PHP caller may get while its remote is killed and restarted: the result, or a
#: typed error from the local server (the remote is unavailable / its deadline passed).
ALLOWED = {"ok", "OverloadedException", "DeadlineExceededException"}
CALLERS = 4


def test_remote_killed_and_restarted_under_php_load(hosts: Hosts, tmp_path: Path) -> None:
    """PHP processes call a remote model through the local socket while the remote host's
    server (TensorBridge's own gRPC listener, bearer token: it binds beyond loopback) is
    killed and started again: every call gets its answer or a typed error within its
    deadline, the breaker opens while the remote is down (PING not ready, health fails, calls
    refused at once), and calls succeed again after the restart."""
    before = shm_snapshot()
    port = 20000 + os.getpid() % 20000  # the remote host has no other listener
    token = tmp_path / "token"
    token.write_text("remote-test-token-0123456789")
    remote_dir = tmp_path / "remote"
    remote_dir.mkdir()

    def start_peer() -> Proc:
        peer, _ = tensorbridge(remote_dir, "remote", DOUBLE, hosts.run_in(hosts.remote),
                               ["--grpc-port", str(port), "--grpc-host", hosts.remote_ip,
                                "--http-token-file", str(token)])
        return peer.start()

    peer = start_peer()
    local, sock = local_server(tmp_path, remote_toml(
        f"grpc://{hosts.remote_ip}:{port}", ("double",), remote_poll_interval=0.2,
        remote_timeout=5.0, remote_token_file=str(token)), hosts.run_in(hosts.local))
    stop = tmp_path / "stop"
    progress = [tmp_path / f"progress.{w}" for w in range(CALLERS)]
    callers: list[subprocess.Popen] = []
    try:
        local.start()
        callers = [subprocess.Popen(
            ["php", str(PHP_DIR / "remote_caller.php"), json.dumps({
                "socket": sock, "model": "double", "timeout": PHP_TIMEOUT,
                "stop_file": str(stop), "progress_file": str(progress[w]), "pause_ms": 5})],
            stdout=subprocess.PIPE, text=True) for w in range(CALLERS)]
        wait_until(lambda: all(_progress(p)[1] >= 5 for p in progress),
                   "every PHP caller has answers from the remote", timeout=60)
        t_kill = time.time()
        peer.stop(signal.SIGKILL)
        with Client(sock, timeout=PHP_TIMEOUT) as client:
            wait_until(lambda: client.ping()["ready"] is False,
                       "the breaker opens: PING says not ready", timeout=10)
            at_kill = [_progress(p)[0] for p in progress]
            wait_until(lambda: all(_progress(p)[0] >= n + 10 for p, n in zip(progress, at_kill, strict=True)),
                       "every PHP caller calls while the remote is down", timeout=30)
            health = run_cli("health", "--socket", sock)
            assert health.returncode != 0 and "not ready" in health.stderr, health
            t_restart = time.time()
            peer = start_peer()
            wait_until(lambda: client.ping()["ready"] is True,
                       "the breaker closes once the remote is back", timeout=30)
            t_back = time.time()
        at_restart = [_progress(p)[1] for p in progress]
        wait_until(lambda: all(_progress(p)[1] >= n + 5 for p, n in zip(progress, at_restart, strict=True)),
                   "every PHP caller gets answers again", timeout=30)
        assert run_cli("health", "--socket", sock).returncode == 0
    finally:
        stop.touch()
        results = [json.loads(c.communicate(timeout=60)[0])["calls"] for c in callers]
        local.stop()
        peer.stop()
    calls = [c for r in results for c in r]
    outcomes = {c["r"] for c in calls}
    print(f"{len(calls)} PHP calls: " + ", ".join(  # what the test saw (pytest -s)
        f"{sum(c['r'] == o for c in calls)} {o}" for o in sorted(outcomes))
        + f"; slowest {max(c['ms'] for c in calls):.0f} ms; remote down "
        f"{t_back - t_kill:.1f} s (killed, restarted {t_restart - t_kill:.1f} s later)")
    assert outcomes <= ALLOWED, [c for c in calls if c["r"] not in ALLOWED][:5]
    late = [c for c in calls if c["ms"] > PHP_TIMEOUT * 1000 + 250]
    assert not late, late[:5]  # no call outlived its deadline (the client's own bound)
    for worker in results:
        assert any(c["r"] == "ok" and c["t"] < t_kill for c in worker)
        assert any(c["r"] != "ok" and t_kill < c["t"] < t_restart for c in worker)
        assert any(c["r"] == "ok" and c["t"] > t_restart for c in worker)
        assert worker[-1]["r"] == "ok", worker[-5:]
    down = [c for c in calls if c["r"] != "ok"]
    assert any("breaker is open" in c["msg"] for c in down), down[:5]
    assert shm_snapshot() == before


def test_remote_key_is_the_models_source_and_is_checked(tmp_path: Path) -> None:
    from tensorbridge._backends import backend_name
    from tensorbridge._config import ServerConfig
    from tensorbridge._settings import ConfigError

    config = tmp_path / "tb.toml"
    config.write_text('[models.m]\nremote = "grpc://10.0.0.2:8001"\nremote_model = "resnet"\n'
                      'remote_timeout = 2.5\n')
    (model,) = ServerConfig.from_toml(str(config)).models
    assert model.source == "grpc://10.0.0.2:8001" and backend_name(model.source) == "remote"
    assert (model.remote_model, model.remote_timeout) == ("resnet", 2.5)
    config.write_text('[models.m]\nremote = "http://10.0.0.2:8000"\n')
    with pytest.raises(ConfigError, match="remote = 'http://10.0.0.2:8000': .*grpc://HOST:PORT"):
        ServerConfig.from_toml(str(config))
    config.write_text('[models.m]\nremote = "grpc://h:1"\nsource = "m.pt"\n')
    with pytest.raises(ConfigError, match="both source and remote"):
        ServerConfig.from_toml(str(config))


def test_unloading_a_remote_model_closes_its_channels_and_poller(kserve_remote) -> None:
    """After ``models unload`` the local server holds no connection to the remote any more
    (its channels closed, its ModelReady poller stopped)."""
    pid = kserve_remote.local.proc.pid
    port = kserve_remote.peer.args[-2]

    def connections() -> int:
        out = subprocess.run(["ss", "-Htnp", "state", "established", f"dport = :{port}"],
                             capture_output=True, text=True).stdout
        return out.count(f"pid={pid},")

    assert connections() >= 1
    for model in ("double", "head", "slow"):
        assert run_cli("models", "unload", model, "--socket", kserve_remote.socket
                       ).returncode == 0
    wait_until(lambda: connections() == 0, "the local server's connections to the remote close",
               timeout=15)


def test_a_declared_remote_model_starts_while_its_remote_is_down(tmp_path: Path) -> None:
    """The node-local server must not crash-loop because its cluster is down at start: with
    inputs and outputs declared it serves the model with the breaker open, and answers once
    the remote comes up. Without them it refuses to start, saying so."""
    port = free_port()
    url = f"grpc://127.0.0.1:{port}"
    undeclared, _ = local_server(tmp_path, remote_toml(url, ("double",)))
    with pytest.raises(AssertionError, match="declare the model's inputs and outputs"):
        undeclared.start()
    undeclared.stop()
    declared = remote_toml(url, ("double",), remote_poll_interval=0.2) + (
        'inputs = [{name = "x", datatype = "FP32", shape = [-1, 4]}]\n'
        'outputs = [{name = "y", datatype = "FP32", shape = [-1, 4]}]\n')
    local, sock = local_server(tmp_path, declared)
    peer = kserve_peer(port)
    try:
        local.start()
        with Client(sock, timeout=2.0) as client:
            assert client.ping()["ready"] is False
            with pytest.raises(OverloadedError, match="breaker is open"):
                client.infer("double", {"x": torch.zeros(1, 4)})
            peer.start()
            wait_until(lambda: client.ping()["ready"] is True, "the breaker closes", timeout=30)
            x = torch.ones(1, 4)
            assert torch.equal(client.infer("double", {"x": x})["y"], x * 2 + 1)
    finally:
        local.stop()
        peer.stop()
