"""TensorBridge vs HTTP+JSON, HTTP+binary and the raw floors, side by side in one run.

    python bench/run.py            # full run (make bench), several minutes
    python bench/run.py --quick    # every scenario with tiny sample counts (make bench-quick)

The machine is shared and noisy, so variants are interleaved in blocks (A B C A B C ...),
each repeat reports p50/p99 per variant, ratios are taken within a repeat, and the summary
is the median over repeats. Results: bench/results/<timestamp>.json, docs/benchmarks.md and
docs/img/*.png. Nothing here asserts timing: goals are reported as met / missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import network
import probe
import swap
import text
import vision

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PHP_CLIENT = BENCH / "php" / "client.php"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def summarize(samples: list[float]) -> dict[str, float]:
    """p50 / p99 / mean of microsecond samples."""
    s = sorted(samples)
    if not s:
        return {"n": 0, "p50": float("nan"), "p99": float("nan"), "mean": float("nan")}

    def pick(q: float) -> float:
        return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]

    return {"n": len(s), "p50": pick(0.5), "p99": pick(0.99), "mean": statistics.fmean(s)}


@dataclass
class Services:
    """Every server the benchmark talks to, started and stopped by the harness itself."""

    threads: int
    device: str
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tb-bench-")))
    procs: list[subprocess.Popen] = field(default_factory=list)
    http_port: int = 0

    @property
    def tb_socket(self) -> str:
        return str(self.tmp / "tb.sock")

    @property
    def floor_socket(self) -> str:
        return str(self.tmp / "floor.sock")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _spawn(self, name: str, args: list[str], ready: str | None = None) -> subprocess.Popen:
        """Start a server with its output in <tmp>/<name>.log; wait for ``ready`` there."""
        logfile = self.tmp / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(  # for `vision` (S4's models)
            filter(None, [str(BENCH), os.environ.get("PYTHONPATH")])),
            # what `import tensorbridge` sets for its server, given to every peer alike
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        with logfile.open("w") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, text=True,
                                    env=env)
        self.procs.append(proc)
        deadline = time.monotonic() + 120
        while ready and ready not in logfile.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{logfile.read_text()}")
            time.sleep(0.05)
        return proc

    def start(self) -> None:
        log("starting servers: tensorbridge, uvicorn (FastAPI), floor ...")
        self.jpeg = str(self.tmp / "photo.jpg")
        vision.make_jpeg(self.jpeg)
        self.tb = self._spawn("tensorbridge", [sys.executable, "-m", "tensorbridge", "serve", "--socket",
                               self.tb_socket, "--threads", str(self.threads), "--device",
                               self.device, "--log-level",
                               "info", "--model", "echo=tensorbridge.models.testing:echo",
                               "--model", "head=tensorbridge.models.testing:head",
                               "--model", "resnet=vision:resnet18",
                               "--model", "jpeg=vision:jpeg_resnet18"], "ready on")
        self.floor = self._spawn("floor", [sys.executable, str(BENCH / "floor_server.py"),
                                  self.floor_socket], "ready")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.http_port = s.getsockname()[1]
        self.http = self._spawn("uvicorn", [sys.executable, str(BENCH / "http_app.py"), "--port",
                                 str(self.http_port), "--threads", str(self.threads),
                                 "--device", self.device])
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.url + "/docs", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or self.http.poll() is not None:
                    raise RuntimeError("uvicorn did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def cpu_seconds(self, proc: subprocess.Popen) -> float:
        """user+system CPU time a server has used so far."""
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def job(self, mode: str) -> dict[str, Any]:
        job: dict[str, Any] = {"mode": mode, "url": self.url, "jpeg": self.jpeg}
        if mode.startswith("tb_") or mode == "seed_gd":
            job["socket"] = self.tb_socket
        if mode.startswith("floor_"):
            job["floor"] = self.floor_socket
        return job


def run_php(job: dict[str, Any], client: Path = PHP_CLIENT) -> dict[str, Any]:
    proc = subprocess.run(["php", "-d", "memory_limit=1G", str(client)],
                          input=json.dumps(job), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"PHP client failed for {job['mode']}: {proc.stderr or proc.stdout}")
    return json.loads(proc.stdout)


def latency_scenario(svc: Services, name: str, variants: dict[str, int], repeats: int,
                     blocks: int, warmup: int,
                     direct: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Interleaved blocks per repeat; returns one {variant: summary} per repeat.

    ``direct`` maps variant names to Python functions (n -> samples) run in this process
    instead of a PHP client, interleaved like the others."""
    direct = direct or {}
    out = []
    names = list(variants)
    for rep in range(repeats):
        samples: dict[str, list[float]] = {v: [] for v in names}
        extra: dict[str, list[float]] = {v: [] for v in names}
        for b in range(blocks):
            order = names[b % len(names):] + names[:b % len(names)]
            for v in order:
                if v in direct:
                    samples[v] += direct[v](variants[v])
                    continue
                res = run_php({**svc.job(v), "n": variants[v], "warmup": warmup})
                samples[v] += res["samples_us"]
                extra[v] += res["extra_us"]
        summary = {v: summarize(samples[v]) for v in names}
        for v in names:
            if extra[v]:
                summary[v]["extra"] = summarize(extra[v])
        out.append(summary)
        log(f"[{name} repeat {rep + 1}/{repeats}] " + ", ".join(
            f"{v} p50 {summary[v]['p50']:.0f} us" for v in names))
    return out


