"""The compiled loop (python/csrc/tb_loop.c) built with AddressSanitizer and
UndefinedBehaviorSanitizer, under test_fuzz.py's raw fuzzer.

``make fuzz`` runs it with TB_FUZZ_FRAMES / 5 fuzzed frames (200,000 / 5 there). The sanitizer
runtime is preloaded into the server only: PHP cannot run with it (its extensions are opened
with RTLD_DEEPBIND), so the right-answers client beside the fuzzer is Python's.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from collections import Counter
from pathlib import Path

import torch
from test_fuzz import CSRC, FRAMES, REGION_CAP_MB, SEED, THREADS, Stats, fuzz_session

import tensorbridge as tb


def _asan_package(tmp: Path) -> Path:
    """A copy of the package whose ``_tbcore`` (the compiled loop included) is built with
    -fsanitize=address,undefined; the directory to put on PYTHONPATH."""
    src = tmp / "asan-src"
    shutil.copytree(Path(tb.__file__).parent, src / "tensorbridge",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    sources = [str(CSRC / n) for n in ("tb_frame.c", "tb_conn.c", "tb_loop.c", "tb_pyloop.c",
                                       "tb_module.c")]
    subprocess.run(["gcc", "-shared", "-fPIC", "-std=c11", "-g", "-O1", "-fno-omit-frame-pointer",
                    "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-pthread",
                    f"-I{sysconfig.get_paths()['include']}", *sources, "-o",
                    str(src / "tensorbridge" / f"_tbcore{sysconfig.get_config_var('EXT_SUFFIX')}")],
                   check=True)
    return src


def test_compiled_loop_under_asan_and_ubsan_serves_the_fuzzer(tmp_path: Path) -> None:
    """A server whose compiled loop is built with ASan + UBSan (preloaded) takes the raw
    fuzzer's sessions beside a client's right calls: every reply checked, the server alive,
    no connection left open, no sanitizer report. (PHP cannot run with the sanitizer runtime
    preloaded, so the good client here is Python's.)"""
    frames = max(1000, FRAMES // 5)
    libs = " ".join(subprocess.check_output(["gcc", f"-print-file-name={lib}"], text=True).strip()
                    for lib in ("libasan.so", "libubsan.so"))
    env = {**os.environ, "LD_PRELOAD": libs, "ASAN_OPTIONS": "detect_leaks=0",
           "UBSAN_OPTIONS": "print_stacktrace=1", "PYTHONPATH": str(_asan_package(tmp_path))}
    sock, log = str(tmp_path / "tb.sock"), tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tensorbridge", "serve", "--socket", sock, "--threads", "1",
             "--model", "echo=tensorbridge.models.testing:echo",
             "--model", "head=tensorbridge.models.testing:head",
             "--region-cap-mb", str(REGION_CAP_MB)], env=env, stdout=out, stderr=out)
    stats, good, stop = Stats(), Counter[str](), threading.Event()
    try:
        end = time.monotonic() + 120
        while "ready on" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < end, log.read_text()[-3000:]
            time.sleep(0.1)

        def client() -> None:
            with tb.Client(sock, timeout=10.0) as c:
                while not stop.is_set():
                    x = torch.arange(random.choice([4, 4096, 150_528]), dtype=torch.float32)
                    good["ok" if torch.equal(c.infer("echo", {"x": x})["x"], x) else "bad"] += 1

        def worker(n: int) -> None:
            rng = random.Random(SEED * 37 + n)
            try:
                while stats.frames < frames:
                    fuzz_session(sock, rng, stats, rng.choice([5, 50, 400]))
            except Exception as exc:
                stats.problems.append(f"fuzzer {n}: {exc!r}")

        threads = [threading.Thread(target=client)]
        threads += [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads[1:]:
            t.join()
        stop.set()
        threads[0].join()
        with tb.Client(sock, timeout=10.0) as probe:
            _wait_open(probe, 1)
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        stop.set()
        proc.terminate()
        proc.wait(30)
    text = log.read_text()
    assert "AddressSanitizer" not in text and "runtime error" not in text, text[-3000:]
    assert stats.problems == [] and good["bad"] == 0 and good["ok"] > 0, (stats.problems, good)
    print(f"\ncompiled loop under ASan + UBSan (seed {SEED}): {stats.frames} fuzzed frames on "
          f"{stats.connections} connections, {good['ok']} right client calls, findings 0")


def _wait_open(probe: tb.Client, want: int) -> None:
    end = time.monotonic() + 30
    while (open_now := probe.ping()["connections_open"]) != want:
        assert time.monotonic() < end, f"{open_now} connections still open, want {want}"
        time.sleep(0.05)
