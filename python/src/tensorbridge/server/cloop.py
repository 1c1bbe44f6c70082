"""The compiled loop (``loop = "c"``): C threads own the established connections.

After ``accept`` (Python: peer checks, limits) a connection's socket goes to
``tensorbridge._tbcore.Loop``. Its threads wait on epoll without the GIL, read and split
frames, and parse and bounds-check a common tensor INFER themselves; each wake-up's frames
reach ``CLoop.handle`` in one call, so the GIL is taken once per wake-up, not per frame. A
fast INFER becomes a ``Request`` here (views over the region, the model's queue) and its
INFER_OK is placed, encoded and sent by C (``reply_ok``); any other frame (ATTACH, PING,
MODELS, ADMIN, checksummed or inline or BYTES tensors, errors) takes the Python path of
``connection.Peer`` and its reply is sent by C in request order (``reply``).
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .._errors import InternalError, ProtocolError, TensorBridgeError
from .._metrics import taken
from .._region import Region
from .._request import Request
from .._spec import BY_CODE, BY_TORCH, ErrorCode, FrameType
from .._wire import (
    InferRequest,
    check_crc,
    decode_header,
    decode_header_py,
    encode_error,
    encode_frame,
)
from . import infer
from .connection import Peer

if TYPE_CHECKING:
    from .._registry import ServedVersion
    from .._spec import DType
    from .lifecycle import Server

log = logging.getLogger("tensorbridge")
_FAST, _FRAME, _BAD, _CLOSED = 0, 1, 2, 3
#: Protocol dtype codes of the tensors C places itself (bfloat16 has no buffer protocol).
_CODES = {t: d.code for t, d in BY_TORCH.items() if t is not torch.bfloat16}
from_numpy = torch.from_numpy
#: What a connection remembers of an admitted fast INFER, by the record's tail (timeout,
#: model, version, key, output area, input descriptors): (the registry's generation, the
#: version it resolved to, the frame, (input name, array over the region) pairs, batch rows,
#: batch key). The same tail resolves, checks and views the same way until the generation
#: changes (a route switched) or the region does.
_Plan = tuple[int, "ServedVersion", InferRequest, tuple[tuple[str, Any], ...], "int | None",
              "tuple[Any, ...] | None"]
#: Plans kept per connection (a client's tensors keep their offsets and shapes: a few).
_MAX_PLANS = 32


def available() -> bool:
    """Whether the compiled loop was built (``make ext`` / ``pip install``)."""
    try:
        from .. import _tbcore
    except ImportError:
        return False
    return hasattr(_tbcore, "Loop")


class LoopConnection(Peer):
    """A client served by the compiled loop; C keeps its socket, framing and reply order."""

    def __init__(self, cloop: CLoop, sock: socket.socket, peer_pid: int, peer_uid: int,
                 peer_gid: int) -> None:
        self.server = cloop.server
        self.peer_pid, self.peer_uid, self.peer_gid = peer_pid, peer_uid, peer_gid
        self.region: Region | None = None
        self.use_crc = False
        self.owned = False
        self.closed = False
        self._cloop = cloop
        self._loop = cloop.loop
        self._lock = threading.Lock()  # guards closed
        # INFERs submitted and answered (their difference is what drain and PONG count):
        # next() on a count is atomic, no lock on the request path.
        self._submitted, self._answered = itertools.count(), itertools.count()
        #: Fast INFERs already admitted once (``CLoop._fast``); they view the region.
        self.plans: dict[tuple[Any, ...], _Plan] = {}
        #: The loop's id of this connection (it owns the socket from here on).
        self.cid: int = self._loop.add(sock.detach())

    def in_flight(self) -> int:
        return taken(self._submitted) - taken(self._answered)

    def close(self) -> None:
        self._loop.close(self.cid)
        self.closed_by_loop()

    def closed_by_loop(self) -> None:
        """The loop closed the socket (peer gone, or ``close``): free the region, once."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        self._cloop.connections.pop(self.cid, None)
        self._release()

    def emit(self, seq: int, frame: bytes, fds: list[int] | None = None) -> None:
        if self._loop.reply(self.cid, seq, frame, fds[0] if fds else -1):
            self.closed_by_loop()

    def hang_up(self, seq: int, frame: bytes) -> None:
        """Send a connection-level ERROR as the reply to ``seq``, then shut the socket."""
        if self._loop.reply(self.cid, seq, frame, -1, True):
            self.closed_by_loop()

    def answer(self, request: Request) -> None:
        try:
            sent = self._answer_fast(request)
        except Exception:  # e.g. an output numpy cannot view: the Python path says why
            sent = False
        if not sent:
            self.emit(request.seq, infer.reply_frame(self, request))
        if request.served is not None:
            request.served.release()
        self.server.metrics.answered_one()
        next(self._answered)

    def _answer_fast(self, request: Request) -> bool:
        """Place the outputs and send INFER_OK from C; False leaves it to the Python path."""
        outcome = request.result
        model = request.model
        if (not isinstance(outcome, dict) or self.use_crc
                or model.pipeline.postprocess is not None):
            return False
        outputs: list[tuple[str, int, Any]] = []
        for name, value in outcome.items():
            code = _CODES.get(value.dtype) if isinstance(value, torch.Tensor) else None
            if code is None:
                return False
            outputs.append((name, code, value.numpy()))
        done = time.monotonic()
        pre_s = request.preprocess_s
        queue_s = max(0.0, request.started - request.arrived - pre_s)
        compute_s = done - request.started
        frame = request.frame
        result = self._loop.reply_ok(self.cid, request.seq, request.request_id,
                                     frame.out_offset, frame.out_capacity, outputs,
                                     int(queue_s * 1e6), int(compute_s * 1e6),
                                     int(pre_s * 1e6), request.batch_rows, model.version)
        if result < 0:
            return False
        request.inputs.clear()  # views into the region must not outlive the request
        request.result = None
        infer.record_ok(self, request, queue_s, pre_s, compute_s, done)
        if result == 1:
            self.closed_by_loop()
        return True

    def answer_later(self, seq: int, work: Callable[[], bytes]) -> None:
        def run() -> None:
            try:
                frame = work()
            except Exception as exc:  # work answers its own errors; this is a bug
                log.exception("internal error in a slow command")
                frame = self.frame(FrameType.ERROR, 0, encode_error(
                    ErrorCode.INTERNAL, f"internal server error: {exc!r}"))
            self.emit(seq, frame)

        threading.Thread(target=run, name=f"tb-admin-{self.peer_pid}", daemon=True).start()

    def _submit(self, request: Request) -> None:
        next(self._submitted)  # before the queue sees it: a worker may answer at once
        server = self.server
        server.metrics.received()
        if not server.dispatch(request):
            request.finish(infer.queue_full(request.model), 0)
        elif request.deadline is not None and request.result is None and not request.started:
            server.deadline_queued()  # the pool thread that expires queued requests

    def _attach(self, rid: int, body: bytes, seq: int) -> None:
        self.plans.clear()  # their arrays view the region, which may be replaced here
        super()._attach(rid, body, seq)

    def _release(self) -> None:
        self.plans.clear()
        super()._release()

    def _region_changed(self) -> None:
        region = self.region
        assert region is not None
        self._loop.set_region(self.cid, region.fd, region.size, self.use_crc)


