"""A Python client, the reference peer for tests, benchmarks and Python callers."""

from __future__ import annotations

import json
import mmap
import os
import random
import select
import socket
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ._config import default_socket_path
from ._errors import (
    ConnectionError,
    ProtocolError,
    TensorBridgeError,
    TimeoutError,
    error_for_code,
)
from ._spec import (
    ALIGN,
    BY_TORCH,
    BYTES,
    HEADER_SIZE,
    LOCATION_REGION,
    OPT_CRC,
    FrameType,
)
from ._wire import (
    InferRequest,
    TensorDesc,
    check_crc,
    crc32c,
    decode_bytes_items,
    decode_error,
    decode_header,
    decode_infer_ok,
    encode_attach,
    encode_bytes_items,
    encode_frame,
    encode_infer,
)

_Input = torch.Tensor | np.ndarray | list[Any]


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class Client:
    """One connection to a ``tensorbridge serve`` process, with its shared-memory region.

    >>> with Client("/tmp/tb.sock") as c:
    ...     out = c.infer("digits", {"input": torch.zeros(1, 64)})
    """

    def __init__(self, socket_path: str | None = None, timeout: float = 1.0,
                 checksums: bool = False) -> None:
        self.socket_path = socket_path or default_socket_path()
        self.timeout = timeout
        self.checksums = checksums
        self._sock: socket.socket | None = None
        self._mm: mmap.mmap | None = None
        self._next_id = random.randrange(1, 1 << 40)
        #: The model version that answered the last ``infer`` (0 = not known).
        self.last_version = 0

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; the server frees the region."""
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def ping(self) -> dict[str, Any]:
        """Server name, version and protocol."""
        pong: dict[str, Any] = json.loads(bytes(self._call(FrameType.PING, b"", FrameType.PONG)))
        return pong

    def models(self) -> list[dict[str, Any]]:
        """Loaded models with their signatures (spec §4.1)."""
        reply = json.loads(bytes(self._call(FrameType.MODELS, b"", FrameType.MODELS_OK)))
        models: list[dict[str, Any]] = reply["models"]
        return models

    def admin(self, command: str, model: str | None = None,
              timeout: float | None = None) -> list[dict[str, Any]]:
        """A lifecycle command (spec §11): ``list``, ``load``, ``unload``, ``reload``; returns
        the models concerned with their versions and states. ``load``/``reload`` answer once
        the new versions are ready, so give them a ``timeout`` long enough to load a model."""
        body = json.dumps({"command": command, **({"model": model} if model else {})})
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        reply = self._call(FrameType.ADMIN, body.encode(), FrameType.ADMIN_OK, deadline)
        models: list[dict[str, Any]] = json.loads(bytes(reply))["models"]
        return models

    def infer(self, model: str, inputs: Mapping[str, _Input], version: int | None = None,
              routing_key: str | bytes | None = None) -> dict[str, Any]:
        """Run ``model`` (``version`` pins one; ``routing_key`` keeps A/B routing sticky);
        returns outputs as tensors (BYTES outputs as lists of bytes). ``last_version`` then
        says which version answered."""
        prepared = [(name, *_as_payload(value)) for name, value in inputs.items()]
        in_bytes = sum(_align(len(p[3]) if p[3] is not None else p[2].nbytes)
                       for p in prepared)
        # Outputs often mirror inputs in size; larger ones still arrive, inline.
        mm = self._region(2 * in_bytes + 65536)
        deadline = time.monotonic() + self.timeout
        offset, descs = 0, []
        for name, dtype, tensor, raw in prepared:
            if raw is None:
                raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() \
                    if tensor.numel() else b""
            mm[offset:offset + len(raw)] = raw
            descs.append(TensorDesc(name, dtype, tuple(tensor.shape) if dtype is not BYTES
                                    else (len(tensor),), LOCATION_REGION, offset, len(raw),
                                    crc32c(raw) if self.checksums else 0))
            offset = _align(offset + len(raw))
        key = routing_key.encode() if isinstance(routing_key, str) else routing_key
        req = InferRequest(int(self.timeout * 1e6), model, offset, len(mm) - offset, descs,
                           version=version, routing_key=key)
        reply = decode_infer_ok(self._call(FrameType.INFER, encode_infer(req),
                                           FrameType.INFER_OK, deadline))
        self.last_version = reply.version
        out: dict[str, Any] = {}
        for d in reply.outputs:
            raw = mm[d.offset:d.offset + d.nbytes] if d.location == LOCATION_REGION \
                else bytes(reply.inline[d.offset:d.offset + d.nbytes])
            if self.checksums and crc32c(raw) != d.crc32c:
                raise ProtocolError(f"output {d.name!r}: checksum mismatch")
            if d.dtype is BYTES:
                out[d.name] = decode_bytes_items(raw, d.count)
            else:
                assert d.dtype.torch is not None
                out[d.name] = (torch.frombuffer(bytearray(raw), dtype=d.dtype.torch)
                               if d.nbytes else torch.empty(0, dtype=d.dtype.torch)
                               ).view(d.shape)
        return out

    # -- internals ---------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.socket_path)
            except OSError as exc:
                sock.close()
                raise ConnectionError(
                    f"cannot connect to {self.socket_path}: {exc.strerror}. Is `tensorbridge "
                    f"serve --socket {self.socket_path}` running?") from exc
            self._sock = sock
        return self._sock

    def _region(self, needed: int) -> mmap.mmap:
        if self._mm is not None and len(self._mm) >= needed:
            return self._mm
        sock = self._connect()
        body = encode_attach(OPT_CRC if self.checksums else 0, needed)
        self._call(FrameType.ATTACH, body, FrameType.ATTACH_OK)
        _, fds, _, _ = socket.recv_fds(sock, 1, 1)
        if not fds:
            raise ProtocolError("ATTACH_OK came without the region descriptor")
        if self._mm is not None:
            self._mm.close()
        try:
            self._mm = mmap.mmap(fds[0], os.fstat(fds[0]).st_size)
        finally:
            for fd in fds:
                os.close(fd)
        return self._mm

    def _call(self, ftype: FrameType, body: bytes, want: FrameType,
              deadline: float | None = None) -> memoryview:
        sock = self._connect()
        rid = self._next_id
        self._next_id += 1
        deadline = deadline or time.monotonic() + self.timeout
        try:
            try:
                sock.sendall(encode_frame(ftype, rid, body, self.checksums))
            except OSError:
                # The server may have refused us and hung up (e.g. UNAUTHORIZED) before our
                # frame went out: its ERROR is still readable, and says more than EPIPE.
                self._raise_connection_error(deadline)
                raise
            while True:
                header = decode_header(self._recv(HEADER_SIZE, deadline))
                reply = self._recv(header.body_len, deadline)
                check_crc(header, reply)
                if header.type == FrameType.ERROR and header.request_id == 0:
                    raise error_for_code(*decode_error(reply))  # about the connection itself
                if header.request_id != rid:
                    continue  # a late reply to an abandoned request
                if header.type == FrameType.ERROR:
                    raise error_for_code(*decode_error(reply))
                if header.type != want:
                    raise ProtocolError(f"expected {want.name}, got {header.type.name}")
                return reply
        except (ProtocolError, ConnectionError, TimeoutError):
            self.close()  # the stream position is unknown: start afresh next time
            raise
        except OSError as exc:
            self.close()
            raise ConnectionError(f"connection to {self.socket_path} failed: {exc}") from exc

    def _raise_connection_error(self, deadline: float) -> None:
        """Raise the connection-level ERROR the server left in our receive buffer, if any."""
        try:
            header = decode_header(self._recv(HEADER_SIZE, min(deadline,
                                                               time.monotonic() + 0.5)))
            reply = self._recv(header.body_len, deadline)
        except (TensorBridgeError, OSError):
            return
        if header.type == FrameType.ERROR and header.request_id == 0:
            raise error_for_code(*decode_error(reply))

    def _recv(self, n: int, deadline: float) -> memoryview:
        assert self._sock is not None
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._sock], [], [], left)[0]:
                raise TimeoutError(f"no reply within {self.timeout:.3f} s")
            k = self._sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionError("the server closed the connection (did it crash or "
                                      "restart?)")
            got += k
        return view


def _as_payload(value: _Input) -> tuple[Any, Any, bytes | None]:
    """(dtype, tensor-or-list, encoded BYTES payload or None)."""
    if isinstance(value, list) and all(isinstance(v, (bytes, str)) for v in value):
        items = [v.encode() if isinstance(v, str) else v for v in value]
        return BYTES, items, encode_bytes_items(items)
    tensor = torch.as_tensor(value).contiguous()
    dtype = BY_TORCH.get(tensor.dtype)
    if dtype is None:
        raise TypeError(f"tensors of dtype {tensor.dtype} cannot be sent")
    return dtype, tensor, None
