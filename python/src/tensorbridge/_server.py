"""The model server: accepts connections on a Unix socket and serves each in its own thread.

A thread per connection keeps a slow model from stalling anything but the connection that
asked for it (torch releases the GIL while it computes), and a blocking ``recv`` is the
cheapest wait measured on this platform (see spec §1).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import struct
import threading
import time
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
    PayloadTooLargeError,
    ProtocolError,
    TensorBridgeError,
)
from ._models import LoadedModel, load_model
from ._region import Region
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


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class Server:
    """Serves loaded models on a Unix socket. ``start()`` returns; ``serve_forever()`` blocks."""

    def __init__(self, config: ServerConfig, models: Iterable[LoadedModel] | None = None) -> None:
        self.config = config
        self.models: dict[str, LoadedModel] = {m.name: m for m in models or ()}
        self.connections: set[_Connection] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopped = threading.Event()
        #: Connections accepted since start (shown by PING, used to check reuse).
        self.accepted = 0

    def load_models(self) -> None:
        """Load every model of the config, in order, logging progress."""
        if self.config.threads > 0:
            torch.set_num_threads(self.config.threads)
        for i, model_config in enumerate(self.config.models, 1):
            log.info("model %d/%d", i, len(self.config.models))
            model = load_model(model_config)
            self.models[model.name] = model

    def start(self) -> None:
        """Bind the socket and start accepting connections in a background thread."""
        path = self.config.socket
        _clear_stale_socket(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        os.chmod(path, self.config.socket_mode)
        listener.listen(512)
        self._listener = listener
        self._accept_thread = threading.Thread(target=self._accept_loop, name="tb-accept",
                                               daemon=True)
        self._accept_thread.start()
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
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            try:
                os.unlink(self.config.socket)
            except FileNotFoundError:
                pass
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        with self._lock:
            conns = list(self.connections)
        for conn in conns:
            conn.shutdown()
        for conn in conns:
            conn.thread.join(timeout=5)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopped.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            conn = _Connection(self, sock)
            log.debug("connection from pid %d (uid %d)", conn.peer_pid, conn.peer_uid)
            with self._lock:
                self.connections.add(conn)
                self.accepted += 1
            conn.thread.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self.connections.discard(conn)

    def status(self) -> bytes:
        """PONG body (spec §4): identity plus connection counters."""
        return json.dumps({"server": "tensorbridge", "version": __version__, "protocol": 1,
                           "pid": os.getpid(), "connections_accepted": self.accepted,
                           "connections_open": len(self.connections),
                           "models": sorted(self.models)}).encode()

    def metadata(self) -> bytes:
        """MODELS_OK body (spec §4.1)."""
        return json.dumps({"models": [m.metadata() for m in self.models.values()]}).encode()


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
    """One client: its socket, its private region, and the thread that serves it."""

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.region: Region | None = None
        self.use_crc = False
        pid, uid, gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        self.peer_pid, self.peer_uid = pid, uid
        self.thread = threading.Thread(target=self.run, name=f"tb-conn-{pid}", daemon=True)

    def shutdown(self) -> None:
        """Wake the serving thread; it then cleans up."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def run(self) -> None:
        """Serve frames until the peer goes away; then release the region."""
        try:
            allowed = self.server.config.allow_uid
            if allowed and self.peer_uid not in allowed:
                self._send_error(0, ErrorCode.UNAUTHORIZED,
                                 f"uid {self.peer_uid} may not use this server; allowed: "
                                 f"{allowed} (--allow-uid)")
                self._hang_up()
                return
            while self._serve_one():
                pass
        except OSError as exc:
            # The peer died or closed mid-frame: nothing to answer.
            log.debug("connection of pid %d ended: %s", self.peer_pid, exc)
        finally:
            if self.region is not None:
                self.region.close()
                self.region = None
            self.sock.close()
            self.server._forget(self)
            log.debug("connection of pid %d closed", self.peer_pid)

    def _hang_up(self) -> None:
        """Close our side, then drain what the peer already sent (bounded), so that closing
        with unread data does not reset the connection before the peer reads our ERROR."""
        self.sock.shutdown(socket.SHUT_WR)
        self.sock.settimeout(1.0)
        while self.sock.recv(65536):
            pass

    def _recv_exact(self, n: int) -> bytearray | None:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                return None
            got += k
        return buf

    def _serve_one(self) -> bool:
        head = self._recv_exact(HEADER_SIZE)
        if head is None:
            return False
        arrived = time.monotonic()
        try:
            header = decode_header(head)
        except ProtocolError as exc:
            # The framing is lost: answer once and hang up (spec §3).
            self._send_error(0, ErrorCode.PROTOCOL_ERROR, str(exc))
            self._hang_up()
            return False
        body = self._recv_exact(header.body_len)
        if body is None:
            return False
        rid = header.request_id
        try:
            check_crc(header, body)
            self._dispatch(header.type, rid, body, arrived)
        except TensorBridgeError as exc:
            self._send_error(rid, exc.code, str(exc))
        except OSError:
            raise  # the peer went away while we answered: run() cleans up
        except Exception as exc:  # a server bug must not take the connection down
            log.exception("internal error on request %d", rid)
            self._send_error(rid, ErrorCode.INTERNAL, f"internal server error: {exc!r}")
        return True

    def _send(self, ftype: FrameType, rid: int, body: bytes = b"") -> None:
        self.sock.sendall(encode_frame(ftype, rid, body, self.use_crc))

    def _send_error(self, rid: int, code: int, message: str) -> None:
        self._send(FrameType.ERROR, rid, encode_error(code, message))

    def _dispatch(self, ftype: FrameType, rid: int, body: bytearray, arrived: float) -> None:
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

    def _infer(self, rid: int, body: bytearray, arrived: float) -> None:
        req = decode_infer(body)
        model = self.server.models.get(req.model)
        if model is None:
            raise ModelNotFoundError(f"model {req.model!r} is not loaded; loaded models: "
                                     f"{sorted(self.server.models)}")
        deadline = arrived + req.timeout_us / 1e6 if req.timeout_us else None
        if req.out_capacity:
            self._check_range("output area", req.out_offset, req.out_capacity)
        inputs = {d.name: self._input(d, req.inline) for d in req.inputs}
        problem = model.signature.check_inputs({d.name: (d.dtype, d.shape) for d in req.inputs})
        if problem:
            raise InvalidInputError(f"model {model.name!r}: {problem}")
        try:
            outputs, waited = model.run(inputs, deadline)
        except TimeoutError:
            raise DeadlineExceededError(
                f"the request's deadline ({req.timeout_us / 1000:.1f} ms) passed before model "
                f"{model.name!r} could run; it was not computed") from None
        del inputs  # drop the views into the region before it can be replaced
        started = arrived + waited
        reply = self._place_outputs(outputs, req.out_offset, req.out_capacity)
        done = time.monotonic()
        reply.queue_us = int(waited * 1e6)
        reply.compute_us = int((done - started) * 1e6)
        self._send(FrameType.INFER_OK, rid, encode_infer_ok(reply))
        slow = self.server.config.slow_ms
        if slow and (done - arrived) * 1000 > slow:
            log.warning("slow request: model %r took %.1f ms (queue %.1f ms)", model.name,
                        (done - arrived) * 1000, waited * 1000)

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
