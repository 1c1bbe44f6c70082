"""The model server: a pool of threads all waiting on one epoll, and per-model queues.

Connections are registered one-shot, so each event reaches exactly one pool thread, which
then owns that connection: it parses the frames and answers the cheap ones (PING, MODELS,
ATTACH). An INFER is validated there; if its model is idle the same thread computes it at
once (no hand-off, no extra wake-up: the latency of a thread per connection), while the
other pool threads keep serving everyone else; if the model is busy the request waits in the
model's bounded queue for its workers (``_scheduler``). Either way the outputs go into the
connection's region and the computing thread sends the reply. A connection is paused while
one of its requests is queued, so that replies go out in request order (spec §5.2).

Measured alternatives (docs/benchmarks.md, bench/results/): a thread per connection fell to
half of uvicorn's throughput at 16 PHP workers (GIL fights); one I/O thread handing every
request to a worker, or a leader that passes the I/O role on before computing, cost an
extra wake-up per request (~100 µs of server CPU at one client).
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
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
_ONESHOT_IN = select.EPOLLIN | select.EPOLLONESHOT


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
        self._lock = threading.Lock()  # guards connections, accepted, _computing, _handlers
        self._queues: dict[str, ModelQueue] = {}
        self._listener: socket.socket | None = None
        self._epoll: select.epoll | None = None
        self._handlers: dict[int, Callable[[], None]] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._resumed: deque[_Connection] = deque()
        self._pool: list[threading.Thread] = []
        self._computing = 0  # pool threads running a request inline
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
        """Bind the socket and start serving in background threads."""
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
        self._epoll = select.epoll()
        self._handlers[listener.fileno()] = self._accept
        self._epoll.register(listener.fileno(), select.EPOLLIN)
        self._handlers[self._wake_r.fileno()] = self._on_wake
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        self._pool = [threading.Thread(target=self._serve_events, name=f"tb-io-{i}",
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
        self._wake()  # never drained once stopped: every pool thread sees it and leaves
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
        if self._epoll is not None:
            self._epoll.close()
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

    # -- the pool threads ----------------------------------------------------------------

    def _serve_events(self) -> None:
        """A pool thread: wait on the shared epoll for one event and serve it, forever.

        Every pool thread waits at once; a connection is registered one-shot, so exactly one
        thread gets its event and owns it until it re-arms it (``arm``)."""
        assert self._epoll is not None
        while not self._stopped.is_set():
            timeout = self._select_timeout()
            try:
                events = self._epoll.poll(-1 if timeout is None else timeout, 1)
            except OSError:
                return  # closed by stop()
            for fd, _ in events:
                handler = self._handlers.get(fd)
                if handler is not None:
                    handler()
            self._expire_queued()

    def dispatch(self, model: LoadedModel, job: Job) -> bool:
        """Run ``job`` now, in this thread, if its model is idle; else queue it.

        False when the model's queue is full (the caller answers OVERLOADED)."""
        queue = self._queues[model.name]
        with self._lock:
            # Keep one thread waiting on epoll: never let the last one go compute.
            spare = self._computing < len(self._pool) - 1
            claimed = spare and queue.try_claim()
            if claimed:
                self._computing += 1
        if not claimed:
            return queue.submit(job)
        job.extra["inline"] = True
        try:
            queue.run_claimed(job)
        finally:
            with self._lock:
                self._computing -= 1
        return True

    def _select_timeout(self) -> float | None:
        deadlines = [d for q in self._queues.values() if (d := q.next_deadline()) is not None]
        return None if not deadlines else max(0.0, min(deadlines) - time.monotonic())

    def _expire_queued(self) -> None:
        now = time.monotonic()
        for queue in self._queues.values():
            for job in queue.expire(now):
                job.expire(job)

    def _accept(self) -> None:
        assert self._listener is not None and self._epoll is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if not self._stopped.is_set():
                    log.warning("accept failed: %s", exc)
                return
            sock.setblocking(True)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _SEND_TIMEOUT)
            conn = _Connection(self, sock)
            with self._lock:
                self.connections.add(conn)
                self.accepted += 1
                self._handlers[conn.fd] = conn.on_readable
            log.debug("connection from pid %d (uid %d)", conn.peer_pid, conn.peer_uid)
            if conn.authorized():
                self._epoll.register(conn.fd, _ONESHOT_IN)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or we are shutting down

    def _on_wake(self) -> None:
        if self._stopped.is_set():
            return  # leave the byte there: it wakes the other pool threads too
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                conn = self._resumed.popleft()
            except IndexError:
                return
            conn.resume()

    def resume(self, conn: _Connection) -> None:
        """Have a pool thread serve the frames that arrived while ``conn`` was busy."""
        self._resumed.append(conn)
        self._wake()

    def arm(self, conn: _Connection) -> None:
        """Let the next event of ``conn`` reach a pool thread (one-shot registration)."""
        assert self._epoll is not None
        try:
            self._epoll.modify(conn.fd, _ONESHOT_IN)
        except (OSError, ValueError):
            pass  # closed meanwhile

    def forget(self, conn: _Connection) -> None:
        """Drop a closed connection from epoll and the books."""
        with self._lock:
            self.connections.discard(conn)
            self._handlers.pop(conn.fd, None)
        if self._epoll is not None:
            try:
                self._epoll.unregister(conn.fd)
            except (OSError, ValueError):
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

    At any time at most one thread works on a connection: the pool thread that got its
    (one-shot) event or a resume (``owned``), or, while one of its requests waits for a busy
    model, that model's worker (``busy``). Whoever finishes last re-arms the socket.
    """

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.region: Region | None = None
        self.use_crc = False
        self.busy = False  # a request of ours waits for, or runs on, a model worker
        self.owned = False  # a pool thread is serving our frames
        self.closed = False
        self._buf = bytearray()
        self._lock = threading.Lock()  # guards busy / owned between the two
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
        self.server.forget(self)
        if self.region is not None:
            self.region.close()
            self.region = None
        self.sock.close()
        log.debug("connection of pid %d closed", self.peer_pid)

    def on_readable(self) -> None:
        """Our one-shot event fired (data or EOF): this thread now owns the connection."""
        with self._lock:
            self.owned = True
        try:
            data = self.sock.recv(_READ_CHUNK, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError as exc:
            log.debug("connection of pid %d failed: %s", self.peer_pid, exc)
            self.close()
            return
        if data == b"":
            self.close()
            return
        if data:
            self._buf += data
        self._serve_owned()

    def resume(self) -> None:
        """A pool thread serves frames that arrived while a model worker had our request."""
        if not self.closed:
            self._serve_owned()

    def finished(self) -> None:
        """A queued request is answered (model worker or expiry): hand the connection back."""
        with self._lock:
            self.busy = False
            if self.owned or self.closed:
                return  # the owning thread sees busy == False and carries on
            if len(self._buf) < HEADER_SIZE:
                self.server.arm(self)
                return
            self.owned = True
        self.server.resume(self)

    def _serve_owned(self) -> None:
        """Serve complete frames until none is left or a request is queued; then let go."""
        while True:
            self._serve_buffered()
            with self._lock:
                if self.closed:
                    return
                if self.busy:
                    self.owned = False  # the model worker's finished() takes over
                    return
                if len(self._buf) >= HEADER_SIZE and self._complete():
                    continue  # the worker finished while we were checking
                self.owned = False
                self.server.arm(self)
                return

    def _complete(self) -> bool:
        return len(self._buf) >= HEADER_SIZE + int.from_bytes(self._buf[16:20], "little")

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
            self.busy = True  # before the queue sees it: a worker may finish at once
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
            if job.extra.get("inline"):
                with self._lock:
                    self.busy = False  # we ran in the owning thread, which carries on
            else:
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
