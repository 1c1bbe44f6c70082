"""One client connection: its socket, its region, its framing and the order of its replies."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .._errors import (
    InternalError,
    PayloadTooLargeError,
    ProtocolError,
    TensorBridgeError,
)
from .._region import Region
from .._request import Request
from .._spec import FD_CARRIER, HEADER_SIZE, MAX_BODY, OPT_CRC, PAGE, ErrorCode, FrameType
from .._wire import (
    AttachOk,
    Header,
    check_crc,
    decode_attach,
    decode_header,
    encode_attach_ok,
    encode_error,
    encode_frame,
)
from . import admin, infer

if TYPE_CHECKING:
    from .lifecycle import Server

log = logging.getLogger("tensorbridge")
_READ_CHUNK = 1 << 20
#: Pipelined INFERs one connection may have waiting at once; more are read when some finish.
_MAX_PENDING = 256


_chunks = threading.local()


def _chunk() -> memoryview:
    """This thread's read buffer: ``recv`` of a fresh 1 MiB bytes per read cost an mmap and
    an munmap per request."""
    chunk = getattr(_chunks, "view", None)
    if chunk is None:
        chunk = _chunks.view = memoryview(bytearray(_READ_CHUNK))
    return chunk


def hang_up(sock: socket.socket) -> None:
    """Shut our side, then discard what the peer already sent, so that closing with unread
    data does not reset the connection before the peer has read our ERROR."""
    sock.shutdown(socket.SHUT_WR)
    try:
        while sock.recv(65536, socket.MSG_DONTWAIT):
            pass
    except OSError:
        pass


class Peer:
    """What the request path needs of a client connection, whichever loop serves it: the
    region, the frame dispatch (shared here) and the ordered replies (each loop's own)."""

    server: Server
    peer_pid: int
    peer_uid: int
    peer_gid: int
    region: Region | None
    use_crc: bool
    #: Whether a loop thread is parsing it now (idle connections are closed only when not).
    owned: bool

    def in_flight(self) -> int:
        """Frames received and not answered yet."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the region and the socket."""
        raise NotImplementedError

    def emit(self, seq: int, frame: bytes, fds: list[int] | None = None) -> None:
        """Send the reply to frame ``seq`` once every earlier reply is out."""
        raise NotImplementedError

    def answer(self, request: Request) -> None:
        """In the thread that ran ``request``: write its reply, then count it finished."""
        raise NotImplementedError

    def answer_later(self, seq: int, work: Callable[[], bytes]) -> None:
        """Run ``work`` in a thread of its own and send the frame it returns as the reply to
        frame ``seq`` (slow commands: loading a model must not hold a loop thread)."""
        raise NotImplementedError

    def _submit(self, request: Request) -> None:
        raise NotImplementedError

    def _region_changed(self) -> None:
        """The region was made, grown or its checksum setting changed (before ATTACH_OK)."""

    def _release(self) -> None:
        """Leave the server's books and free the region (once, when closing)."""
        self.server.forget(self)
        if self.region is not None:
            self.server.release_shm(self.region.size)
            self.region.close()
            self.region = None
        log.debug("connection of pid %d closed", self.peer_pid)

    # -- shared by both loops ------------------------------------------------------------

    def frame(self, ftype: FrameType, rid: int, body: bytes = b"") -> bytes:
        """A frame with this connection's checksum setting."""
        return encode_frame(ftype, rid, body, self.use_crc)

    def emit_error(self, seq: int, rid: int, exc: TensorBridgeError,
                   model: str | None = None) -> None:
        """Answer frame ``seq`` with an ERROR (counted in the metrics)."""
        self.server.metrics.error(ErrorCode(exc.code).name, model)
        self.emit(seq, self.frame(FrameType.ERROR, rid, encode_error(exc.code, str(exc))))

    def _dispatch(self, header: Header, body: bytes, arrived: float, seq: int) -> None:
        ftype, rid = header.type, header.request_id
        if ftype == FrameType.INFER:
            request = infer.build_request(self, rid, body, arrived, seq)
            if request is not None:
                self._submit(request)
        elif ftype == FrameType.ATTACH:
            self._attach(rid, body, seq)
        elif ftype == FrameType.PING:
            self.emit(seq, self.frame(FrameType.PONG, rid, self.server.status()))
        elif ftype == FrameType.MODELS:
            self.emit(seq, self.frame(FrameType.MODELS_OK, rid, self.server.metadata()))
        elif ftype == FrameType.ADMIN:
            admin.handle(self, rid, body, seq)
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
        assert self.region is not None  # kept, grown or made just above
        self._region_changed()
        ok = AttachOk(self.region.size, config.region_cap, MAX_BODY)
        self.emit(seq, self.frame(FrameType.ATTACH_OK, rid, encode_attach_ok(ok)),
                  [self.region.fd])


class Connection(Peer):
    """One client: its socket, its private region, its unparsed bytes and its requests.

    At most one pool thread reads and parses a connection at a time (the one that got its
    one-shot event, or a resume: ``owned``). INFERs are handed to their model and may finish
    in other threads, in any order; replies still leave in request order (spec §5.2) because
    each frame gets a sequence number and ``emit`` holds back a reply until every earlier
    one is out. ATTACH, PING and MODELS wait until no INFER is pending (an ATTACH may replace
    the region the pending ones read), which also keeps the cheap replies in order.
    """

    def __init__(self, server: Server, sock: socket.socket, peer_pid: int, peer_uid: int,
                 peer_gid: int) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.peer_pid, self.peer_uid, self.peer_gid = peer_pid, peer_uid, peer_gid
        self.region: Region | None = None
        self.use_crc = False
        self.pending = 0  # INFERs received and not answered yet
        self.owned = False  # a pool thread is parsing our frames
        self.paused = False  # the next frame waits for pending requests to finish
        self.eof = False  # the peer hung up (or a reply failed): close once nothing is pending
        self.closed = False
        self.lock = threading.Lock()  # guards pending / owned / paused / eof / closed
        self._buf = bytearray()
        self._send_lock = threading.Lock()
        self._next_seq = 0
        self._send_seq = 0
        self._ready: dict[int, tuple[bytes, list[int]]] = {}

    def in_flight(self) -> int:
        return self.pending

    def close(self) -> None:
        """Release the region and the socket. The client's copy of the memfd is its own."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
        self._release()
        self.sock.close()

    def _close_when_idle(self) -> None:
        with self.lock:
            self.eof = True
            idle = self.pending == 0
        if idle:
            self.close()

    # -- reading and parsing (the owning pool thread) --------------------------------------

    def on_readable(self) -> None:
        """Our one-shot event fired (data or EOF): this thread now owns the connection."""
        with self.lock:
            if self.closed:
                return
            self.owned = True
        if self._read() == 0:
            with self.lock:
                self.owned = False
            self._close_when_idle()  # not re-armed: EOF would fire forever
            return
        self._serve_owned()

    def _read(self) -> int:
        """Append what the socket holds to the buffer: bytes read, 0 at EOF (or a failed
        socket), -1 when nothing is there yet."""
        chunk = _chunk()
        try:
            n = self.sock.recv_into(chunk, _READ_CHUNK, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return -1
        except OSError as exc:
            log.debug("connection of pid %d failed: %s", self.peer_pid, exc)
            return 0
        if n:
            self._buf += chunk[:n]
        return n

    def resume(self) -> None:
        """A pool thread serves frames that had to wait for pending requests."""
        if not self.closed:
            self._serve_owned()

    def answer(self, request: Request) -> None:
        """In the thread that ran ``request``: write its reply, then count it finished."""
        self.emit(request.seq, infer.reply_frame(self, request))
        if request.served is not None:
            request.served.release()
        self.server.metrics.answered_one()
        self._finished()

    def answer_later(self, seq: int, work: Callable[[], bytes]) -> None:
        """Run ``work`` in a thread of its own and send the frame it returns as the reply to
        frame ``seq`` (slow commands: loading a model must not hold a pool thread)."""
        with self.lock:
            self.pending += 1

        def run() -> None:
            try:
                self.emit(seq, work())
            finally:
                self._finished()

        threading.Thread(target=run, name=f"tb-admin-{self.peer_pid}", daemon=True).start()

    def _finished(self) -> None:
        """One of our INFERs is answered: close if the peer is gone, or resume a paused frame."""
        resume = close = False
        with self.lock:
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
        """Whether the next complete frame must wait (call with ``lock`` held)."""
        if not self._has_frame():
            return False
        if self._buf[5] == FrameType.INFER:
            return self.pending >= _MAX_PENDING
        return self.pending > 0

    def _serve_owned(self) -> None:
        """Serve complete frames until none is left or one must wait; then let go."""
        while True:
            self._serve_buffered()
            with self.lock:
                if self.closed or self.eof:
                    self.owned = False
                    gone = self.eof and not self.closed
                    break
                if self._has_frame():
                    if not self._blocked():
                        continue  # a request finished while we were checking
                    self.paused = True  # _finished() hands the connection back
                    self.owned = False
                    return
            # No complete frame: the next one may already be on the socket (a pipelining
            # client, or one quicker than our way back to epoll). Reading it here spares a
            # hand-off to another pool thread: a wake-up and a GIL switch.
            n = self._read()
            if n > 0:
                continue
            with self.lock:
                self.owned = False
            if n == 0:
                self._close_when_idle()  # the peer hung up
            else:
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
                with self.lock:
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
            hang_up(self.sock)
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
            self.emit_error(seq, rid, exc)
        except OSError:
            raise
        except Exception as exc:  # a server bug must not take the connection down
            log.exception("internal error on request %d", rid)
            self.emit_error(seq, rid, InternalError(f"internal server error: {exc!r}"))
        return True

    def _submit(self, request: Request) -> None:
        with self.lock:
            self.pending += 1  # before the queue sees it: a worker may finish at once
        self.server.metrics.received()
        if not self.server.dispatch(request):
            request.finish(infer.queue_full(request.model), 0)

    # -- replying (any thread) ---------------------------------------------------------------

    def emit(self, seq: int, frame: bytes, fds: list[int] | None = None) -> None:
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
