"""``tensorbridge health``: a real round trip, not only a socket that accepts.

It sends PING (answered by the event loop itself, so a loop that stopped turning shows up as
no answer) and then one INFER of made-up zeros to each model whose inputs can be made up
(declared FP/INT shapes; image inputs cannot), which goes through the model's queue and
instances like any request. Exit codes: docs/operations.md (``ExitCode`` in ``_cli``).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from ._client import Client
from ._errors import ConnectionError, TensorBridgeError, TimeoutError
from ._exitcode import ExitCode
from ._spec import BY_NAME

__all__ = ["check_health", "describe_models", "example_inputs"]


def example_inputs(meta: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """Zeros matching a model's declared inputs (-1 dims become 1); None if any input is
    open or BYTES."""
    specs = meta.get("inputs")
    if not specs:
        return None
    out = {}
    for spec in specs:
        dtype = BY_NAME.get(spec.get("datatype") or "")
        if spec.get("shape") is None or dtype is None or dtype.torch is None:
            return None
        out[spec["name"]] = torch.zeros([1 if d == -1 else d for d in spec["shape"]],
                                        dtype=dtype.torch)
    return out


def check_health(client: Client, wanted: list[str] | None, fmt: str = "text") -> ExitCode:
    """PING, then a test INFER per model; print the result; return the exit code."""
    status = client.ping()
    report: dict[str, Any] = {"server": status, "checked": {}, "problems": []}
    if not status.get("ready", True):
        report["problems"].append("the server answers but is not ready (draining, or a model "
                                  "has no healthy instance)")
    models = {m["name"]: m for m in client.models()}
    for name in wanted or []:
        if name not in models:
            report["problems"].append(f"model {name!r} is not loaded; loaded: {sorted(models)}")
    for name in wanted or sorted(models):
        inputs = example_inputs(models[name]) if name in models else None
        if inputs is None:
            if wanted and name in models:
                report["problems"].append(f"model {name!r}: its inputs cannot be made up")
            continue
        try:
            client.infer(name, inputs)
            report["checked"][name] = "ok"
        except (ConnectionError, TimeoutError):
            raise
        except TensorBridgeError as exc:  # the loop answers, the model does not
            report["checked"][name] = f"{type(exc).__name__}: {exc}"
            report["problems"].append(f"model {name!r}: {exc}")
    if fmt == "json":
        print(json.dumps(report, indent=2))
    elif not report["problems"]:
        tested = ", ".join(report["checked"]) or "none (PING only)"
        print(f"ok: {status['server']} {status['version']} (protocol {status['protocol']}, "
              f"pid {status.get('pid')}); test requests: {tested}")
    for problem in report["problems"]:
        print(f"tensorbridge health: {problem}", file=sys.stderr)
    return ExitCode.FAILURE if report["problems"] else ExitCode.OK


def describe_models(models: list[dict[str, Any]]) -> str:
    """``tensorbridge models`` text output."""
    return "\n".join(f"{m['name']}\n  inputs:  {_describe(m['inputs'])}\n"
                     f"  outputs: {_describe(m['outputs'])}" for m in models)


def _describe(specs: list[dict[str, Any]] | None) -> str:
    if specs is None:
        return "any"
    return ", ".join(f"{t['name']}:{t['datatype']}{t['shape'] if t['shape'] is not None else ''}"
                     for t in specs)
