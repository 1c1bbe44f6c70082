"""Server cost per request: CPU time and wake-ups (voluntary context switches) per call.

    python bench/probe.py [--processes 1,16] [--duration 3] [--mode tb_tiny]

Starts a ``tensorbridge serve`` with the echo and head models, runs N PHP processes calling it
in a closed loop, and reads the server's CPU ticks (/proc/<pid>/stat) and its threads'
voluntary context switches (/proc/<pid>/task/*/status) before and after. A voluntary switch
is a thread going to sleep, so switches per request count the wake-ups the request path costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
PHP_WORKERS = BENCH / "php" / "workers.php"


def family(pid: int) -> list[int]:
    """A server process and its worker processes (``--workers``)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *map(int, children)]


def cpu_ticks(pid: int) -> int:
    """user + system clock ticks of a server (all its threads and workers)."""
    total = 0
    for p in family(pid):
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


def voluntary_switches(pid: int) -> int:
    """Voluntary context switches summed over the live threads of a server and its workers."""
    total = 0
    for p in family(pid):
        for task in Path(f"/proc/{p}/task").iterdir():
            try:
                for line in (task / "status").read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches"):
                        total += int(line.split()[1])
            except FileNotFoundError:
                pass  # the thread ended meanwhile
    return total


def start_workers(job: dict[str, Any], processes: int) -> subprocess.Popen[str]:
    """``processes`` PHP workers running client.php with ``job``, forked from one PHP process
    after it compiled the library, as PHP-FPM forks its workers (bench/php/workers.php)."""
    proc = subprocess.Popen(["php", str(PHP_WORKERS)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps({**job, "processes": processes}))
    proc.stdin.close()
    proc.stdin = None  # communicate() must not flush it again
    return proc


def worker_results(workers: subprocess.Popen[str], processes: int) -> list[dict[str, Any]]:
    """Each worker's JSON result, once all have finished."""
    out = workers.communicate(timeout=900)[0]
    results = [json.loads(line) for line in out.splitlines() if line.strip()]
    if workers.returncode != 0 or len(results) != processes:
        raise RuntimeError(f"PHP workers failed: {len(results)} of {processes} results, "
                           f"exit status {workers.returncode}")
    return results


def start_server(tmp: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    sock = str(tmp / "tb.sock")
    logfile = (tmp / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "tensorbridge", "serve", "--socket", sock,
                             "--threads", "1", "--warmup", "0",
                             "--model", "echo=tensorbridge.models.testing:echo",
                             "--model", "head=tensorbridge.models.testing:head", *extra],
                            stdout=logfile, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while "ready on" not in (tmp / "server.log").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((tmp / "server.log").read_text())
        time.sleep(0.05)
    return proc, sock


def measure(pid: int, sock: str, tmp: Path, mode: str, processes: int, duration: float
            ) -> dict[str, float]:
    """One closed-loop run; per-request figures of the server process."""
    start = tmp / f"start-{processes}-{time.monotonic_ns()}"
    job = {"mode": mode, "socket": sock, "warmup": 50, "duration": duration,
           "start": str(start)}
    workers = start_workers(job, processes)
    while len(list(tmp.glob(start.name + ".ready.*"))) < processes:
        if workers.poll() is not None:
            raise RuntimeError("a PHP client failed")
        time.sleep(0.01)
    ticks0, switches0 = cpu_ticks(pid), voluntary_switches(pid)
    start.touch()
    results = worker_results(workers, processes)
    ticks1, switches1 = cpu_ticks(pid), voluntary_switches(pid)
    calls = sum(len(r["samples_us"]) for r in results)
    wall = max(r["wall_us"] for r in results) / 1e6
    samples = sorted(s for r in results for s in r["samples_us"])
    return {"processes": processes, "calls": calls, "req_s": calls / wall,
            "p50_us": samples[len(samples) // 2],
            "server_cpu_us_per_req": (ticks1 - ticks0) / os.sysconf("SC_CLK_TCK") * 1e6 / calls,
            "switches_per_req": (switches1 - switches0) / calls,
            "client_cpu_us_per_req": sum(r["cpu_us"] for r in results) / calls}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,16")
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--mode", default="tb_tiny")
    parser.add_argument("server_args", nargs="*", help="extra `tensorbridge serve` flags")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tb-probe-") as tmpdir:
        tmp = Path(tmpdir)
        proc, sock = start_server(tmp, args.server_args)
        try:
            for level in (int(x) for x in args.processes.split(",")):
                row = measure(proc.pid, sock, tmp, args.mode, level, args.duration)
                print(json.dumps({k: round(v, 2) for k, v in row.items()}), flush=True)
        finally:
            proc.terminate()
            proc.wait(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
