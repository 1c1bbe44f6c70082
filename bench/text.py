"""S8: sentence embeddings (all-MiniLM-L6-v2) from 1, 4 and 16 PHP processes, one sentence
per request: TensorBridge (``minilm`` with dynamic batching) against a FastAPI +
sentence-transformers JSON service (what a team would otherwise run) and against
sentence-transformers called in-process from Python, batches of as many sentences as there
are processes (the ceiling), in one run.

    python bench/run.py --only S8           # through the harness
    python bench/text.py --serve-http PORT  # the FastAPI service alone

The sentences are CPython's ``pydoc_data.topics`` (real English on every machine), cut at
full stops: 5 to 40 words each, in a fixed order.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
PHP_TEXT = BENCH / "php" / "text.php"
LEVELS = [1, 4, 16]
#: torch intra-op threads on every side: 0 = torch's default (all cores), what each of the
#: three would run with out of the box; TB_S8_THREADS=1 gives each one thread (on a busy
#: shared VM, OpenMP teams of 2 threads can stall for hundreds of ms). The harness's
#: --threads (1 for S1-S7) is not used.
THREADS = int(os.environ.get("TB_S8_THREADS", "0"))
#: TensorBridge's model: batching as in examples/minilm.toml; TB_S8_INSTANCES copies of it
#: (S7: on a CPU, 2 instances of 1 thread beat 1 instance of 2).
TOML = f"""[models.minilm]
source = "tensorbridge.models.minilm:create"
max_batch_size = 64
max_queue_delay_us = 2000
max_queue = 1024
instances = {int(os.environ.get("TB_S8_INSTANCES", "2"))}
"""


#: What the S8 table says about the run (docs/benchmarks.md).
SETUP = """Same machine, same sentences (CPython's `pydoc_data` topics cut at full stops, 5-40
words, ~33 tokens on average), same PHP processes, one sentence per request, the three variants
interleaved in one run. **TensorBridge**: `minilm` as in `examples/minilm.toml` (dynamic
batching, 2 instances sharing the cores; ONNX Runtime's fused fp32 kernels, merged texts cut
into calls of similar lengths). **FastAPI**: what a team would run: sentence-transformers with
its default settings behind a sync FastAPI endpoint under uvicorn, one `encode()` per request.
**In-process**: sentence-transformers called from Python in batches of as many sentences as
there are processes (no IPC, no HTTP). *server CPU ms/sentence* is the server process's CPU
time per answered sentence (compute per sentence: what a 2-core machine divides by)."""


def sentences(limit: int = 2000) -> list[str]:
    """Real English sentences of 5 to 40 words, in a fixed order."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for piece in re.split(r"(?<=[.!?])\s+", " ".join(topics[name].split())):
            if 5 <= len(piece.split()) <= 40:
                out.append(piece)
                if len(out) == limit:
                    return out
    return out


def summarize(samples: list[float]) -> dict[str, float]:
    """p50 / p99 of microsecond samples."""
    s = sorted(samples)
    if not s:
        return {"p50": float("nan"), "p99": float("nan")}
    return {"p50": s[int(0.5 * (len(s) - 1) + 0.5)], "p99": s[int(0.99 * (len(s) - 1) + 0.5)]}


def _load_st(threads: int) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    from tensorbridge.models.minilm import bundled_folder

    if threads > 0:
        torch.set_num_threads(threads)
    return SentenceTransformer(str(bundled_folder()), device="cpu")


def serve_http(port: int, threads: int) -> None:
    """FastAPI + sentence-transformers: POST /embed {"texts": [...]} -> {"embeddings": ...}."""
    import uvicorn
    from fastapi import Body, FastAPI

    model = _load_st(threads)
    app = FastAPI()

    @app.post("/embed")
    def embed(texts: list[str] = Body(..., embed=True)) -> dict[str, Any]:  # noqa: B008
        # A sync endpoint: FastAPI runs it in its thread pool, one encode() per request.
        vectors = model.encode(texts, normalize_embeddings=True)
        return {"embeddings": vectors.tolist()}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="info", access_log=False)


