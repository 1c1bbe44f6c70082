"""The seam between the OIP listeners and the server: a decoded OIP request becomes the same
typed ``Request`` a socket INFER becomes, and runs on the same model versions, queues,
batching, deadlines and metrics. Nothing here knows HTTP or gRPC, nor the socket connection.

The listener's own thread computes the request when its model is idle (as a socket pool thread
does: no hand-off), else queues it and waits; a queued request whose deadline passes is taken
out of its queue and answered ``DEADLINE_EXCEEDED`` by the waiting thread itself.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .._errors import (
    InternalError,
    InvalidInputError,
    ModelError,
    OverloadedError,
    TensorBridgeError,
)
from .._request import Request
from .._scheduler import batch_key, deadline_error
from .._spec import BY_TORCH, BYTES, DType, ErrorCode
from .._wire import InferRequest

if TYPE_CHECKING:
    from ..server import Server

log = logging.getLogger("tensorbridge")


@dataclass
class Tensor:
    """One decoded input or output: a tensor, or a list of ``bytes`` items for BYTES."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    value: Any

    def raw(self) -> bytes | memoryview:
        """Row-major little-endian bytes; BYTES items as 4-byte length + bytes each."""
        if self.dtype is BYTES:
            return b"".join(len(b).to_bytes(4, "little") + b for b in self.value)
        flat = self.value.reshape(-1)
        if not flat.numel():
            return b""
        return memoryview(flat.view(torch.uint8).numpy()).cast("B")


@dataclass
class Answer:
    """What a finished inference gives back."""

    model: str
    version: int
    outputs: list[Tensor]


class _Waiter:
    """The ``Replier`` of one listener request: converts the outcome where it was computed,
    then wakes the listener thread waiting for it."""

    def __init__(self, gateway: Gateway, front: str) -> None:
        self.gateway = gateway
        self.front = front
        #: Made only when the request is queued: one computed inline is answered before
        #: ``infer`` looks (an Event per request is measurable on a tiny call).
        self.done: threading.Event | None = None
        self.answer_: Answer | None = None
        self.error: TensorBridgeError | None = None

    def answer(self, request: Request) -> None:
        try:
            self.answer_ = self.gateway.finish(request, self.front)
        except TensorBridgeError as exc:
            self.error = exc
        except Exception as exc:  # a bug: the waiting thread must still be answered
            log.exception("internal error answering a %s request", self.front)
            self.error = InternalError(f"internal server error: {exc!r}")
        finally:
            request.inputs.clear()
            request.result = None
            if request.served is not None:
                request.served.release()
            self.gateway.server.metrics.answered_one()
            with self.gateway.lock:
                self.gateway.pending -= 1
            if self.done is not None:
                self.done.set()