class DirectJpeg:
    """S4's reference: preprocessing + ResNet-18 called directly, no transport, same threads."""

    def __init__(self, svc: Services) -> None:
        import torch

        torch.set_num_threads(svc.threads)
        self.torch = torch
        self.model = vision.jpeg_resnet18()
        self.jpeg = Path(svc.jpeg).read_bytes()
        for _ in range(3):
            self(1)

    def __call__(self, n: int) -> list[float]:
        out = []
        with self.torch.inference_mode():
            for _ in range(n):
                t = time.perf_counter()
                self.model([self.jpeg])
                out.append((time.perf_counter() - t) * 1e6)
        return out


def closed_loop(svc: Services, job: dict[str, Any], level: int, servers: list[Any],
                label: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``level`` PHP processes calling in a loop for ``job["duration"]`` s, started together
    after their warm-up: (row with req/s, p50, p99, CPU per request; raw client results)."""
    start = svc.tmp / ("start-" + re.sub(r"[^A-Za-z0-9]+", "_", label))
    job = {**job, "start": str(start)}
    workers = probe.start_workers(job, level)
    # Start the clock only when every process has finished its warm-up.
    deadline = time.monotonic() + 600
    while len(list(svc.tmp.glob(start.name + ".ready.*"))) < level:
        if time.monotonic() > deadline or workers.poll() is not None:
            raise RuntimeError(f"{label}: clients did not get ready")
        time.sleep(0.01)
    cpu0 = sum(svc.cpu_seconds(s) for s in servers)
    switches0 = sum(probe.voluntary_switches(s.pid) for s in servers)
    start.touch()
    results = probe.worker_results(workers, level)
    cpu1 = sum(svc.cpu_seconds(s) for s in servers)
    switches1 = sum(probe.voluntary_switches(s.pid) for s in servers)
    samples = [s for r in results for s in r["samples_us"]]
    wall = max(r["wall_us"] for r in results) / 1e6
    summary = summarize(samples)
    row = {"processes": level, "req_s": len(samples) / wall, "p50": summary["p50"],
           "p99": summary["p99"], "n": len(samples),
           "server_cpu_us_per_req": (cpu1 - cpu0) * 1e6 / max(1, len(samples)),
           # voluntary context switches of the server's threads: its wake-ups per request
           "server_switches_per_req": (switches1 - switches0) / max(1, len(samples)),
           "client_cpu_us_per_req": sum(r["cpu_us"] for r in results) / max(1, len(samples))}
    log(f"[{label}] {level:>2} processes: {row['req_s']:.1f} req/s, p50 {row['p50']:.0f} us, "
        f"p99 {row['p99']:.0f} us")
    return row, results


def server_cost(svc: Services, calls: int) -> dict[str, Any]:
    """G2: one PHP process makes ``calls`` tiny no-op requests; the server's CPU time per
    request (user + system, all threads, as getrusage counts it) and its wake-ups, beside the
    no-op model's own cost (its forward called here directly, same inputs)."""
    job = {**svc.job("tb_tiny"), "warmup": 200, "n": calls, "duration": 0}
    row, _ = closed_loop(svc, job, 1, [svc.tb], f"G2 server cost, {calls} calls")
    import torch

    import tensorbridge

    torch.set_num_threads(svc.threads)
    model = tensorbridge.load_model(tensorbridge.ModelConfig(
        name="echo", source="tensorbridge.models.testing:echo", warmup=0))
    x = {"x": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    for _ in range(200):
        model.forward(x)
    t0 = time.process_time()
    for _ in range(calls):
        model.forward(x)
    model_us = (time.process_time() - t0) * 1e6 / calls
    row["model_us_per_req"] = model_us
    row["path_cpu_us_per_req"] = row["server_cpu_us_per_req"] - model_us
    log(f"[G2] server CPU {row['server_cpu_us_per_req']:.1f} us/request, of which the no-op "
        f"model {model_us:.1f} us; {row['server_switches_per_req']:.2f} wake-ups/request")
    return row


def throughput(svc: Services, levels: list[int], modes: list[str], repeats: int,
               duration: float) -> list[dict[str, Any]]:
    """Concurrent PHP processes for ``duration`` s: req/s, p50, p99, CPU per request."""
    rows = []
    for rep in range(repeats):
        for level in levels:
            for mode in (modes if rep % 2 == 0 else modes[::-1]):
                server = svc.tb if mode.startswith("tb_") else svc.http
                warmup = 3 if "resnet" in mode else 20
                job = {**svc.job(mode), "warmup": warmup, "duration": duration}
                row, _ = closed_loop(svc, job, level, [server],
                                     f"S5 repeat {rep + 1}/{repeats} {mode} x{level}")
                rows.append({"repeat": rep, "mode": mode, **row})
    return rows


#: S7's servers: (name, torch threads, TOML models). ResNet-18 with batching off and on, as one
#: instance with 2 intra-op threads, as 2 thread instances with 1 each, and as 2 processes.
S7_DELAY_US = 2000
S7_BATCH = 16
_S7_ON = (f"max_batch_size = {S7_BATCH}\nmax_queue_delay_us = {S7_DELAY_US}\n"
          "max_queue = 1024\n")
S7_SERVERS = [
    ("s7-threads2", 2, f"[models.off]\nsource = \"vision:resnet18\"\n"
                       f"[models.on]\nsource = \"vision:resnet18\"\n{_S7_ON}"),
    ("s7-instances2", 1, f"[models.off]\nsource = \"vision:resnet18\"\ninstances = 2\n"
                         f"[models.on]\nsource = \"vision:resnet18\"\ninstances = 2\n{_S7_ON}"),
    ("s7-proc-a", 1, "[models.off]\nsource = \"vision:resnet18\"\n"),
    ("s7-proc-b", 1, "[models.off]\nsource = \"vision:resnet18\"\n"),
]
#: variant -> (servers, model)
S7_VARIANTS = {
    "off: 1 instance x 2 threads": (["s7-threads2"], "off"),
    "on: 1 instance x 2 threads": (["s7-threads2"], "on"),
    "off: 2 instances x 1 thread": (["s7-instances2"], "off"),
    "on: 2 instances x 1 thread": (["s7-instances2"], "on"),
    "off: 2 processes x 1 thread": (["s7-proc-a", "s7-proc-b"], "off"),
}


def batching(svc: Services, levels: list[int], repeats: int, duration: float
             ) -> list[dict[str, Any]]:
    """S7: ResNet-18 under 1..64 PHP processes, dynamic batching off vs on, thread instances
    vs processes; img/s, p50/p99 and the batch sizes the requests were computed in."""
    procs = {}
    for name, threads, toml in S7_SERVERS:
        config = svc.tmp / f"{name}.toml"
        config.write_text(toml)
        procs[name] = svc._spawn(name, [
            sys.executable, "-m", "tensorbridge", "serve", "--socket",
            str(svc.tmp / f"{name}.sock"), "--threads", str(threads), "--device", svc.device,
            "--log-level", "warning", "--config", str(config)], "ready on")
    rows = []
    try:
        for rep in range(repeats):
            for level in levels:
                variants = list(S7_VARIANTS.items())
                for variant, (servers, model) in (variants if rep % 2 == 0
                                                  else variants[::-1]):
                    job = {"mode": "tb_model", "model": model, "warmup": 2,
                           "duration": duration,
                           "sockets": [str(svc.tmp / f"{s}.sock") for s in servers]}
                    row, results = closed_loop(svc, job, level, [procs[s] for s in servers],
                                               f"S7 repeat {rep + 1}/{repeats} {variant} "
                                               f"x{level}")
                    sizes = [b for r in results for b in r["batch_sizes"]]
                    compute = [c for r in results for c in r["compute_us"]]
                    per_size: dict[int, int] = {}
                    for b in sizes:
                        per_size[b] = per_size.get(b, 0) + 1
                    calls = sum(n / b for b, n in per_size.items() if b)
                    rows.append({"repeat": rep, "variant": variant, **row,
                                 "batching": variant.startswith("on"),
                                 "requests_by_batch_size": {str(b): n for b, n in
                                                            sorted(per_size.items())},
                                 "mean_batch": len(sizes) / calls if calls else 0.0,
                                 "compute_p50": summarize(compute)["p50"] if compute else 0.0,
                                 "compute_p99": summarize(compute)["p99"] if compute else 0.0,
                                 "delay_us": S7_DELAY_US if variant.startswith("on") else 0})
    finally:
        for name in procs:
            procs[name].send_signal(signal.SIGTERM)
        for name in procs:
            procs[name].wait(30)
    return rows


def _wrk_value(text: str) -> float:
    """'1.23ms' -> microseconds."""
    for unit, scale in (("us", 1.0), ("ms", 1e3), ("s", 1e6)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)


def web_stack(svc: Services, repeats: int, duration: float) -> list[dict[str, Any]]:
    """wrk -> nginx -> PHP-FPM page -> model, per transport (S6)."""
    nginx, fpm, wrk = (shutil.which(x) for x in ("nginx", "php-fpm8.2", "wrk"))
    if not (nginx and fpm and wrk):
        log("S6 skipped: needs nginx, php-fpm8.2 and wrk (apt-get install nginx-light wrk)")
        return []
    tmp = svc.tmp / "web"
    tmp.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp / "fpm.conf").write_text(f"""[global]
error_log = {tmp}/fpm.log
daemonize = no
[www]
user = root
group = root
listen = {tmp}/fpm.sock
pm = static
pm.max_children = 8
""")
    (tmp / "nginx.conf").write_text(f"""daemon off;
user root;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx.err;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; fastcgi_temp_path {tmp}/fcgi;
  proxy_temp_path {tmp}/proxy; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  upstream fpm {{ server unix:{tmp}/fpm.sock; }}
  server {{
    listen 127.0.0.1:{port};
    root {BENCH}/php;
    location ~ \\.php$ {{
      include /etc/nginx/fastcgi_params;
      fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;
      fastcgi_pass fpm;
    }}
  }}
}}
""")
    procs = [subprocess.Popen([fpm, "-R", "-F", "-y", str(tmp / "fpm.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen([nginx, "-c", str(tmp / "nginx.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    rows = []
    try:
        base = f"http://127.0.0.1:{port}/page.php?socket={svc.tb_socket}&url={svc.url}"
        deadline = time.monotonic() + 20
        while True:
            try:
                body = urllib.request.urlopen(base + "&via=tb", timeout=2).read()
                assert b"top" in body, body
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("nginx + php-fpm did not come up") from None
                time.sleep(0.1)
        for rep in range(repeats):
            for via in ("tb", "json", "binary") if rep % 2 == 0 else ("binary", "json", "tb"):
                out = subprocess.run([wrk, "-t2", "-c8", f"-d{duration}s", "--latency",
                                      f"{base}&via={via}"], capture_output=True, text=True,
                                     timeout=600).stdout
                row: dict[str, Any] = {"repeat": rep, "via": via}
                for line in out.splitlines():
                    parts = line.split()
                    if line.startswith("Requests/sec:"):
                        row["req_s"] = float(parts[1])
                    elif len(parts) == 2 and parts[0] in ("50%", "99%"):
                        row["p" + parts[0][:-1]] = _wrk_value(parts[1])
                    elif "Non-2xx" in line or "Socket errors" in line:
                        row["errors"] = line.strip()
                rows.append(row)
                log(f"[S6 repeat {rep + 1}/{repeats}] via {via}: {row.get('req_s', 0):.0f} req/s, "
                    f"p50 {row.get('p50', 0):.0f} us, p99 {row.get('p99', 0):.0f} us")
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    return rows


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _s5_rate(s5: list[dict[str, Any]], rep: int, mode: str, level: int) -> float | None:
    rows = [r["req_s"] for r in s5 if r["repeat"] == rep and r["mode"] == mode
            and r["processes"] == level]
    return rows[0] if rows else None


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Goals G1-G6 (the fast-path targets), each with its ratio per repeat (median shown)."""
    s1, s2, s3, s5 = results["S1"], results["S2"], results["S3"], results["S5"]
    out = []

    def goal(name: str, ratios: list[float], target: float, higher_is_better: bool,
             detail: str) -> None:
        if not ratios:
            out.append({"goal": name, "ratio": None, "per_repeat": [], "target": target,
                        "met": None, "detail": "not measured in this run"})
            return
        value = _med(ratios)
        met = value >= target if higher_is_better else value <= target
        out.append({"goal": name, "ratio": value, "per_repeat": ratios, "target": target,
                    "met": bool(met), "detail": detail})

    goal("G1a 16 B no-op p50 <= 1/3 of HTTP+binary's",
         [r["tb_tiny"]["p50"] / r["http_binary_tiny"]["p50"] for r in s1], 1 / 3, False,
         "TensorBridge p50 / HTTP+binary p50")
    goal("G1b 16 B no-op p50 <= 4x the raw floor",
         [r["tb_tiny"]["p50"] / r["floor_uds"]["p50"] for r in s1], 4.0, False,
         "TensorBridge p50 / raw Unix-socket ping-pong p50")
    g2 = results.get("G2")
    goal("G2 server CPU per tiny request, model excluded <= 25 µs",
         [g2["path_cpu_us_per_req"]] if g2 else [], 25.0, False,
         f"µs of server CPU per request over {g2['n'] if g2 else 0} requests from one PHP "
         f"process ({g2['server_cpu_us_per_req'] if g2 else 0:.0f} µs in all, the no-op "
         f"model {g2['model_us_per_req'] if g2 else 0:.0f} µs; "
         f"{g2['server_switches_per_req'] if g2 else 0:.2f} wake-ups per request)")
    reps = sorted({r["repeat"] for r in s5})
    for level in (16, 64):
        ratios = []
        for rep in reps:
            tb, http = (_s5_rate(s5, rep, m, level) for m in ("tb_tiny", "http_json_tiny"))
            if tb and http:
                ratios.append(tb / http)
        goal(f"G3 no-op at {level} PHP processes >= 3x uvicorn's req/s", ratios, 3.0, True,
             "TensorBridge req/s / HTTP+JSON (uvicorn) req/s")
    ratios = []
    for rep in reps:
        rates = {r["processes"]: r["req_s"] for r in s5
                 if r["repeat"] == rep and r["mode"] == "tb_tiny"}
        if 64 in rates:
            ratios.append(rates[64] / max(rates.values()))
    goal("G3 no collapse: req/s at 64 >= 90% of the best concurrency's", ratios, 0.9, True,
         "TensorBridge req/s at 64 processes / its best req/s at any level")
    goal("G4 602,112 B p50 >= 5x faster than HTTP+binary",
         [r["http_binary_large"]["p50"] / r["tb_large"]["p50"] for r in s2], 5.0, True,
         "HTTP+binary p50 / TensorBridge p50 (602,112 B in, 4 KB out; the model is ~free)")
    # fromArray is timed on its own inside the S3 call; the whole call minus pack would add a
    # 602,112-byte round trip (S2's figure) that is not fromArray's.
    goal("G5 fromArray of 150,528 floats <= pack + 1 ms",
         [(r["tb_array"]["extra"]["p50"] - r["pack_only"]["p50"]) / 1000 for r in s3], 1.0, False,
         "(Tensor::fromArray p50 - pack('g*') p50), ms; the whole S3 call minus pack: "
         + ", ".join(f"{(r['tb_array']['p50'] - r['pack_only']['p50']) / 1000:.2f}" for r in s3)
         + " ms")
    ratios = []
    for rep in reps:
        tb, http = (_s5_rate(s5, rep, m, 16) for m in ("tb_resnet", "http_binary_resnet"))
        if tb and http:
            ratios.append(tb / http)
    goal("G6a ResNet-18 at 16 callers >= HTTP+binary's img/s", ratios, 1.0, True,
         "TensorBridge img/s / HTTP+binary img/s, same torch threads")
    s7 = results.get("S7", [])
    ratios = []
    for rep in {row["repeat"] for row in s7}:
        at16 = {row["variant"]: row["req_s"] for row in s7
                if row["repeat"] == rep and row["processes"] == 16}
        on, off = at16.get("on: 1 instance x 2 threads"), at16.get("off: 1 instance x 2 threads")
        if on and off:
            ratios.append(on / off)
    goal("G6b batching still >= 1.3x unbatched (ResNet-18, 16 processes)", ratios, 1.3, True,
         "img/s with dynamic batching / without (1 instance, 2 torch threads)")
    vs_http, vs_ceiling = text.goal_ratios(results.get("S8", []))
    goal("S8 text at 16 PHP processes >= 2x FastAPI + sentence-transformers' sentences/s",
         vs_http, 2.0, True, "TensorBridge sentences/s / FastAPI's (all-MiniLM-L6-v2)")
    goal("S8 text at 16 PHP processes >= 80% of in-process sentence-transformers", vs_ceiling,
         0.8, True, "TensorBridge sentences/s / sentence-transformers in-process, batches of 16")
    if results.get("S10"):
        goal(f"S10 p99 of PHP callers during swaps <= p99 without + {swap.GOAL_MS:g} ms",
             [results["S10"]["p99_added_ms"]], swap.GOAL_MS, False,
             "p99 during back-to-back reloads - p99 without, in ms")
    for name, ratios, detail in network.goal_ratios(results["S9"]) if results.get("S9") else ():
        goal(name, ratios, 1.0, False, detail)
    s4 = results["S4"]
    goal("S4 overhead beyond preprocessing + model <= 0.3 ms",
         [r["tb_jpeg"]["extra"]["p50"] / 1000 for r in s4], 0.3, False,
         "TensorBridge round trip - server-measured queue + preprocessing + model, in ms")
    goal("S4 >= 2.5x faster than the seed's GD path",
         [r["seed_gd"]["p50"] / r["tb_jpeg"]["p50"] for r in s4], 2.5, True,
         "PHP GD preprocessing + pack + TensorBridge p50 / JPEG through TensorBridge p50")
    return out


def machine() -> dict[str, Any]:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().split()[1]
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": f"Linux {platform.release()}",
            "mem_gib": round(int(mem) / 2**20, 1), "host": platform.node()}


def versions() -> dict[str, str]:
    import fastapi
    import torch
    import uvicorn

    import tensorbridge

    php = subprocess.run(["php", "-r", "echo PHP_VERSION;"], capture_output=True,
                         text=True).stdout
    return {"tensorbridge": tensorbridge.__version__, "PHP": php,
            "Python": platform.python_version(), "torch": torch.__version__.split("+")[0],
            "uvicorn": uvicorn.__version__, "fastapi": fastapi.__version__}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sample counts: checks that every scenario runs")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on every server")
    parser.add_argument("--device", default="cpu", help="cuda runs S4/S5 models on a GPU")
    parser.add_argument("--out", default=str(BENCH / "results"))
    parser.add_argument("--docs", default=str(ROOT / "docs"),
                        help="where benchmarks.md and img/ go ('' = nowhere)")
    parser.add_argument("--only", default="",
                        help="comma-separated scenarios (e.g. S7) for a partial run: no goals, "
                             "no docs")
    args = parser.parse_args()
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    quick = args.quick
    repeats = args.repeats or (1 if quick else 3)

    def n(full: Any, small: Any) -> Any:
        return small if quick else full

    svc = Services(args.threads, args.device)
    svc.start()
    results: dict[str, Any] = {}
    scenarios = {
        "S1": lambda: latency_scenario(svc, "S1", {
            "tb_tiny": n(1000, 20), "tb_tiny_spin": n(1000, 20), "http_json_tiny": n(500, 20),
            "http_orjson_tiny": n(500, 20), "http_binary_tiny": n(500, 20),
            "floor_uds": n(1000, 20), "floor_shm_tiny": n(1000, 20)},
            repeats, n(4, 1), n(200, 5)),
        "S2": lambda: latency_scenario(svc, "S2", {
            "tb_large": n(300, 5), "http_binary_large": n(150, 5),
            "http_json_large": n(8, 2), "http_orjson_large": n(8, 2),
            "floor_shm_large": n(300, 5)}, repeats, n(3, 1), n(20, 2)),
        "S3": lambda: latency_scenario(svc, "S3", {"tb_array": n(60, 3), "pack_only": n(60, 3)},
                                       repeats, n(3, 1), n(5, 1)),
        "S4": lambda: latency_scenario(svc, "S4", {
            "tb_jpeg": n(10, 1), "http_jpeg": n(10, 1), "seed_gd": n(10, 1),
            "direct_jpeg": n(10, 1)}, repeats, n(3, 1), n(2, 1),
            direct={"direct_jpeg": DirectJpeg(svc)}),
        "S5": lambda: throughput(svc, [1, 4, 16, 64] if not quick else [1, 4],
                                 ["tb_tiny", "http_json_tiny"], repeats, n(3.0, 0.3))
        + throughput(svc, [1, 4, 16] if not quick else [1],
                     ["tb_resnet", "http_binary_resnet"], repeats, n(5.0, 0.5)),
        "G2": lambda: server_cost(svc, n(10_000, 200)),
        "S6": lambda: web_stack(svc, repeats, n(5, 1)),
        "S7": lambda: batching(svc, [1, 4, 16, 64] if not quick else [2], n(2, 1),
                               n(6.0, 0.5)),
        "S8": lambda: text.scenario(svc, repeats, n(5.0, 0.5), quick),
        "S9": lambda: network.scenario(svc, latency_scenario, run_php, repeats, quick),
        "S10": lambda: swap.scenario(args.threads, repeats, n(3.0, 0.5), quick),
    }
    try:
        for name, scenario in scenarios.items():
            if not only or name in only:
                results[name] = scenario()
    finally:
        svc.stop()
    record = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine(), "versions": versions(),
              "config": {"quick": quick, "repeats": repeats, "threads": args.threads,
                         "device": args.device}, **results}
    record["goals"] = goals(record) if not only else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"{stamp}{'-quick' if quick else ''}{'-partial' if only else ''}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    log(f"\nresults: {path}")
    for g in record["goals"]:
        verdict = "pending" if g["met"] is None else ("met" if g["met"] else "missed")
        ratio = "" if g["met"] is None else f" {g['ratio']:.3g} (target {g['target']:g})"
        print(f"{verdict:>7}: {g['goal']}{ratio}")
    if args.docs and not only:
        import report

        report.main(str(path), Path(args.docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
