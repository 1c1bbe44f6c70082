"""S9: past one host. The same tiny (16 B) and 602,112 B calls over every path, in one run:

* ``socket``: PHP -> the Unix socket -> TensorBridge (shared memory; S1/S2's path)
* ``rest``: PHP's HttpTransport -> TensorBridge's REST listener (OIP v2, binary tensors)
* ``rest_curl``: PHP ``curl_exec`` of a prebuilt OIP binary request -> the REST listener: the
  same client work as the FastAPI row, so the two compare the servers alone (the goal)
* ``grpc``: Python's ``tritonclient.grpc`` -> TensorBridge's gRPC listener
* ``remote``: PHP -> the local socket -> TensorBridge on host A, whose remote backend forwards
  over gRPC to TensorBridge on host B; A and B are two network namespaces of this machine
  joined by a veth pair (no real network: add your round trip time)
* ``fastapi``: PHP -> bench/http_app.py's binary route (S1/S2's HTTP+binary peer)

The models do the FastAPI peer's work: ``tiny`` = ``testing:identity`` (x FP32 [1, 4] back
unchanged, as the peer's ``echo``, but with a declared signature, which the remote backend
takes from the remote's metadata) and ``head`` = ``testing:head`` (602,112 B in, 4 KB out).
Goal: the REST listener is no slower than the FastAPI binary peer, both called by the same
``curl_exec`` of a prebuilt body.

    python bench/run.py --only S9
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
PHP_CLIENT = BENCH / "php" / "network.php"
SIZES = ("tiny", "large")
PATHS = ("socket", "rest", "rest_curl", "grpc", "remote", "fastapi")
LABELS = {"socket": "PHP -> Unix socket (shared memory)",
          "rest": "PHP HttpTransport -> REST listener (OIP, binary)",
          "rest_curl": "PHP curl_exec -> REST listener (OIP, binary)",
          "grpc": "Python tritonclient -> gRPC listener",
          "remote": "PHP -> socket -> remote backend -> gRPC across netns",
          "fastapi": "PHP -> FastAPI binary peer (S1/S2)"}
MODELS = """[models.tiny]
source = "tensorbridge.models.testing:identity"
[models.head]
source = "tensorbridge.models.testing:head"
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ip(*args: str) -> bool:
    return subprocess.run(["ip", *args], capture_output=True).returncode == 0


class Hosts:
    """Two network namespaces joined by a veth pair; ``close`` deletes them."""

    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.a, self.b = f"tbbench{tag}a", f"tbbench{tag}b"
        self.ip_b = f"10.78.{tag % 250}.2"
        self.made = _ip("netns", "add", self.a)
        if not self.made:
            return
        steps = [("netns", "add", self.b),
                 ("link", "add", f"vb{tag}a", "netns", self.a, "type", "veth", "peer", "name",
                  f"vb{tag}b", "netns", self.b),
                 ("-n", self.a, "addr", "add", f"10.78.{tag % 250}.1/24", "dev", f"vb{tag}a"),
                 ("-n", self.b, "addr", "add", f"{self.ip_b}/24", "dev", f"vb{tag}b"),
                 ("-n", self.a, "link", "set", f"vb{tag}a", "up"),
                 ("-n", self.b, "link", "set", f"vb{tag}b", "up"),
                 ("-n", self.a, "link", "set", "lo", "up"),
                 ("-n", self.b, "link", "set", "lo", "up")]
        self.made = all(_ip(*step) for step in steps)

    def close(self) -> None:
        for ns in (self.a, self.b):
            _ip("netns", "del", ns)


def grpc_samples(port: int, size: str, n: int, warmup: int) -> list[float]:
    """``tritonclient.grpc`` calls, in a process of its own (it registers the ``inference``
    protobuf package, which nothing else may in one process)."""
    out = subprocess.run([sys.executable, __file__, "grpc-client", str(port), size, str(n),
                          str(warmup)], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"tritonclient run failed: {out.stderr}")
    return list(json.loads(out.stdout)["samples_us"])