def _start(svc: Any) -> dict[str, Any]:
    """The TensorBridge server and the FastAPI service, spawned by the harness's ``svc``."""
    config = svc.tmp / "s8.toml"
    config.write_text(TOML)
    socket_path = str(svc.tmp / "s8.sock")
    metrics, port = _free_port(), _free_port()
    tb = svc._spawn("s8-tensorbridge", [
        sys.executable, "-m", "tensorbridge", "serve", "--socket", socket_path,
        "--threads", str(THREADS), "--log-level", "info", "--config", str(config),
        "--metrics-port", str(metrics)], "ready on")
    http = svc._spawn("s8-fastapi", [sys.executable, str(Path(__file__)), "--serve-http",
                                     str(port), "--threads", str(THREADS)],
                      "Application startup complete")
    return {"socket": socket_path, "url": f"http://127.0.0.1:{port}/embed",
            "procs": [tb, http], "tmp": svc.tmp, "tb": tb, "http": http,
            "metrics": f"http://127.0.0.1:{metrics}/metrics"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _batches(url: str) -> tuple[float, float]:
    """(model calls, rows) of minilm so far, from the server's Prometheus histogram."""
    import urllib.request

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("tensorbridge_batch_size_") and 'model="minilm"' in line:
            values[line.split("{")[0].rsplit("_", 1)[1]] = float(line.rsplit(" ", 1)[1])
    return values.get("count", 0.0), values.get("sum", 0.0)


def _php_loop(stack: dict[str, Any], mode: str, level: int, duration: float, corpus: Path,
              label: str) -> dict[str, Any]:
    """``level`` PHP processes embedding one sentence per request for ``duration`` s."""
    start = stack["tmp"] / f"start-{label}"
    job = {"mode": mode, "socket": stack["socket"], "url": stack["url"], "sentences": str(corpus),
           "warmup": 3, "duration": duration, "start": str(start)}
    procs = []
    for i in range(level):
        p = subprocess.Popen(["php", str(PHP_TEXT)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert p.stdin is not None
        p.stdin.write(json.dumps({**job, "offset": i * 97}))
        p.stdin.close()
        p.stdin = None
        procs.append(p)
    deadline = time.monotonic() + 600
    while len(list(stack["tmp"].glob(start.name + ".ready.*"))) < level:
        if time.monotonic() > deadline or any(p.poll() for p in procs):
            raise RuntimeError(f"S8 {label}: clients did not get ready: " + "".join(
                p.communicate()[1] for p in procs if p.poll()))
        time.sleep(0.01)
    server = stack["tb" if mode == "tb" else "http"].pid
    cpu0 = _cpu_seconds(server)
    calls0 = _batches(stack["metrics"]) if mode == "tb" else (0.0, 0.0)
    start.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"S8 {label}: PHP client failed: {err or out}")
        results.append(json.loads(out))
    # The server's CPU per sentence, warm-ups of the clients excluded: the cost a CPU-bound
    # machine divides by, and a figure that noise from other processes does not inflate.
    cpu = _cpu_seconds(server) - cpu0
    samples = [s for r in results for s in r["samples_us"]]
    wall = max(r["wall_us"] for r in results) / 1e6
    row = {"sentences_s": len(samples) / wall, **summarize(samples), "n": len(samples),
           "server_cpu_ms": 1000 * cpu / max(1, len(samples))}
    if mode == "tb":
        calls, rows = (b - a for a, b in zip(calls0, _batches(stack["metrics"]), strict=True))
        row["mean_batch"] = rows / calls if calls else float("nan")
    return row


def _in_process(model: Any, texts: list[str], level: int, duration: float) -> dict[str, Any]:
    """sentence-transformers in this process: batches of ``level`` sentences, back to back."""
    model.encode(texts[:level], normalize_embeddings=True)  # warm-up
    samples, done, i = [], 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < duration:
        batch = [texts[(i + k) % len(texts)] for k in range(level)]
        i += level
        t = time.perf_counter()
        model.encode(batch, batch_size=level, normalize_embeddings=True)
        samples.append((time.perf_counter() - t) * 1e6)
        done += level
    wall = time.perf_counter() - t0
    return {"sentences_s": done / wall, **summarize(samples), "n": done}


def scenario(svc: Any, repeats: int, duration: float, quick: bool) -> list[dict[str, Any]]:
    """S8 rows: one per (repeat, variant, processes), variants interleaved per level."""
    corpus = svc.tmp / "s8-sentences.json"
    texts = sentences()
    corpus.write_text(json.dumps(texts))
    levels = [1, 4] if quick else LEVELS
    print("S8: starting TensorBridge (minilm) and FastAPI + sentence-transformers ...",
          file=sys.stderr, flush=True)
    stack = _start(svc)
    model = _load_st(THREADS)
    rows = []
    try:
        for rep in range(repeats):
            for level in levels:
                variants = ["tensorbridge", "fastapi", "in-process"]
                for variant in variants if rep % 2 == 0 else variants[::-1]:
                    label = f"r{rep}-{variant}-{level}"
                    if variant == "in-process":
                        row = _in_process(model, texts, level, duration)
                    else:
                        row = _php_loop(stack, "tb" if variant == "tensorbridge" else "http",
                                        level, duration, corpus, label)
                    rows.append({"repeat": rep, "variant": variant, "processes": level,
                                 "torch_threads": THREADS, **row})
                    extra = "".join(f", {k} {row[k]:.1f}" for k in ("server_cpu_ms", "mean_batch")
                                    if k in row)
                    print(f"[S8 repeat {rep + 1}/{repeats}] {variant:>12} x{level:<2}: "
                          f"{row['sentences_s']:.1f} sentences/s, p50 {row['p50'] / 1000:.1f} ms,"
                          f" p99 {row['p99'] / 1000:.1f} ms{extra}", file=sys.stderr, flush=True)
    finally:
        for proc in stack["procs"]:  # the harness waits for them at its end
            proc.send_signal(signal.SIGTERM)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: how the run was set up, then medians over repeats per (processes, variant),
    with the server's CPU per sentence, TensorBridge's mean batch and the goal ratios."""
    import statistics

    out = [SETUP, "",
           "| PHP processes | variant | sentences/s | p50 ms | p99 ms | server CPU ms/sentence "
           "| mean batch |", "|---:|---|---:|---:|---:|---:|---:|"]
    levels = sorted({r["processes"] for r in rows})
    medians: dict[tuple[int, str], float] = {}

    def median(mine: list[dict[str, Any]], key: str, scale: float = 1.0) -> str:
        values = [r[key] for r in mine if key in r]
        return f"{statistics.median(values) / scale:.1f}" if values else ""

    for level in levels:
        for variant in ("tensorbridge", "fastapi", "in-process"):
            mine = [r for r in rows if r["processes"] == level and r["variant"] == variant]
            if not mine:
                continue
            rate = statistics.median(r["sentences_s"] for r in mine)
            medians[level, variant] = rate
            out.append(f"| {level} | {variant} | {rate:.1f} | {median(mine, 'p50', 1000)} | "
                       f"{median(mine, 'p99', 1000)} | {median(mine, 'server_cpu_ms')} | "
                       f"{median(mine, 'mean_batch')} |")
    top = levels[-1]
    if (top, "tensorbridge") in medians:
        tb = medians[top, "tensorbridge"]
        out.append("")
        out.append(f"At {top} processes TensorBridge does "
                   f"{tb / medians[top, 'fastapi']:.2f}x the FastAPI service's sentences/s "
                   f"(goal >= 2x) and {tb / medians[top, 'in-process']:.0%} of the in-process "
                   "ceiling (goal >= 80%).")
    return "\n".join(out)


def goal_ratios(rows: list[dict[str, Any]], level: int = 16) -> tuple[list[float], list[float]]:
    """Per repeat at ``level`` processes: TensorBridge / FastAPI and TensorBridge / in-process
    sentences/s (the issue's goals: >= 2 and >= 0.8)."""
    vs_http, vs_ceiling = [], []
    for rep in sorted({r["repeat"] for r in rows}):
        rate = {r["variant"]: r["sentences_s"] for r in rows
                if r["repeat"] == rep and r["processes"] == level}
        if rate.get("tensorbridge") and rate.get("fastapi") and rate.get("in-process"):
            vs_http.append(rate["tensorbridge"] / rate["fastapi"])
            vs_ceiling.append(rate["tensorbridge"] / rate["in-process"])
    return vs_http, vs_ceiling


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve-http", type=int, metavar="PORT", default=None)
    parser.add_argument("--threads", type=int, default=THREADS)
    args = parser.parse_args()
    if args.serve_http is not None:
        serve_http(args.serve_http, args.threads)
        return 0
    parser.error("run S8 through bench/run.py --only S8, or give --serve-http PORT")
    return 2


if __name__ == "__main__":
    sys.exit(main())
