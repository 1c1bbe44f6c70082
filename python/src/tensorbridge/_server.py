"""The model server: a leader/follower pool of I/O threads over epoll, and per-model queues.

One pool thread at a time (the leader) waits on all sockets, parses frames and answers the
cheap ones (PING, MODELS, ATTACH) itself. An INFER is validated there; if its model is idle
the leader hands the I/O role to the next pool thread and computes the request itself (no
hand-off: the latency of a thread per connection); if the model is busy the request waits
in the model's queue for its workers (``_scheduler``). Either way the outputs go into the
connection's region and the reply is sent by the thread that computed it. A connection is
paused while one of its requests is with a model, so that replies go out in request order
(spec §5.2).

Why not a thread per connection: with 16+ PHP workers those threads fight over the GIL and
throughput fell to half of uvicorn's (measured, see docs/benchmarks.md); an I/O thread that
only queues (no inline run) scaled but cost one more wake-up per request.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch

from . import __version__
from ._config import ServerConfig
from ._errors import (
    DeadlineExceededError,
    InvalidInputError,
    ModelError,
    ModelNotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    ProtocolError,
    TensorBridgeError,
)
from ._models import LoadedModel, load_model
from ._region import Region
from ._scheduler import Job, ModelQueue
from ._spec import (
    ALIGN,
    BY_TORCH,
    BYTES,
    FD_CARRIER,
    HEADER_SIZE,
    LOCATION_INLINE,
    LOCATION_REGION,
    MAX_BODY,
    OPT_CRC,
    ErrorCode,
    FrameType,
)
from ._wire import (
    AttachOk,
    Header,
    InferReply,
    TensorDesc,
    check_crc,
    crc32c,
    decode_attach,
    decode_bytes_items,
    decode_header,
    decode_infer,
    encode_attach_ok,
    encode_bytes_items,
    encode_error,
    encode_frame,
    encode_infer_ok,
)

log = logging.getLogger("tensorbridge")
_PEERCRED = struct.Struct("3i")
_SEND_TIMEOUT = struct.pack("ll", 5, 0)  # a client that stops reading for 5 s is dropped
_READ_CHUNK = 1 << 20
_SMALL = 1 << 16  # outputs up to this size are written with one bytes copy


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class Server:
    """Serves loaded models on a Unix socket. ``start()`` returns; ``serve_forever()`` blocks."""

    def __init__(self, config: ServerConfig, models: Iterable[LoadedModel] | None = None) -> None:
        self.config = config
        self.models: dict[str, LoadedModel] = {m.name: m for m in models or ()}
        self.connections: set[_Connection] = set()
        #: Connections accepted since start (shown by PING, used to check reuse).
        self.accepted = 0
        self._queues: dict[str, ModelQueue] = {}
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._resumed: deque[_Connection] = deque()
        self._pool: list[threading.Thread] = []
        self._io_lock = threading.Lock()  # held by the leader, the one thread doing I/O
        self._inline: tuple[ModelQueue, Job] | None = None  # a job the leader will run
        self._computing = 0  # pool threads running a job inline (guarded by _count_lock)
        self._count_lock = threading.Lock()
        self._stopped = threading.Event()

    def load_models(self) -> None:
        """Load every model of the config, in order, logging progress."""
        if self.config.threads > 0:
            torch.set_num_threads(self.config.threads)
        for i, model_config in enumerate(self.config.models, 1):
            log.info("model %d/%d", i, len(self.config.models))
            model = load_model(model_config)
            self.models[model.name] = model

    def start(self) -> None:
        """Bind the socket and start serving in a background thread."""
        path = self.config.socket
        _clear_stale_socket(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        os.chmod(path, self.config.socket_mode)
        listener.listen(512)
        listener.setblocking(False)
        self._listener = listener
        self._queues = {name: ModelQueue(m) for name, m in self.models.items()}
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, self._accept)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self._pool = [threading.Thread(target=self._lead_or_compute, name=f"tb-io-{i}",
                                       daemon=True) for i in range(self.config.io_threads)]
        for t in self._pool:
            t.start()
        log.info("serving %s on %s", ", ".join(self.models) or "no models", path)

    def serve_forever(self) -> None:
        """``start()``, then block until ``stop()`` is called (e.g. from a signal handler)."""
        if self._listener is None:
            self.start()
        self._stopped.wait()

    def stop(self) -> None:
        """Stop accepting, close every connection (freeing its region) and remove the socket."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._wake()
        for t in self._pool:
            t.join(timeout=10)
        for queue in self._queues.values():
            queue.stop()
        for conn in list(self.connections):
            conn.close()
        if self._listener is not None:
            self._listener.close()
            try:
                os.unlink(self.config.socket)
            except FileNotFoundError:
                pass
        if self._selector is not None:
            self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def status(self) -> bytes:
        """PONG body (spec §4): identity plus connection counters."""
        return json.dumps({"server": "tensorbridge", "version": __version__, "protocol": 1,
                           "pid": os.getpid(), "connections_accepted": self.accepted,
                           "connections_open": len(self.connections),
                           "models": sorted(self.models)}).encode()

    def metadata(self) -> bytes:
        """MODELS_OK body (spec §4.1)."""
        return json.dumps({"models": [m.metadata() for m in self.models.values()]}).encode()

    # -- the I/O thread ------------------------------------------------------------------

    def _lead_or_compute(self) -> None:
        """A pool thread: be the leader (I/O) until a request can run inline, then run it
        while the next thread leads."""
        while not self._stopped.is_set():
            with self._io_lock:
                if self._stopped.is_set():
                    self._wake()  # pass the news on to the next thread in line
                    return
                inline = self._poll()
            if inline is not None:
                queue, job = inline
                try:
                    queue.run_claimed(job)
                finally:
                    with self._count_lock:
                        self._computing -= 1

    def _poll(self) -> tuple[ModelQueue, Job] | None:
        """Wait for events and serve them; return a job to run inline, if any."""
        assert self._selector is not None
        while not self._stopped.is_set():
            for key, _ in self._selector.select(self._select_timeout()):
                key.data()
            self._expire_queued()
            if self._inline is not None:
                inline, self._inline = self._inline, None
                return inline
        return None

    def dispatch(self, model: LoadedModel, job: Job) -> bool:
        """Run ``job`` inline after this poll if its model is idle, else queue it.

        False when the model's queue is full (the caller answers OVERLOADED)."""
        queue = self._queues[model.name]
        with self._count_lock:
            # Someone must stay free to lead: never let the last pool thread go compute.
            spare = self._inline is None and self._computing < len(self._pool) - 1
            if spare and queue.try_claim():
                self._computing += 1
                self._inline = (queue, job)
                return True
        return queue.submit(job)

    def _select_timeout(self) -> float | None:
        deadlines = [d for q in self._queues.values() if (d := q.next_deadline()) is not None]
        return None if not deadlines else max(0.0, min(deadlines) - time.monotonic())

    def _expire_queued(self) -> None:
        now = time.monotonic()
        for queue in self._queues.values():
            for job in queue.expire(now):
                job.expire(job)

    def _accept(self) -> None:
        assert self._listener is not None and self._selector is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            sock.setblocking(True)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _SEND_TIMEOUT)
            conn = _Connection(self, sock)
            self.connections.add(conn)
            self.accepted += 1
            log.debug("connection from pid %d (uid %d)", conn.peer_pid, conn.peer_uid)
            if conn.authorized():
                self._selector.register(sock, selectors.EVENT_READ, conn.on_readable)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or we are shutting down

    def _on_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while self._resumed:
            self._resumed.popleft().resume()

    def resume(self, conn: _Connection) -> None:
        """Hand a connection back to the I/O thread (called from a model worker)."""
        self._resumed.append(conn)
        self._wake()

    def unwatch(self, conn: _Connection) -> None:
        assert self._selector is not None
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file left by a killed server; refuse to steal a live one."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise RuntimeError(f"{path} exists and is not a socket; choose another --socket path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise RuntimeError(f"another server is already listening on {path}")


