"""Probe: TensorBridge's OIP REST listener (binary tensor extension) against the FastAPI binary
peer of the benchmarks (bench/http_app.py), tiny and 602,112-byte calls, interleaved.

Both servers run one torch thread; the client is a raw keep-alive socket sending prebuilt
requests (so client cost is the same few µs for both). Prints p50/p99 per variant and the
ratios. Run: ``PYTHONPATH=python/src python scripts/oip_probe.py [--n 2000] [--blocks 6]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


def _request(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}",
            *[f"{k}: {v}" for k, v in headers.items()]]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _oip(model: str, name: str, shape: list[int], raw: bytes) -> bytes:
    header = json.dumps({"inputs": [{"name": name, "shape": shape, "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return _request(f"/v2/models/{model}/infer", header + raw,
                    {"Content-Type": "application/octet-stream",
                     "Inference-Header-Content-Length": str(len(header))})


def _call(sock: socket.socket, request: bytes) -> None:
    sock.sendall(request)
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    head, _, rest = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"not 200: {head[:200]!r} {rest[:300]!r}")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        rest += sock.recv(max(65536, length - len(rest)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000, help="calls per block")
    parser.add_argument("--blocks", type=int, default=6)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'python/src'}:{ROOT / 'bench'}"}
    tb_port, peer_port = _free_port(), _free_port()
    sock_path = f"/tmp/oip-probe-{os.getpid()}.sock"
    tb = subprocess.Popen([sys.executable, "-m", "tensorbridge", "serve", "--socket", sock_path,
                           "--threads", "1", "--http-port", str(tb_port), "--log-level",
                           "warning", "--model", "echo=tensorbridge.models.testing:echo",
                           "--model", "head=tensorbridge.models.testing:head"], env=env)
    peer = subprocess.Popen([sys.executable, str(ROOT / "bench/http_app.py"), "--port",
                             str(peer_port), "--threads", "1"], env=env, cwd=ROOT / "bench")
    try:
        _wait_port(tb_port, tb)
        _wait_port(peer_port, peer)
        tiny = b"\0\0\x80?" * 4
        large = bytes(602_112)
        variants = {
            "oip_rest_tiny": (tb_port, _oip("echo", "x", [4], tiny)),
            "fastapi_binary_tiny": (peer_port, _request(
                "/binary/echo", tiny, {"Content-Type": "application/octet-stream",
                                       "X-Shape": "4"})),
            "oip_rest_large": (tb_port, _oip("head", "input", [1, 3, 224, 224], large)),
            "fastapi_binary_large": (peer_port, _request(
                "/binary/head", large, {"Content-Type": "application/octet-stream",
                                        "X-Shape": "1,3,224,224"})),
        }
        socks = {v: socket.create_connection(("127.0.0.1", port)) for v, (port, _) in
                 variants.items()}
        for s in socks.values():
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        samples: dict[str, list[float]] = {v: [] for v in variants}
        for v, (_, req) in variants.items():  # warm-up
            for _ in range(200):
                _call(socks[v], req)
        print(f"uptime: {os.popen('uptime').read().strip()}")
        for block in range(args.blocks):
            order = list(variants) if block % 2 == 0 else list(reversed(variants))
            for v in order:
                req = variants[v][1]
                sock = socks[v]
                out = samples[v]
                for _ in range(args.n if "tiny" in v else args.n // 4):
                    t0 = time.perf_counter()
                    _call(sock, req)
                    out.append(time.perf_counter() - t0)
        print(f"uptime: {os.popen('uptime').read().strip()}")
        p = {}
        for v, xs in samples.items():
            xs.sort()
            p[v] = (statistics.median(xs) * 1e6, xs[int(len(xs) * 0.99)] * 1e6)
            print(f"{v:22s} n={len(xs):6d} p50 {p[v][0]:8.1f} µs  p99 {p[v][1]:8.1f} µs")
        for size in ("tiny", "large"):
            ours, peer_p = p[f"oip_rest_{size}"], p[f"fastapi_binary_{size}"]
            print(f"{size}: OIP REST / FastAPI binary p50 ratio {ours[0] / peer_p[0]:.2f}, "
                  f"p99 ratio {ours[1] / peer_p[1]:.2f}")
    finally:
        for proc in (tb, peer):
            proc.terminate()
            proc.wait(15)


if __name__ == "__main__":
    main()
