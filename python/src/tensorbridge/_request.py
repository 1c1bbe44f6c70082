"""One INFER as a typed object, from its decoded frame until its reply is written.

The connection that read the frame builds it, the model's queue runs it, and whichever thread
ran it hands it back to the connection (``Replier.answer``) with its result set. Nothing rides
along in a dict of extras: every stage reads and writes named fields.
"""

from __future__ import annotations

import threading
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ._errors import TensorBridgeError

if TYPE_CHECKING:
    from ._models import LoadedModel
    from ._registry import ServedVersion
    from ._wire import InferRequest

#: The earliest deadline (``time.monotonic()``) of the requests the current model call serves,
#: set around each call by the model's queue: a backend that forwards the call elsewhere (the
#: remote backend) passes the time left on as its own deadline.
call_deadline: ContextVar[float | None] = ContextVar("tensorbridge_call_deadline", default=None)

#: What a finished model call produced: the outputs by name, or the error to answer with.
Outcome = dict[str, Any] | TensorBridgeError


class Replier(Protocol):
    """Whoever answers a finished request (the connection it came from)."""

    def answer(self, request: Request) -> None:
        """Write the reply of ``request`` (its ``result`` is set); called exactly once."""


@dataclass(eq=False)
class Request:
    """One INFER waiting for, or running on, a model, until it is answered."""

    #: The decoded INFER body (model name, timeout, output area, tensor descriptors).
    frame: InferRequest
    request_id: int
    #: Position among the frames of its connection: replies leave in this order (spec §5.2).
    seq: int
    connection: Replier
    model: LoadedModel
    #: Model inputs (after preprocessing), dim 0 = rows when the model is batched.
    inputs: dict[str, Any]
    #: ``time.monotonic()`` when the frame began to be served.
    arrived: float
    #: Absolute ``time.monotonic()`` after which it must not be computed; None = no limit.
    deadline: float | None
    #: Rows this request adds to a batch; None = never merged with others.
    rows: int | None = None
    #: Requests merge only when their keys are equal (same names, dtypes and non-batch dims).
    key: tuple[Any, ...] | None = None
    preprocess_s: float = 0.0
    #: ``time.monotonic()`` when its model call began (0 until then).
    started: float = 0.0
    #: Set once, by ``finish``: the outputs or the error.
    result: Outcome | None = None
    #: Rows of the model call it was part of (0 when not computed).
    batch_rows: int = 0
    #: The model version it runs on, a use of which it holds until answered (its queue runs
    #: it; a reload frees the version only when every such use is given back).
    served: ServedVersion | None = None
    _done: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def timeout_us(self) -> int:
        """The caller's time budget in µs (0 = none)."""
        return self.frame.timeout_us

    def finish(self, outcome: Outcome, batch_rows: int) -> bool:
        """Record the outcome and have the connection answer, unless someone (the watchdog)
        already did; True if this call delivered it."""
        with self._lock:
            if self._done:
                return False
            self._done = True
        self.result = outcome
        self.batch_rows = batch_rows
        self.connection.answer(self)
        return True