def _grpc_client(port: int, size: str, n: int, warmup: int) -> None:
    import time

    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    if size == "large":
        name, x = "head", np.arange(602112 // 4, dtype=np.float32).reshape(1, 3, 224, 224) % 255
        inp = grpcclient.InferInput("input", [1, 3, 224, 224], "FP32")
    else:
        name, x = "tiny", np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
        inp = grpcclient.InferInput("x", [1, 4], "FP32")
    samples = []
    for i in range(warmup + n):
        t = time.perf_counter()
        inp.set_data_from_numpy(x)
        client.infer(name, [inp]).as_numpy("output" if size == "large" else "x")
        if i >= warmup:
            samples.append((time.perf_counter() - t) * 1e6)
    client.close()
    print(json.dumps({"samples_us": samples}))


def scenario(svc: Any, latency: Callable[..., list[dict[str, Any]]],
             run_php: Callable[[dict[str, Any]], dict[str, Any]], repeats: int,
             quick: bool) -> dict[str, Any]:
    """Start the servers, run the variants interleaved (``latency``: run.latency_scenario),
    stop everything; the record report.py renders."""
    tmp = svc.tmp / "s9"
    tmp.mkdir()
    (tmp / "models.toml").write_text(MODELS)
    token = tmp / "token"
    token.write_text(secrets.token_hex(16))
    http_port, grpc_port, remote_port = _port(), _port(), _port()
    serve = [sys.executable, "-m", "tensorbridge", "serve", "--threads", str(svc.threads),
             "--log-level", "info"]
    procs = [svc._spawn("s9-edge", [*serve, "--socket", str(tmp / "edge.sock"), "--config",
                                     str(tmp / "models.toml"), "--http-port", str(http_port),
                                     "--grpc-port", str(grpc_port)], "ready on")]
    hosts = Hosts()
    note = ""
    cpu_us = float("nan")
    try:
        if hosts.made:
            procs.append(svc._spawn("s9-remote", [
                "ip", "netns", "exec", hosts.b, *serve, "--socket", str(tmp / "remote.sock"),
                "--config", str(tmp / "models.toml"), "--grpc-port", str(remote_port),
                "--grpc-host", hosts.ip_b, "--http-token-file", str(token)], "ready on"))
            (tmp / "local.toml").write_text("".join(
                f'[models.{m}]\nremote = "grpc://{hosts.ip_b}:{remote_port}"\n'
                f'remote_token_file = "{token}"\n' for m in ("tiny", "head")))
            procs.append(svc._spawn("s9-local", [
                "ip", "netns", "exec", hosts.a, *serve, "--socket", str(tmp / "local.sock"),
                "--config", str(tmp / "local.toml")], "ready on"))
        else:
            note = "remote skipped: `ip netns add` is not permitted here"

        def php(size: str, **where: str) -> Callable[[int], list[float]]:
            def run(n: int) -> list[float]:
                return list(run_php({**where, "size": size, "n": n, "warmup": 5}, PHP_CLIENT
                                    )["samples_us"])
            return run

        direct: dict[str, Callable[[int], list[float]]] = {}
        counts: dict[str, int] = {}
        for size in SIZES:
            n = (5 if quick else 300) if size == "large" else (20 if quick else 1000)
            where = {"socket": {"endpoint": str(tmp / "edge.sock")},
                     "rest": {"endpoint": f"http://127.0.0.1:{http_port}"},
                     "rest_curl": {"oip": f"http://127.0.0.1:{http_port}"},
                     "remote": {"endpoint": str(tmp / "local.sock")},
                     "fastapi": {"fastapi": svc.url}}
            for path in PATHS:
                if path == "remote" and not hosts.made:
                    continue
                key = f"{path}_{size}"
                counts[key] = n
                if path == "grpc":
                    direct[key] = (lambda n, s=size: grpc_samples(grpc_port, s, n, 5))
                else:
                    direct[key] = php(size, **where[path])
        blocks = 1 if quick else 3
        local = procs[-1] if hosts.made else None
        cpu0 = svc.cpu_seconds(local) if local else 0.0
        reps = latency(svc, "S9", counts, repeats, blocks, 0, direct=direct)
        if local is not None:  # warm-up calls included: 5 per PHP run
            calls = sum(r[k]["n"] + 5 * blocks for r in reps for k in r if k.startswith("remote"))
            cpu_us = (svc.cpu_seconds(local) - cpu0) * 1e6 / calls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        hosts.close()
    return {"reps": reps, "note": note, "local_cpu_us_per_remote_call": cpu_us}


def goal_ratios(record: dict[str, Any]) -> list[tuple[str, list[float], str]]:
    """(goal, ratio per repeat, detail) for run.goals: the REST listener vs the FastAPI peer."""
    out = []
    for size, label in (("tiny", "16 B"), ("large", "602,112 B")):
        ratios = [r[f"rest_curl_{size}"]["p50"] / r[f"fastapi_{size}"]["p50"]
                  for r in record["reps"] if f"rest_curl_{size}" in r and f"fastapi_{size}" in r]
        out.append((f"S9 REST listener {label} p50 <= the FastAPI binary peer's", ratios,
                    "REST listener p50 / FastAPI binary p50, both from PHP curl_exec of a "
                    "prebuilt body"))
    return out


def _fmt(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"


def _med(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")


def table(record: dict[str, Any]) -> str:
    """The S9 section of docs/benchmarks.md."""
    reps = record["reps"]
    lines = ["| path | 16 B p50 | 16 B p99 | 602,112 B p50 | 602,112 B p99 |",
             "|---|---:|---:|---:|---:|"]
    for path in PATHS:
        cells = []
        for size in SIZES:
            key = f"{path}_{size}"
            if key not in reps[0]:
                cells += ["–", "–"]
                continue
            cells += [_fmt(_med([r[key]["p50"] for r in reps])),
                      _fmt(_med([r[key]["p99"] for r in reps]))]
        lines.append(f"| {LABELS[path]} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    if "remote_tiny" in reps[0]:
        added = [_med([r[f"remote_{s}"]["p50"] - r[f"socket_{s}"]["p50"] for r in reps])
                 for s in SIZES]
        text += (f"\n\nThe remote backend adds {_fmt(added[0])} (16 B) and {_fmt(added[1])} "
                 "(602,112 B) per call to the local socket's p50, on a veth pair inside one "
                 "machine: a real network adds its round trip on top. The node-local server "
                 f"spent {_fmt(record.get('local_cpu_us_per_remote_call', float('nan')))} of CPU "
                 "per forwarded call (both sizes).")
    if record.get("note"):
        text += f"\n\n{record['note']}."
    return text + "\n\n![network paths](img/network.png)"


def plot(record: dict[str, Any], img: Path, plt: Any) -> None:
    """docs/img/network.png: p50 and p99 per path, both sizes."""
    reps = record["reps"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, size, title in zip(axes, SIZES, ("16 B in", "602,112 B in, 4 KB out"), strict=True):
        paths = [p for p in PATHS if f"{p}_{size}" in reps[0]]
        p50 = [_med([r[f"{p}_{size}"]["p50"] for r in reps]) for p in paths]
        p99 = [_med([r[f"{p}_{size}"]["p99"] for r in reps]) for p in paths]
        y = range(len(paths))
        ax.barh(y, p99, color="#cfd8e3", label="p99")
        ax.barh(y, p50, color=["#d9480f" if p in ("socket", "remote") else "#4c6ef5"
                               for p in paths], label="p50")
        ax.set_yticks(list(y), [LABELS[p] for p in paths], fontsize=8)
        if max(p99) / min(p50) > 20:  # p99 and p50 decades apart: log scale
            ax.set_xscale("log")
        ax.set_xlabel("µs per call" + (" (log scale)" if max(p99) / min(p50) > 20 else ""))
        ax.set_title(f"S9 {title}", fontsize=9)
        ax.invert_yaxis()
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img / "network.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if sys.argv[1:2] == ["grpc-client"]:
        _grpc_client(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