class Gateway:
    """Runs OIP requests on a ``Server``'s models; ``front`` names the listener in metrics."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.lock = threading.Lock()
        #: Listener requests received and not answered yet (drain waits for them).
        self.pending = 0

    def infer(self, front: str, model: str, version: int | None, inputs: list[Tensor],
              timeout_us: int = 0) -> Answer:
        """Compute one request; raises the ``TensorBridgeError`` to answer with."""
        arrived = time.monotonic()
        server = self.server
        try:
            if server.draining or server.stopped:
                raise OverloadedError("the server is shutting down and takes no new requests; "
                                      "retry against the restarted server")
            served = server.registry.resolve(model, version)
        except TensorBridgeError as exc:
            self.count_error(front, exc, model)
            raise
        loaded, queue = served.model, served.queue
        assert loaded is not None and queue is not None  # resolve gives ready versions only
        try:
            names = [t.name for t in inputs]
            if len(set(names)) != len(names):
                raise InvalidInputError(f"model {model!r}: input names repeat: {names}")
            problem = loaded.signature.check_inputs({t.name: (t.dtype, t.shape) for t in inputs})
            if problem:
                raise InvalidInputError(f"model {loaded.name!r}: {problem}")
            t0 = time.monotonic()
            values = loaded.preprocess({t.name: t.value for t in inputs})
            preprocess_s = time.monotonic() - t0
        except TensorBridgeError as exc:
            served.release()
            self._count(front, loaded.name, loaded.version, ErrorCode(exc.code).name.lower(),
                        0, 0, 0, time.monotonic() - arrived)
            self.server.metrics.error(ErrorCode(exc.code).name, loaded.name)
            raise
        except BaseException:
            served.release()
            raise
        # Budgets past a day are no deadline (and would overflow a wait's timeout).
        deadline = arrived + timeout_us / 1e6 if 0 < timeout_us < 86_400_000_000 else None
        rows, key = batch_key(values, loaded.pipeline.pad) if queue.batching else (None, None)
        waiter = _Waiter(self, front)
        frame = InferRequest(timeout_us, model, 0, 0, [], b"", version)
        request = Request(frame, 0, 0, waiter, loaded, values, arrived, deadline, rows=rows,
                          key=key, preprocess_s=preprocess_s, served=served)
        with self.lock:
            self.pending += 1
        server.metrics.received()
        instance = queue.try_claim()
        if instance is not None:
            queue.run_claimed(instance, request)  # answered (waiter.answer) before it returns
        else:
            done = waiter.done = threading.Event()
            if not queue.submit(request):
                request.finish(OverloadedError(
                    f"model {loaded.name!r} has {loaded.config.max_queue} requests queued "
                    "(max_queue); retry later or raise max_queue"), 0)
            elif deadline is not None and not done.wait(max(0.0, deadline - time.monotonic())):
                # Still queued (or running) at its deadline: take it out if not started.
                for job in queue.expire(time.monotonic()):
                    job.finish(deadline_error(job), 0)
            done.wait()
        if waiter.error is not None:
            raise waiter.error
        assert waiter.answer_ is not None
        return waiter.answer_

    def finish(self, request: Request, front: str) -> Answer:
        """In the thread that computed ``request``: its outputs as ``Tensor``s, counted."""
        outcome, model = request.result, request.model
        if isinstance(outcome, TensorBridgeError):
            status = ErrorCode(outcome.code).name.lower()
            self.server.metrics.error(status, model.name)
            self._count(front, model.name, model.version, status, 0, 0, 0,
                        time.monotonic() - request.arrived)
            raise outcome
        assert outcome is not None
        t0 = time.monotonic()
        try:
            outputs = [_output(name, value) for name, value in
                       model.postprocess(outcome).items()]
        except TensorBridgeError as exc:
            self.server.metrics.error(ErrorCode(exc.code).name, model.name)
            self._count(front, model.name, model.version, ErrorCode(exc.code).name.lower(),
                        0, 0, 0, time.monotonic() - request.arrived)
            raise
        done = time.monotonic()
        pre_s = request.preprocess_s + (done - t0)
        queue_s = max(0.0, request.started - request.arrived - request.preprocess_s)
        compute_s = max(0.0, t0 - request.started)
        self._count(front, model.name, model.version, "ok", queue_s, pre_s, compute_s,
                    done - request.arrived)
        total_ms = (done - request.arrived) * 1000
        slow = self.server.config.slow_ms
        if slow and total_ms > slow:
            log.warning("slow %s request: model %r took %.1f ms (queued %.1f ms)", front,
                        model.name, total_ms, queue_s * 1000,
                        extra={"model": model.name, "listener": front,
                               "total_ms": round(total_ms, 3),
                               "queue_ms": round(queue_s * 1000, 3)})
        return Answer(model.name, model.version, outputs)

    def count_error(self, front: str, exc: TensorBridgeError, model: str | None) -> None:
        """Count an error answered before any model was chosen (unknown model, bad body)."""
        status = ErrorCode(exc.code).name.lower()
        self.server.metrics.error(status, model)
        self.server.metrics.listener_request(front, model or "", status)

    def _count(self, front: str, model: str, version: int, status: str, queue_s: float,
               pre_s: float, compute_s: float, total_s: float) -> None:
        metrics = self.server.metrics
        metrics.answered(model, version, status, queue_s, pre_s, compute_s, total_s)
        metrics.listener_request(front, model, status)


def _output(name: str, value: Any) -> Tensor:
    if isinstance(value, torch.Tensor):
        dtype = BY_TORCH.get(value.dtype)
        if dtype is None:
            raise ModelError(f"output {name!r} has dtype {value.dtype}, which the protocol "
                             "cannot carry; convert it in the model")
        value = value.detach()
        if value.device.type != "cpu":
            value = value.cpu()
        return Tensor(name, dtype, tuple(value.shape), value.contiguous())
    if isinstance(value, (list, tuple)):
        items = [v.encode() if isinstance(v, str) else bytes(v) for v in value]
        return Tensor(name, BYTES, (len(items),), items)
    raise ModelError(f"output {name!r} is a {type(value).__name__}; outputs must be tensors "
                     "or lists of bytes/str")


__all__ = ["Answer", "Gateway", "Tensor"]