class CLoop:
    """The compiled loop of one server, its threads, and the connections it serves."""

    def __init__(self, server: Server) -> None:
        from .. import _tbcore

        self.server = server
        self.loop = _tbcore.Loop(self.handle)
        self.connections: dict[int, LoopConnection] = {}
        self.threads: list[threading.Thread] = []

    def start(self, threads: int) -> None:
        """Start ``threads`` loop threads."""
        self.threads = [threading.Thread(target=self.loop.run, name=f"tb-loop-{i}", daemon=True)
                        for i in range(threads)]
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        """Make the loop threads return (connections are closed by the server)."""
        self.loop.stop()
        for t in self.threads:
            t.join(timeout=10)

    def connect(self, sock: socket.socket, peer_pid: int, peer_uid: int, peer_gid: int
                ) -> LoopConnection:
        """Take an accepted socket; ``watch`` starts serving it."""
        conn = LoopConnection(self, sock, peer_pid, peer_uid, peer_gid)
        self.connections[conn.cid] = conn
        return conn

    def watch(self, conn: LoopConnection) -> None:
        """Start delivering a connection's frames."""
        try:
            self.loop.start(conn.cid)
        except OSError:
            conn.close()

    def handle(self, items: list[tuple[Any, ...]]) -> None:
        """Every record of one loop thread's wake-up (the GIL taken once for all)."""
        connections = self.connections
        seen = self.server.admission.seen
        for item in items:
            conn = connections.get(item[1])
            if conn is None:
                continue  # closed meanwhile
            try:
                kind = item[0]
                if kind == _FAST:
                    seen(conn)
                    self._fast(conn, item)
                elif kind == _FRAME:
                    seen(conn)
                    self._frame(conn, item[2], item[3], item[4], item[5])
                elif kind == _BAD:
                    self._bad_header(conn, item[2], item[3])
                else:
                    conn.closed_by_loop()
            except Exception as exc:  # a bug: still answer, or the connection waits forever
                log.exception("internal error in the compiled loop's handler")
                if item[0] in (_FAST, _FRAME):
                    conn.emit_error(item[2], item[3] if item[0] == _FAST else 0,
                                    InternalError(f"internal server error: {exc!r}"))

    def _fast(self, conn: LoopConnection, item: tuple[Any, ...]) -> None:
        server = self.server
        plan = conn.plans.get(item[5:])
        if plan is not None and plan[0] == server.registry.generation and not server.draining:
            generation, served, frame, arrays, rows, key = plan
            # Freed only after its route was replaced, i.e. with the generation bumped; a
            # use is still taken (and may fail) exactly as ``resolve`` takes it.
            if served.acquire():
                model = served.model
                assert model is not None
                arrived = item[4]
                timeout_us = frame.timeout_us
                conn._submit(Request(
                    frame, item[3], item[2], conn, model,
                    {name: from_numpy(array) for name, array in arrays}, arrived,
                    arrived + timeout_us / 1e6 if timeout_us else None, rows=rows, key=key,
                    served=served))
                return
        self._admit(conn, item)

    def _admit(self, conn: LoopConnection, item: tuple[Any, ...]) -> None:
        """A fast INFER the long way (``infer.admit``); remembers what the next one like it
        can skip."""
        (_, _, seq, rid, arrived, timeout_us, model, version, key, out_offset, out_capacity,
         descs) = item
        frame = InferRequest(timeout_us, model, out_offset, out_capacity, [], b"", version, key)
        region = conn.region
        assert region is not None  # C takes the fast path only with a region mapped
        registry = self.server.registry
        generation = registry.generation  # read first: a switch meanwhile voids the plan

        def inputs() -> tuple[dict[str, Any], dict[str, tuple[DType, tuple[int, ...]]]]:
            tensors: dict[str, Any] = {}
            given: dict[str, tuple[DType, tuple[int, ...]]] = {}
            for name, code, shape, offset, count in descs:
                dtype = BY_CODE[code]
                given[name] = (dtype, shape)
                tensors[name] = infer.region_input(region, name, dtype, offset, count, shape)
            return tensors, given

        try:
            request = infer.admit(conn, rid, seq, arrived, frame, inputs)
        except TensorBridgeError as exc:
            conn.emit_error(seq, rid, exc)
            return
        if request is None:
            return
        plan = _plan(generation, request, descs) if registry.fixed_choice(
            model, version, key) else None
        conn._submit(request)
        if plan is not None and region is conn.region:
            plans = conn.plans
            if len(plans) >= _MAX_PLANS:
                plans.clear()  # a client whose offsets or shapes keep changing
            plans[item[5:]] = plan

    def _frame(self, conn: LoopConnection, seq: int, head: bytes, body: bytes,
               arrived: float) -> None:
        header = decode_header(head)  # valid: the loop checked it
        rid = header.request_id
        try:
            check_crc(header, body)
            conn._dispatch(header, body, arrived, seq)
        except TensorBridgeError as exc:
            conn.emit_error(seq, rid, exc)
        except Exception as exc:  # a server bug must not take the connection down
            log.exception("internal error on request %d", rid)
            conn.emit_error(seq, rid, InternalError(f"internal server error: {exc!r}"))

    def _bad_header(self, conn: LoopConnection, seq: int, head: bytes) -> None:
        # The framing is lost: answer once and hang up (spec §3).
        try:
            decode_header_py(head)
            message = "malformed frame header"  # the loop and Python disagree: still refuse
        except ProtocolError as exc:
            message = str(exc)
        self.server.metrics.error("protocol_error")
        conn.hang_up(seq, encode_frame(FrameType.ERROR, 0, encode_error(
            ErrorCode.PROTOCOL_ERROR, message)))


def _plan(generation: int, request: Request, descs: tuple[Any, ...]) -> _Plan | None:
    """What the next INFER with the same record tail can skip, or None when it must take the
    long way again (preprocessing, or an input that is empty or bfloat16: no array views it)."""
    served = request.served
    if served is None or request.model.pipeline.preprocess is not None:
        return None
    arrays = []
    for name, _, _, _, count in descs:
        tensor = request.inputs.get(name)
        if not count or not isinstance(tensor, torch.Tensor) or tensor.dtype is torch.bfloat16:
            return None
        arrays.append((name, tensor.numpy()))
    return (generation, served, request.frame, tuple(arrays), request.rows, request.key)
