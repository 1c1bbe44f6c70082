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
    InternalError,
    InvalidInputError,
    ModelError,
    ModelNotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    ProtocolError,
    TensorBridgeError,
)
from ._metrics import Metrics
from ._models import LoadedModel, load_model
from ._region import Region
from ._scheduler import Job, ModelQueue, batch_key, deadline_error
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
    PAGE,
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
#: Pipelined INFERs one connection may have waiting at once; more are read when some finish.
_MAX_PENDING = 256


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
        self._shm_lock = threading.Lock()
        self._shm_total = 0
        #: Set by ``drain()``: new INFERs are refused while in-flight ones finish.
        self.draining = False
        self.metrics = Metrics(config.shm_cap)
        self._loaded_here: set[str] = set()

    def load_models(self) -> None:
        """Load every model of the config, in order, logging progress."""
        if self.config.threads > 0:
            torch.set_num_threads(self.config.threads)
        else:
            # N instances each running a forward at once share the cores: give each its part
            # rather than letting N pools of cpu_count threads fight (measured in S7).
            most = max((m.instance_count for m in self.config.models), default=1)
            if most > 1:
                threads = max(1, (os.cpu_count() or 1) // most)
                torch.set_num_threads(threads)
                log.info("%d instances of a model: %d torch thread(s) each", most, threads)
        for i, model_config in enumerate(self.config.models, 1):
            log.info("model %d/%d", i, len(self.config.models))
            t0 = time.monotonic()
            model = load_model(model_config)
            self.models[model.name] = model
            self._loaded_here.add(model.name)
            self.metrics.model_loaded(model.name, time.monotonic() - t0,
                                      model_config.instance_count)

    def start(self) -> None:
        """Bind the socket and start serving in background threads."""
        path = self.config.socket
        _clear_stale_socket(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        os.chmod(path, self.config.socket_mode)
        _chown(path, self.config.socket_owner, self.config.socket_group)
        listener.listen(512)
        listener.setblocking(False)
        self._listener = listener
        for name, m in self.models.items():
            if name not in self._loaded_here:  # given ready-made, not by load_models()
                self.metrics.model_loaded(name, 0.0, m.config.instance_count)
        self._queues = {name: ModelQueue(m, self.metrics.batch, self.metrics.instances_alive)
                        for name, m in self.models.items()}
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

    def drain(self, timeout: float) -> bool:
        """Stop accepting and refuse new INFERs, wait up to ``timeout`` seconds for the
        in-flight ones to be answered, then ``stop()``. True if nothing was cut off."""
        if self._stopped.is_set():
            return True
        self.draining = True
        self._close_listener()
        log.info("draining: waiting up to %.1f s for in-flight requests", timeout)
        end = time.monotonic() + timeout
        while True:
            with self._lock:
                busy = sum(c.pending for c in self.connections)
            if not busy:
                break
            if time.monotonic() >= end:
                log.warning("drain timeout: %d request(s) still in flight are cut off", busy)
                break
            time.sleep(0.01)
        self.stop()
        return not busy

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        self._handlers.pop(listener.fileno(), None)
        try:
            if self._epoll is not None:
                self._epoll.unregister(listener.fileno())
        except (OSError, ValueError):
            pass
        listener.close()
        try:
            os.unlink(self.config.socket)
        except FileNotFoundError:
            pass

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
        self._close_listener()
        self.metrics.stop_http()
        if self._epoll is not None:
            self._epoll.close()
        self._wake_r.close()
        self._wake_w.close()

    def status(self) -> bytes:
        """PONG body (spec §4): identity plus connection counters."""
        return json.dumps({"server": "tensorbridge", "version": __version__, "protocol": 1,
                           "pid": os.getpid(), "connections_accepted": self.accepted,
                           "connections_open": len(self.connections),
                           "requests_in_flight": sum(c.pending for c in list(self.connections)),
                           "ready": self.ready(),
                           "models": sorted(self.models)}).encode()

    def ready(self) -> bool:
        """Serving, not draining, and every model has a healthy instance."""
        return (not self.draining and not self._stopped.is_set()
                and all(q.healthy_instances() > 0 for q in self._queues.values()))

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
            try:
                for fd, _ in events:
                    handler = self._handlers.get(fd)
                    if handler is not None:
                        handler()
                self._expire_queued()
            except Exception:  # a server bug must not cost a pool thread
                log.exception("internal error in a pool thread")

    def queue(self, name: str) -> ModelQueue:
        """The work queue of a loaded model."""
        return self._queues[name]

    def dispatch(self, model: LoadedModel, job: Job) -> bool:
        """Run ``job`` now, in this thread, if its model is idle; else queue it.

        False when the model's queue is full (the caller answers OVERLOADED)."""
        queue = self._queues[model.name]
        with self._lock:
            # Keep one thread waiting on epoll: never let the last one go compute.
            spare = self._computing < len(self._pool) - 1
            instance = queue.try_claim() if spare else None
            if instance is not None:
                self._computing += 1
        if instance is None:
            return queue.submit(job)
        try:
            queue.run_claimed(instance, job)
        finally:
            with self._lock:
                self._computing -= 1
        return True

    def reserve_shm(self, nbytes: int) -> None:
        """Account for a region growing by ``nbytes``; OVERLOADED past ``shm_cap``."""
        with self._shm_lock:
            if nbytes > 0 and self._shm_total + nbytes > self.config.shm_cap:
                raise OverloadedError(
                    f"the server's shared-memory cap ({self.config.shm_cap >> 20} MiB, "
                    f"shm_cap_mb) is used up by {len(self.connections)} connections' regions; "
                    "retry later, use smaller tensors, or raise shm_cap_mb")
            self._shm_total += nbytes
        self.metrics.shm_mapped(nbytes)

    def release_shm(self, nbytes: int) -> None:
        """Account for a region of ``nbytes`` being unmapped."""
        with self._shm_lock:
            self._shm_total -= nbytes
        self.metrics.shm_mapped(-nbytes)

    def _select_timeout(self) -> float | None:
        deadlines = [d for q in self._queues.values() if (d := q.next_deadline()) is not None]
        return None if not deadlines else max(0.0, min(deadlines) - time.monotonic())

    def _expire_queued(self) -> None:
        now = time.monotonic()
        for queue in self._queues.values():
            for job in queue.expire(now):
                job.finish(deadline_error(job), 0)

    def _accept(self) -> None:
        listener = self._listener  # drain() may close it meanwhile
        if listener is None or self._epoll is None:
            return
        while True:
            try:
                sock, _ = listener.accept()
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
            self.metrics.connections(1)
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
            if conn not in self.connections:
                return
            self.connections.discard(conn)
            self._handlers.pop(conn.fd, None)
        self.metrics.connections(-1)
        if self._epoll is not None:
            try:
                self._epoll.unregister(conn.fd)
            except (OSError, ValueError):
                pass


def _chown(path: str, owner: str | None, group: str | None) -> None:
    """Give the socket file the configured owner and group (names or numeric ids)."""
    if owner is None and group is None:
        return
    import grp
    import pwd

    def resolve(value: str | None, lookup: Callable[[str], Any], what: str) -> int:
        if value is None:
            return -1
        if str(value).isdigit():
            return int(value)
        try:
            return lookup(str(value))[2]
        except KeyError:
            raise ValueError(f"socket_{what} {value!r}: no such {what} on this host") from None

    os.chown(path, resolve(owner, pwd.getpwnam, "owner"), resolve(group, grp.getgrnam, "group"))


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
    """One client: its socket, its private region, its unparsed bytes and its requests.

    At most one pool thread reads and parses a connection at a time (the one that got its
    one-shot event, or a resume: ``owned``). INFERs are handed to their model and may finish
    in other threads, in any order; replies still leave in request order (spec §5.2) because
    each frame gets a sequence number and ``_emit`` holds back a reply until every earlier
    one is out. ATTACH, PING and MODELS wait until no INFER is pending (an ATTACH may replace
    the region the pending ones read), which also keeps the cheap replies in order.
    """

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.region: Region | None = None
        self.use_crc = False
        self.pending = 0  # INFERs received and not answered yet
        self.owned = False  # a pool thread is parsing our frames
        self.paused = False  # the next frame waits for pending requests to finish
        self.eof = False  # the peer hung up (or a reply failed): close once nothing is pending
        self.closed = False
        self._buf = bytearray()
        self._lock = threading.Lock()  # guards pending / owned / paused / eof / closed
        self._send_lock = threading.Lock()
        self._next_seq = 0
        self._send_seq = 0
        self._ready: dict[int, tuple[bytes, list[int]]] = {}
        pid, uid, gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        self.peer_pid, self.peer_uid, self.peer_gid = pid, uid, gid

    def authorized(self) -> bool:
        """Check the peer's uid and gid (SO_PEERCRED); refuse it with UNAUTHORIZED if not allowed."""
        config = self.server.config
        uids, gids = config.allow_uid, config.allow_gid
        if (not uids and not gids) or self.peer_uid in uids or self.peer_gid in gids:
            return True
        try:
            message = (f"uid {self.peer_uid} (gid {self.peer_gid}) may not use this server; "
                       f"allowed uids {uids}, gids {gids} (--allow-uid / --allow-gid)")
            self.sock.sendall(encode_frame(FrameType.ERROR, 0, encode_error(
                ErrorCode.UNAUTHORIZED, message)))
            self.server.metrics.error("unauthorized")
            self._hang_up()
        except OSError:
            pass
        self.close()
        return False

    def close(self) -> None:
        """Release the region and the socket. The client's copy of the memfd is its own."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        self.server.forget(self)
        if self.region is not None:
            self.server.release_shm(self.region.size)
            self.region.close()
            self.region = None
        self.sock.close()
        log.debug("connection of pid %d closed", self.peer_pid)

    def _close_when_idle(self) -> None:
        with self._lock:
            self.eof = True
            idle = self.pending == 0
        if idle:
            self.close()

    # -- reading and parsing (the owning pool thread) --------------------------------------

    def on_readable(self) -> None:
        """Our one-shot event fired (data or EOF): this thread now owns the connection."""
        with self._lock:
            if self.closed:
                return
            self.owned = True
        try:
            data = self.sock.recv(_READ_CHUNK, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError as exc:
            log.debug("connection of pid %d failed: %s", self.peer_pid, exc)
            data = b""
        if data == b"":
            with self._lock:
                self.owned = False
            self._close_when_idle()  # not re-armed: EOF would fire forever
            return
        if data:
            self._buf += data
        self._serve_owned()

    def resume(self) -> None:
        """A pool thread serves frames that had to wait for pending requests."""
        if not self.closed:
            self._serve_owned()

    def finished(self) -> None:
        """One of our INFERs is answered: close if the peer is gone, or resume a paused frame."""
        resume = close = False
        with self._lock:
            self.pending -= 1
            if self.closed:
                return
            if self.eof:
                close = self.pending == 0
            elif self.paused and not self._blocked():
                self.paused = False
                self.owned = resume = True
        if close:
            self.close()
        elif resume:
            self.server.resume(self)

    def _blocked(self) -> bool:
        """Whether the next complete frame must wait (call with ``_lock`` held)."""
        if not self._has_frame():
            return False
        if self._buf[5] == FrameType.INFER:
            return self.pending >= _MAX_PENDING
        return self.pending > 0

    def _serve_owned(self) -> None:
        """Serve complete frames until none is left or one must wait; then let go."""
        while True:
            self._serve_buffered()
            with self._lock:
                if self.closed or self.eof:
                    self.owned = False
                    gone = self.eof and not self.closed
                    break
                if self._has_frame():
                    if not self._blocked():
                        continue  # a request finished while we were checking
                    self.paused = True  # finished() hands the connection back
                    self.owned = False
                    return
                self.owned = False
                self.server.arm(self)
                return
        if gone:
            self._close_when_idle()  # a reply failed: the peer is gone

    def _has_frame(self) -> bool:
        return (len(self._buf) >= HEADER_SIZE
                and len(self._buf) >= HEADER_SIZE + int.from_bytes(self._buf[16:20], "little"))

    def _serve_buffered(self) -> None:
        try:
            while not self.eof and len(self._buf) >= HEADER_SIZE:
                with self._lock:
                    if self._blocked():
                        return
                if not self._serve_one():
                    return
        except OSError as exc:  # the peer went away while we answered
            log.debug("connection of pid %d ended: %s", self.peer_pid, exc)
            self._close_when_idle()

    def _serve_one(self) -> bool:
        """Serve the first frame in the buffer; False when it is not complete yet."""
        arrived = time.monotonic()
        try:
            header = decode_header(memoryview(self._buf)[:HEADER_SIZE])
        except ProtocolError as exc:
            # The framing is lost: answer once and hang up (spec §3).
            self.server.metrics.error("protocol_error")
            with self._send_lock:
                self.sock.sendall(encode_frame(FrameType.ERROR, 0, encode_error(
                    ErrorCode.PROTOCOL_ERROR, str(exc))))
                self.eof = True  # nothing follows the connection-level ERROR (spec §3)
            self._hang_up()
            self._close_when_idle()
            return False
        end = HEADER_SIZE + header.body_len
        if len(self._buf) < end:
            return False
        body = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        seq = self._next_seq
        self._next_seq += 1
        rid = header.request_id
        try:
            check_crc(header, body)
            self._dispatch(header, body, arrived, seq)
        except TensorBridgeError as exc:
            self._emit_error(seq, rid, exc)
        except OSError:
            raise
        except Exception as exc:  # a server bug must not take the connection down
            log.exception("internal error on request %d", rid)
            self._emit_error(seq, rid, InternalError(f"internal server error: {exc!r}"))
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

    # -- replying (any thread) ---------------------------------------------------------------

    def _emit(self, seq: int, frame: bytes, fds: list[int] | None = None) -> None:
        """Send the reply to frame ``seq`` once every earlier reply is out."""
        with self._send_lock:
            self._ready[seq] = (frame, fds or [])
            try:
                while self._send_seq in self._ready:
                    data, send_fds = self._ready.pop(self._send_seq)
                    self._send_seq += 1
                    if not self.eof:
                        self.sock.sendall(data)
                        if send_fds:
                            socket.send_fds(self.sock, [FD_CARRIER], send_fds)
            except OSError as exc:
                log.debug("connection of pid %d: reply failed: %s", self.peer_pid, exc)
                self.eof = True  # stop reading; close when nothing is pending

    def _frame(self, ftype: FrameType, rid: int, body: bytes = b"") -> bytes:
        return encode_frame(ftype, rid, body, self.use_crc)

    def _emit_error(self, seq: int, rid: int, exc: TensorBridgeError,
                    model: str | None = None) -> None:
        self.server.metrics.error(ErrorCode(exc.code).name, model)
        self._emit(seq, self._frame(FrameType.ERROR, rid, encode_error(exc.code, str(exc))))

    def _dispatch(self, header: Header, body: bytes, arrived: float, seq: int) -> None:
        ftype, rid = header.type, header.request_id
        if ftype == FrameType.INFER:
            self._infer(rid, body, arrived, seq)
        elif ftype == FrameType.ATTACH:
            self._attach(rid, body, seq)
        elif ftype == FrameType.PING:
            self._emit(seq, self._frame(FrameType.PONG, rid, self.server.status()))
        elif ftype == FrameType.MODELS:
            self._emit(seq, self._frame(FrameType.MODELS_OK, rid, self.server.metadata()))
        else:
            raise ProtocolError(f"frame type {ftype.name} is not a request")

    def _attach(self, rid: int, body: bytes, seq: int) -> None:
        options, min_region = decode_attach(body)
        config = self.server.config
        if min_region > config.region_cap:
            raise PayloadTooLargeError(
                f"a region of {min_region} bytes was asked for; this server's cap is "
                f"{config.region_cap} bytes (raise region_cap_mb, or send smaller tensors)")
        current = self.region.size if self.region else 0
        if current < max(min_region, 1):
            size = min(max(min_region, 2 * current, config.region_initial), config.region_cap)
            size = -(-size // PAGE) * PAGE
            self.server.reserve_shm(size - current)
            try:
                region = Region(size)
            except OSError:
                self.server.release_shm(size - current)
                raise
            if self.region is not None:
                self.region.close()
            self.region = region
        self.use_crc = bool(options & OPT_CRC)
        ok = AttachOk(self.region.size, config.region_cap, MAX_BODY)
        self._emit(seq, self._frame(FrameType.ATTACH_OK, rid, encode_attach_ok(ok)),
                   [self.region.fd])

    # -- inference ---------------------------------------------------------------------------

    def _infer(self, rid: int, body: bytes, arrived: float, seq: int) -> None:
        """Validate and preprocess an INFER here, then hand it to its model."""
        req = decode_infer(body)
        model = self.server.models.get(req.model)
        if model is None:
            raise ModelNotFoundError(f"model {req.model!r} is not loaded; loaded models: "
                                     f"{sorted(self.server.models)}")
        if self.server.draining:
            raise OverloadedError("the server is shutting down and takes no new requests; "
                                  "retry against the restarted server")
        try:
            if req.out_capacity:
                self._check_range("output area", req.out_offset, req.out_capacity)
            inputs = {d.name: self._input(d, req.inline) for d in req.inputs}
            problem = model.signature.check_inputs(
                {d.name: (d.dtype, d.shape) for d in req.inputs})
            if problem:
                raise InvalidInputError(f"model {model.name!r}: {problem}")
            t0 = time.monotonic()
            inputs = model.preprocess(inputs)
            preprocess_s = time.monotonic() - t0
        except TensorBridgeError as exc:
            self._emit_error(seq, rid, exc, model.name)
            self._count(model.name, ErrorCode(exc.code).name.lower(), 0, 0, 0,
                        time.monotonic() - arrived)
            return
        deadline = arrived + req.timeout_us / 1e6 if req.timeout_us else None
        queue = self.server.queue(model.name)
        rows, key = batch_key(inputs) if queue.batching else (None, None)
        job = Job(model, inputs, deadline, arrived, self._complete,
                  {"rid": rid, "seq": seq, "out": (req.out_offset, req.out_capacity),
                   "timeout_us": req.timeout_us, "preprocess_s": preprocess_s},
                  rows=rows, key=key)
        with self._lock:
            self.pending += 1  # before the queue sees it: a worker may finish at once
        self.server.metrics.in_flight(1)
        if not self.server.dispatch(model, job):
            job.finish(OverloadedError(
                f"model {model.name!r} has {model.config.max_queue} requests queued "
                "(max_queue); retry later or raise max_queue"), 0)

    def _complete(self, job: Job, outcome: dict[str, Any] | TensorBridgeError,
                  batch_rows: int) -> None:
        """In the thread that ran the job: postprocess, write the outputs, reply."""
        try:
            frame = self._reply(job, outcome, batch_rows)
        except Exception as exc:  # never leave the request unanswered (pending forever)
            log.exception("internal error answering request %d", job.extra["rid"])
            frame = self._frame(FrameType.ERROR, job.extra["rid"], encode_error(
                ErrorCode.INTERNAL, f"internal server error: {exc!r}"))
        finally:
            job.inputs.clear()  # drop the views into the region before it can be replaced
            del outcome
        self._emit(job.extra["seq"], frame)
        self.server.metrics.in_flight(-1)
        self.finished()

    def _reply(self, job: Job, outcome: dict[str, Any] | TensorBridgeError,
               batch_rows: int) -> bytes:
        """The INFER_OK (outputs written to the region) or ERROR frame for a finished job."""
        rid, model = job.extra["rid"], job.model
        if isinstance(outcome, TensorBridgeError):
            # Not raised: a raised error's traceback would make a reference cycle through
            # this frame and keep region views alive until the next gc run.
            return self._error_frame(job, outcome)
        try:
            t0 = time.monotonic()
            outputs = model.postprocess(outcome)
            t1 = time.monotonic()
            reply = self._place_outputs(outputs, *job.extra["out"])
        except TensorBridgeError as exc:
            return self._error_frame(job, exc)
        except Exception as exc:
            log.exception("internal error on request %d", rid)
            return self._error_frame(job, InternalError(f"internal server error: {exc!r}"))
        done = time.monotonic()
        pre_s = job.extra["preprocess_s"] + (t1 - t0)
        queue_s = max(0.0, job.started - job.arrived - job.extra["preprocess_s"])
        compute_s = done - job.started - (t1 - t0)
        reply.queue_us = int(queue_s * 1e6)
        reply.compute_us = int(compute_s * 1e6)
        reply.preprocess_us = int(pre_s * 1e6)
        reply.batch_size = batch_rows
        self._count(model.name, "ok", queue_s, pre_s, compute_s, done - job.arrived)
        total_ms = (done - job.arrived) * 1000
        slow = self.server.config.slow_ms
        if slow and total_ms > slow:
            log.warning("slow request: model %r took %.1f ms (queued %.1f ms)", model.name,
                        total_ms, queue_s * 1000,
                        extra={"model": model.name, "rid": rid, "total_ms": round(total_ms, 3),
                               "queue_ms": round(queue_s * 1000, 3)})
        return self._frame(FrameType.INFER_OK, rid, encode_infer_ok(reply))

    def _error_frame(self, job: Job, error: TensorBridgeError) -> bytes:
        status = ErrorCode(error.code).name.lower()
        self.server.metrics.error(status, job.model.name)
        self._count(job.model.name, status, 0, 0, 0, time.monotonic() - job.arrived)
        return self._frame(FrameType.ERROR, job.extra["rid"], encode_error(error.code,
                                                                           str(error)))

    def _count(self, model: str, status: str, queue_s: float, pre_s: float, compute_s: float,
               total_s: float) -> None:
        self.server.metrics.request_done(model, status, queue_s=queue_s, preprocess_s=pre_s,
                                         compute_s=compute_s, total_s=total_s)

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
        try:
            if d.location == LOCATION_REGION:
                assert self.region is not None
                tensor = self.region.view(d.dtype.torch, d.offset, d.count, d.shape)
            elif d.count:
                tensor = torch.frombuffer(bytearray(raw), dtype=d.dtype.torch).view(d.shape)
            else:
                tensor = torch.empty(d.shape, dtype=d.dtype.torch)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            # e.g. an empty tensor whose other dims are too large for torch to index
            raise InvalidInputError(f"input {d.name!r}: shape {list(d.shape)} cannot be made "
                                    f"into a tensor ({exc}); send dims below 2^31") from None
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
