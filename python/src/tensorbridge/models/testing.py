"""Tiny models for tests, demos and benchmarks. Each factory returns an ``nn.Module``.

Use them as ``--model echo=tensorbridge.models.testing:echo``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn


class _Echo(nn.Module):
    tensorbridge_signature = {"inputs": None}

    def forward(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return dict(inputs)


class _Sleep(nn.Module):
    tensorbridge_signature = {"inputs": [{"name": "ms", "datatype": "FP32", "shape": [1]}],
                              "outputs": [{"name": "ms", "datatype": "FP32", "shape": [1]}]}

    def forward(self, ms: torch.Tensor) -> torch.Tensor:
        time.sleep(float(ms[0]) / 1000.0)
        return ms.clone()


class _Fail(nn.Module):
    tensorbridge_signature = {"inputs": None}

    def forward(self, inputs: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("this model always fails (tensorbridge.models.testing:fail)")


class _Head(nn.Module):
    tensorbridge_signature = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 1000]}]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)[:, :1000] + 1.0


class _Identity(nn.Module):
    tensorbridge_signature = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
        "outputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Rows(nn.Module):
    tensorbridge_signature = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]},
                    {"name": "rows", "datatype": "INT64", "shape": [-1]}]}

    def __init__(self, ms: float = 10.0) -> None:
        super().__init__()
        self.ms = ms

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ms:
            time.sleep(self.ms / 1000.0)  # a fixed cost per call, as on a GPU: batching pays
        if bool((x[:, 0] < 0).any()):
            raise ValueError("rows: a negative first column is this model's test failure")
        return x * 2 + 1, torch.full((x.shape[0],), x.shape[0], dtype=torch.int64)


class _Hang(nn.Module):
    tensorbridge_signature = {"inputs": None}

    def forward(self, inputs: dict[str, Any]) -> dict[str, Any]:
        import ctypes

        # Lock a plain mutex twice from a C call made with the GIL held (PyDLL keeps it): the
        # whole process stops turning, as with a deadlocked extension, and no signal gets in.
        libc = ctypes.PyDLL(None)
        mutex = ctypes.create_string_buffer(64)
        libc.pthread_mutex_lock(mutex)
        libc.pthread_mutex_lock(mutex)
        return dict(inputs)


def echo() -> nn.Module:
    """Returns every input unchanged, under the same name (any names, types and shapes)."""
    return _Echo()


def sleep() -> nn.Module:
    """Sleeps ``ms[0]`` milliseconds, then returns ``ms``: for deadline and overload tests."""
    return _Sleep()


def hang() -> nn.Module:
    """Hangs the whole server process for good (a C call holding the GIL): for watchdog tests."""
    return _Hang()


def fail() -> nn.Module:
    """Always raises ``ValueError``: for error-path tests."""
    return _Fail()


def identity() -> nn.Module:
    """``x`` FP32 [-1, -1] back unchanged: the no-op with a declared signature, for paths that
    need one (the remote backend takes it from the remote's metadata)."""
    return _Identity()


def rows(ms: float = 10.0) -> nn.Module:
    """``y = 2x + 1`` row by row for ``x`` [-1, 4], and ``rows`` = how many rows the call
    computed (to see dynamic batching); sleeps ``ms`` per call; raises on a negative x[:, 0]."""
    return _Rows(ms)


def head() -> nn.Module:
    """Takes a 1x3x224x224 FP32 image, returns its first 1000 values + 1 (a 4 KB output)."""
    return _Head()