class _Connection:
    """One client: its socket, its private region and its unparsed bytes.

    Everything here runs in the leading I/O thread, except ``_compute`` and ``finished``,
    which run in whichever thread computes the request while the connection is paused
    (``busy``).
    """

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.region: Region | None = None
        self.use_crc = False
        self.busy = False  # a request of ours is with a model worker
        self.eof = False  # the peer closed while we were busy: close once the worker is done
        self.closed = False
        self._buf = bytearray()
        # Guards busy/_buf between the I/O thread and the worker finishing our request.
        self._lock = threading.Lock()
        pid, uid, gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        self.peer_pid, self.peer_uid = pid, uid

    def authorized(self) -> bool:
        """Check the peer's uid (SO_PEERCRED); refuse it with UNAUTHORIZED if not allowed."""
        allowed = self.server.config.allow_uid
        if not allowed or self.peer_uid in allowed:
            return True
        try:
            self._send_error(0, ErrorCode.UNAUTHORIZED,
                             f"uid {self.peer_uid} may not use this server; allowed: {allowed} "
                             "(--allow-uid)")
            self._hang_up()
        except OSError:
            pass
        self.close()
        return False

    def close(self) -> None:
        """Release the region and the socket. The client's copy of the memfd is its own."""
        if self.closed:
            return
        self.closed = True
        self.server.unwatch(self)
        if self.region is not None:
            self.region.close()
            self.region = None
        self.sock.close()
        self.server.connections.discard(self)
        log.debug("connection of pid %d closed", self.peer_pid)

    def on_readable(self) -> None:
        """The socket has data (or EOF): buffer it and serve the complete frames."""
        try:
            data = self.sock.recv(_READ_CHUNK, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("connection of pid %d failed: %s", self.peer_pid, exc)
            self.close()
            return
        with self._lock:
            if not data and self.busy:
                self.eof = True  # the worker still uses the region; it hands us back
                self.server.unwatch(self)
                return
            self._buf += data
            if self.busy:
                return  # served when the worker hands the connection back
        if not data:
            self.close()
            return
        self._serve_buffered()

    def finished(self) -> None:
        """Called by the model worker after replying: un-pause; wake the I/O thread only when
        frames arrived meanwhile or the peer left (the common case needs no wake-up)."""
        with self._lock:
            self.busy = False
            pending = self.eof or len(self._buf) >= HEADER_SIZE
        if pending:
            self.server.resume(self)

    def resume(self) -> None:
        """In the I/O thread, after ``finished``: serve what arrived meanwhile, or close."""
        if self.closed:
            return
        if self.eof:
            self.close()
            return
        self._serve_buffered()

    def _serve_buffered(self) -> None:
        try:
            while not self.busy and not self.closed and len(self._buf) >= HEADER_SIZE:
                if not self._serve_one():
                    return
        except OSError as exc:  # the peer went away while we answered
            log.debug("connection of pid %d ended: %s", self.peer_pid, exc)
            self.close()

    def _serve_one(self) -> bool:
        """Serve the first frame in the buffer; False when it is not complete yet."""
        arrived = time.monotonic()
        try:
            header = decode_header(memoryview(self._buf)[:HEADER_SIZE])
        except ProtocolError as exc:
            # The framing is lost: answer once and hang up (spec §3).
            self._send_error(0, ErrorCode.PROTOCOL_ERROR, str(exc))
            self._hang_up()
            self.close()
            return False
        end = HEADER_SIZE + header.body_len
        if len(self._buf) < end:
            return False
        body = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        rid = header.request_id
        try:
            check_crc(header, body)
            self._dispatch(header, body, arrived)
        except TensorBridgeError as exc:
            self._send_error(rid, exc.code, str(exc))
        except OSError:
            raise
        except Exception as exc:  # a server bug must not take the connection down
            log.exception("internal error on request %d", rid)
            self._send_error(rid, ErrorCode.INTERNAL, f"internal server error: {exc!r}")
        return True

    def _hang_up(self) -> None:
        """Shut our side, then discard what the peer already sent, so that closing with unread
        data does not reset the connection before the peer has read our ERROR."""
        self.sock.shutdown(socket.SHUT_WR)
        try:
            while self.sock.recv(65536, socket.MSG_DONTWAIT):
                pass
        except OSError:
            pass

    def _send(self, ftype: FrameType, rid: int, body: bytes = b"") -> None:
        self.sock.sendall(encode_frame(ftype, rid, body, self.use_crc))

    def _send_error(self, rid: int, code: int, message: str) -> None:
        self._send(FrameType.ERROR, rid, encode_error(code, message))

    def _dispatch(self, header: Header, body: bytes, arrived: float) -> None:
        ftype, rid = header.type, header.request_id
        if ftype == FrameType.INFER:
            self._infer(rid, body, arrived)
        elif ftype == FrameType.ATTACH:
            self._attach(rid, body)
        elif ftype == FrameType.PING:
            self._send(FrameType.PONG, rid, self.server.status())
        elif ftype == FrameType.MODELS:
            self._send(FrameType.MODELS_OK, rid, self.server.metadata())
        else:
            raise ProtocolError(f"frame type {ftype.name} is not a request")

    def _attach(self, rid: int, body: bytearray) -> None:
        options, min_region = decode_attach(body)
        config = self.server.config
        if min_region > config.region_cap:
            raise PayloadTooLargeError(
                f"a region of {min_region} bytes was asked for; this server's cap is "
                f"{config.region_cap} bytes (raise region_cap_mb, or send smaller tensors)")
        current = self.region.size if self.region else 0
        if current < max(min_region, 1):
            size = min(max(min_region, 2 * current, config.region_initial), config.region_cap)
            if self.region is not None:
                self.region.close()
                self.region = None
            self.region = Region(size)
        self.use_crc = bool(options & OPT_CRC)
        ok = AttachOk(self.region.size, config.region_cap, MAX_BODY)
        self._send(FrameType.ATTACH_OK, rid, encode_attach_ok(ok))
        socket.send_fds(self.sock, [FD_CARRIER], [self.region.fd])

    def _infer(self, rid: int, body: bytes, arrived: float) -> None:
        """Validate an INFER here, then queue it for its model's worker."""
        req = decode_infer(body)
        model = self.server.models.get(req.model)
        if model is None:
            raise ModelNotFoundError(f"model {req.model!r} is not loaded; loaded models: "
                                     f"{sorted(self.server.models)}")
        if req.out_capacity:
            self._check_range("output area", req.out_offset, req.out_capacity)
        inputs = {d.name: self._input(d, req.inline) for d in req.inputs}
        problem = model.signature.check_inputs({d.name: (d.dtype, d.shape) for d in req.inputs})
        if problem:
            raise InvalidInputError(f"model {model.name!r}: {problem}")
        deadline = arrived + req.timeout_us / 1e6 if req.timeout_us else None
        job = Job(model, inputs, deadline, arrived, self._compute, self._expired,
                  {"rid": rid, "out": (req.out_offset, req.out_capacity),
                   "timeout_us": req.timeout_us})
        with self._lock:
            self.busy = True
        if not self.server.dispatch(model, job):
            with self._lock:
                self.busy = False
            raise OverloadedError(f"model {model.name!r} has {model.config.max_queue} requests "
                                  "queued (max_queue); retry later or raise max_queue")

    def _compute(self, job: Job) -> None:
        """In a model worker: run the model, write the outputs, reply, hand back."""
        rid = job.extra["rid"]
        try:
            started = job.extra["started"]
            if job.deadline is not None and started >= job.deadline:
                raise self._deadline_error(job)
            outputs = job.model.predict(job.inputs)
            job.inputs.clear()  # drop the views into the region before it can be replaced
            reply = self._place_outputs(outputs, *job.extra["out"])
            done = time.monotonic()
            reply.queue_us = int((started - job.arrived) * 1e6)
            reply.compute_us = int((done - started) * 1e6)
            self._send(FrameType.INFER_OK, rid, encode_infer_ok(reply))
            slow = self.server.config.slow_ms
            if slow and (done - job.arrived) * 1000 > slow:
                log.warning("slow request: model %r took %.1f ms (queued %.1f ms)",
                            job.model.name, (done - job.arrived) * 1000,
                            (started - job.arrived) * 1000)
        except TensorBridgeError as exc:
            self._reply_error(rid, exc)
        except OSError as exc:
            log.debug("connection of pid %d ended: %s", self.peer_pid, exc)
        except Exception as exc:
            log.exception("internal error on request %d", rid)
            self._reply_error(rid, TensorBridgeError(f"internal server error: {exc!r}"))
        finally:
            job.inputs.clear()
            self.finished()

    def _expired(self, job: Job) -> None:
        """In the I/O thread: the job's deadline passed while it was queued."""
        job.inputs.clear()
        self._reply_error(job.extra["rid"], self._deadline_error(job))
        self.finished()

    def _deadline_error(self, job: Job) -> DeadlineExceededError:
        return DeadlineExceededError(
            f"the request's deadline ({job.extra['timeout_us'] / 1000:.1f} ms) passed before "
            f"model {job.model.name!r} could run; it was not computed")

    def _reply_error(self, rid: int, exc: TensorBridgeError) -> None:
        try:
            self._send_error(rid, exc.code, str(exc))
        except OSError:
            pass  # the peer is gone; the I/O thread notices on resume

    def _check_range(self, what: str, offset: int, nbytes: int) -> None:
        if self.region is None:
            raise ProtocolError(f"{what} refers to the region, but no ATTACH was sent on this "
                                "connection")
        if offset % ALIGN:
            raise ProtocolError(f"{what} offset {offset} is not a multiple of {ALIGN}")
        if offset + nbytes > self.region.size:
            raise ProtocolError(f"{what} [{offset}, {offset + nbytes}) lies outside the "
                                f"{self.region.size}-byte region")

    def _input(self, d: TensorDesc, inline: memoryview) -> Any:
        if d.location == LOCATION_REGION:
            self._check_range(f"input {d.name!r}", d.offset, d.nbytes)
            assert self.region is not None
            if self.use_crc or d.dtype is BYTES:
                raw = self.region.read(d.offset, d.nbytes)
        else:
            raw = bytes(inline[d.offset:d.offset + d.nbytes])
        if self.use_crc and crc32c(raw) != d.crc32c:
            raise ProtocolError(f"input {d.name!r}: checksum mismatch (data corrupted)")
        if d.dtype is BYTES:
            try:
                return decode_bytes_items(raw, d.count)
            except ProtocolError as exc:
                raise InvalidInputError(f"input {d.name!r}: malformed BYTES tensor: {exc}"
                                        ) from None
        assert d.dtype.torch is not None
        if d.location == LOCATION_REGION:
            assert self.region is not None
            tensor = self.region.view(d.dtype.torch, d.offset, d.count, d.shape)
        elif d.count:
            tensor = torch.frombuffer(bytearray(raw), dtype=d.dtype.torch).view(d.shape)
        else:
            tensor = torch.empty(d.shape, dtype=d.dtype.torch)
        if d.dtype.name == "BOOL" and d.count and tensor.view(torch.uint8).max() > 1:
            raise InvalidInputError(f"input {d.name!r}: BOOL items must be 0 or 1")
        return tensor

    def _place_outputs(self, outputs: dict[str, Any], out_offset: int, out_capacity: int
                       ) -> InferReply:
        prepared = [_prepare_output(name, value) for name, value in outputs.items()]
        end = out_offset + out_capacity
        cursor = out_offset
        descs: list[TensorDesc] = []
        inline = bytearray()
        for name, dtype, value, nbytes, data in prepared:
            offset = _align(cursor)
            if self.region is not None and out_capacity and offset + nbytes <= end:
                if data is None and nbytes <= _SMALL and dtype.name != "BF16":
                    data = value.numpy().tobytes()  # cheaper than a tensor copy when small
                if data is not None:
                    self.region.write(offset, data)
                elif nbytes:
                    self.region.view(dtype.torch, offset, value.numel(), value.shape
                                     ).copy_(value)
                location, cursor = LOCATION_REGION, offset + nbytes
                checksum = crc32c(self.region.read(offset, nbytes)) if self.use_crc else 0
            else:
                if data is None:
                    data = value.reshape(-1).view(torch.uint8).numpy().tobytes()
                location, offset = LOCATION_INLINE, len(inline)
                inline += data
                checksum = crc32c(data) if self.use_crc else 0
                if len(inline) > MAX_BODY - 4096:
                    needed = sum(_align(p[3]) for p in prepared)
                    raise PayloadTooLargeError(
                        f"the outputs ({needed} bytes) do not fit in the output area "
                        f"({out_capacity} bytes) and are too large to send inline; give an "
                        f"output area of at least {needed} bytes")
            shape = (len(value),) if dtype is BYTES else tuple(value.shape)
            descs.append(TensorDesc(name, dtype, shape, location, offset, nbytes, checksum))
        return InferReply(0, 0, descs, inline)


def _prepare_output(name: str, value: Any) -> tuple[str, Any, Any, int, bytes | None]:
    """(name, dtype, value, nbytes, encoded bytes for BYTES outputs or None)."""
    if isinstance(value, torch.Tensor):
        dtype = BY_TORCH.get(value.dtype)
        if dtype is None:
            raise ModelError(f"output {name!r} has dtype {value.dtype}, which the protocol "
                             "cannot carry; convert it in the model")
        return name, dtype, value, value.numel() * dtype.itemsize, None
    data = encode_bytes_items([v.encode() if isinstance(v, str) else v for v in value])
    return name, BYTES, value, len(data), data
