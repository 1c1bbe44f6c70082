"""Model repositories for the lifecycle, routing and ONNX tests: small linear models."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import torch


class Linear(torch.nn.Module):
    """y = a * x + b, elementwise: two versions with different a, b answer differently."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a = a
        self.b = b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.a + self.b


def write_version(repo: Path, name: str, version: int, a: float, b: float) -> Path:
    """``repo/name/version/model.pt``: TorchScript of ``y = a * x + b``."""
    folder = repo / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.pt"
    tmp = folder / ".model.pt.tmp"
    torch.jit.save(torch.jit.script(Linear(a, b)), str(tmp))
    tmp.rename(path)  # appears whole: a polling server never sees half a file
    return path


def write_config(repo: Path, name: str, text: str) -> None:
    """``repo/name/config.toml``."""
    (repo / name).mkdir(parents=True, exist_ok=True)
    (repo / name / "config.toml").write_text(text)


LINEAR_CONFIG = """
inputs = [{name = "x", datatype = "FP32", shape = [-1, 1]}]
outputs = [{name = "y", datatype = "FP32", shape = [-1, 1]}]
"""


def free_port() -> int:
    """A TCP port nothing listens on now (for --metrics-port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics_text(port: int) -> str:
    """The server's /metrics exposition."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()
