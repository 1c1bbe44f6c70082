"""Encoding and decoding of frames and their bodies (spec/protocol.md §3-§7).

Pure functions over bytes: no sockets here, so the golden vectors can exercise every path.
Every length and offset is checked before use; violations raise ``ProtocolError``.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import crc32c as _crc32c

from ._errors import ProtocolError
from ._spec import (
    BY_CODE,
    FLAG_CRC,
    HEADER_SIZE,
    INFER_OPT_ROUTING_KEY,
    INFER_OPT_VERSION,
    LOCATION_INLINE,
    LOCATION_REGION,
    MAGIC,
    MAX_BODY,
    MAX_DIMS,
    MAX_INPUTS,
    MAX_NAME,
    VERSION,
    DType,
    ErrorCode,
    FrameType,
)

_HEADER = struct.Struct("<IBBHQII")  # §3
_ATTACH = struct.Struct("<IIQ")  # §5.1
_ATTACH_OK = struct.Struct("<QQII")  # §5.1
_INFER = struct.Struct("<IHBBQQ")  # §6.1
_INFER_OK = struct.Struct("<HHIIII")  # §6.2
_TENSOR = struct.Struct("<BBBBHHQQII")  # §6.3
_ERROR = struct.Struct("<HHI")  # §7
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_KNOWN_TYPES = frozenset(int(t) for t in FrameType)

_tbcore: ModuleType | None
try:  # the compiled parser (python/csrc/), built by `pip install`
    from . import _tbcore
except ImportError:  # a source tree where nobody built it: the same checks, in Python
    _tbcore = None


def crc32c(data: bytes | memoryview) -> int:
    """CRC-32C (Castagnoli) of ``data``, as PHP's ``hash('crc32c')``."""
    return _crc32c.crc32c(data)


@dataclass(frozen=True)
class Header:
    """A decoded frame header (§3)."""

    type: FrameType
    flags: int
    request_id: int
    body_len: int
    crc: int


@dataclass(frozen=True)
class TensorDesc:
    """A tensor descriptor (§6.3): where a tensor's bytes are and what they mean."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    location: int
    offset: int
    nbytes: int
    crc32c: int = 0

    @property
    def count(self) -> int:
        """Number of items (the product of the shape)."""
        return math.prod(self.shape)


@dataclass
class InferRequest:
    """Body of an INFER frame (§6.1)."""

    timeout_us: int
    model: str
    out_offset: int
    out_capacity: int
    inputs: list[TensorDesc]
    inline: bytes | memoryview = b""
    #: The version asked for (INFER_OPT_VERSION); None = routed by the server (§6.5).
    version: int | None = None
    #: Key for sticky A/B routing (INFER_OPT_ROUTING_KEY); None = weighted random.
    routing_key: bytes | None = None


@dataclass
class InferReply:
    """Body of an INFER_OK frame (§6.2)."""

    queue_us: int
    compute_us: int
    outputs: list[TensorDesc]
    inline: bytes | bytearray | memoryview = field(default=b"")
    preprocess_us: int = 0
    #: Rows of the model call this request was part of (dynamic batching); 0 = not known.
    batch_size: int = 0
    #: The model version that computed the request; 0 = not known.
    version: int = 0


@dataclass(frozen=True)
class AttachOk:
    """Body of an ATTACH_OK frame (§5.1)."""

    region_size: int
    region_cap: int
    max_body: int


def encode_frame(ftype: int, request_id: int, body: bytes = b"", use_crc: bool = False) -> bytes:
    """Header + body of one frame (§3)."""
    if len(body) > MAX_BODY:
        raise ProtocolError(f"frame body of {len(body)} bytes exceeds MAX_BODY ({MAX_BODY})")
    return _HEADER.pack(MAGIC, VERSION, ftype, FLAG_CRC if use_crc else 0, request_id,
                        len(body), crc32c(body) if use_crc else 0) + body


def decode_header(buf: bytes | memoryview) -> Header:
    """Parse and validate a 24-byte frame header (§3)."""
    if _tbcore is not None:
        fields = _tbcore.parse_header(buf)
        if fields is not None:
            return Header(FrameType(fields[0]), *fields[1:])
    return decode_header_py(buf)  # rejected (it says why), or no compiled parser


def decode_header_py(buf: bytes | memoryview) -> Header:
    """``decode_header`` in Python only: the reference the compiled parser is checked against."""
    if len(buf) != HEADER_SIZE:
        raise ProtocolError(f"frame header must be {HEADER_SIZE} bytes, got {len(buf)}")
    magic, version, ftype, flags, request_id, body_len, crc = _HEADER.unpack(buf)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic 0x{magic:08x}: not a TensorBridge peer")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}; this side speaks {VERSION}")
    if ftype not in _KNOWN_TYPES:
        raise ProtocolError(f"unknown frame type 0x{ftype:02x}")
    if flags & ~FLAG_CRC:
        raise ProtocolError(f"unknown frame flags 0x{flags:04x}")
    if body_len > MAX_BODY:
        raise ProtocolError(f"frame body of {body_len} bytes exceeds MAX_BODY ({MAX_BODY})")
    return Header(FrameType(ftype), flags, request_id, body_len, crc)


def check_crc(header: Header, body: bytes | memoryview) -> None:
    """Verify the body checksum when the frame carries one (§3)."""
    if header.flags & FLAG_CRC and crc32c(body) != header.crc:
        raise ProtocolError("frame body checksum mismatch (data corrupted in transit)")


class _Reader:
    """Bounds-checked sequential reader over a body."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes | memoryview) -> None:
        self.buf = memoryview(buf)
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        end = self.pos + n
        if end > len(self.buf):
            raise ProtocolError(f"truncated body: {what} needs {n} bytes at {self.pos}, "
                                f"body has {len(self.buf)}")
        view = self.buf[self.pos:end]
        self.pos = end
        return view

    def unpack(self, st: struct.Struct, what: str) -> tuple[Any, ...]:
        return st.unpack(self.take(st.size, what))

    def text(self, n: int, what: str) -> str:
        try:
            return bytes(self.take(n, what)).decode()
        except UnicodeDecodeError:
            raise ProtocolError(f"{what} is not valid UTF-8") from None

    def rest(self) -> memoryview:
        view = self.buf[self.pos:]
        self.pos = len(self.buf)
        return view

    def done(self, what: str) -> None:
        if self.pos != len(self.buf):
            raise ProtocolError(f"{len(self.buf) - self.pos} unexpected trailing bytes in {what}")


def encode_attach(options: int, min_region: int) -> bytes:
    """ATTACH body (§5.1)."""
    return _ATTACH.pack(options, 0, min_region)


def decode_attach(body: bytes | memoryview) -> tuple[int, int]:
    """ATTACH body -> (options, min_region) (§5.1)."""
    r = _Reader(body)
    options, reserved, min_region = r.unpack(_ATTACH, "ATTACH")
    r.done("ATTACH")
    if reserved or options & ~1:
        raise ProtocolError("ATTACH has unknown options or non-zero reserved bits")
    return options, min_region


def encode_attach_ok(ok: AttachOk) -> bytes:
    """ATTACH_OK body (§5.1)."""
    return _ATTACH_OK.pack(ok.region_size, ok.region_cap, ok.max_body, 0)


def decode_attach_ok(body: bytes | memoryview) -> AttachOk:
    """ATTACH_OK body (§5.1)."""
    r = _Reader(body)
    size, cap, max_body, _ = r.unpack(_ATTACH_OK, "ATTACH_OK")
    r.done("ATTACH_OK")
    return AttachOk(size, cap, max_body)


def encode_error(code: int, message: str) -> bytes:
    """ERROR body (§7)."""
    msg = message.encode()[:65536]
    return _ERROR.pack(code, 0, len(msg)) + msg


def decode_error(body: bytes | memoryview) -> tuple[int, str]:
    """ERROR body -> (code, message) (§7)."""
    r = _Reader(body)
    code, _, n = r.unpack(_ERROR, "ERROR")
    message = r.text(n, "error message")
    r.done("ERROR")
    if code not in set(ErrorCode):
        code = ErrorCode.INTERNAL
    return code, message


def _encode_tensor(t: TensorDesc) -> bytes:
    name = t.name.encode()
    return (_TENSOR.pack(t.dtype.code, len(t.shape), t.location, 0, len(name), 0, t.offset,
                         t.nbytes, t.crc32c, 0)
            + b"".join(_U64.pack(d) for d in t.shape) + name)


def _decode_tensor(r: _Reader) -> TensorDesc:
    code, ndim, location, res1, name_len, res2, offset, nbytes, crc, res3 = r.unpack(
        _TENSOR, "tensor descriptor")
    dtype = BY_CODE.get(code)
    if dtype is None:
        raise ProtocolError(f"unknown dtype code {code}")
    if ndim > MAX_DIMS:
        raise ProtocolError(f"tensor has {ndim} dimensions; at most {MAX_DIMS} are allowed")
    if location not in (LOCATION_REGION, LOCATION_INLINE):
        raise ProtocolError(f"unknown tensor location {location}")
    if res1 or res2 or res3:
        raise ProtocolError("non-zero reserved field in tensor descriptor")
    if not 0 < name_len <= MAX_NAME:
        raise ProtocolError(f"tensor name length {name_len} is not in 1..{MAX_NAME}")
    shape = tuple(_U64.unpack(r.take(8, "tensor shape"))[0] for _ in range(ndim))
    name = r.text(name_len, "tensor name")
    desc = TensorDesc(name, dtype, shape, location, offset, nbytes, crc)
    if dtype.itemsize:
        expected = desc.count * dtype.itemsize
        if expected != nbytes:
            raise ProtocolError(f"tensor {name!r}: shape {list(shape)} of {dtype.name} needs "
                                f"{expected} bytes, descriptor says {nbytes}")
    elif nbytes < 4 * desc.count:
        raise ProtocolError(f"tensor {name!r}: {desc.count} BYTES items need at least "
                            f"{4 * desc.count} bytes, descriptor says {nbytes}")
    return desc


def _decode_tensors(r: _Reader, n: int, what: str) -> tuple[list[TensorDesc], memoryview]:
    tensors = [_decode_tensor(r) for _ in range(n)]
    inline = r.rest()
    names = set()
    for t in tensors:
        if t.name in names:
            raise ProtocolError(f"{what} {t.name!r} appears twice")
        names.add(t.name)
        if t.location == LOCATION_INLINE and t.offset + t.nbytes > len(inline):
            raise ProtocolError(f"{what} {t.name!r}: inline bytes [{t.offset}, "
                                f"{t.offset + t.nbytes}) lie outside the {len(inline)} inline "
                                "bytes of the frame")
    return tensors, inline


def encode_infer(req: InferRequest) -> bytes:
    """INFER body (§6.1)."""
    model = req.model.encode()
    options, optional = 0, b""
    if req.version is not None:
        if not 0 < req.version <= 0xFFFFFFFF:
            raise ValueError(f"version must be 1..{0xFFFFFFFF}, not {req.version}")
        options |= INFER_OPT_VERSION
        optional += _U32.pack(req.version)
    if req.routing_key is not None:
        if not 0 < len(req.routing_key) <= MAX_NAME:
            raise ValueError(f"a routing key must be 1..{MAX_NAME} bytes, not "
                             f"{len(req.routing_key)}")
        options |= INFER_OPT_ROUTING_KEY
        optional += bytes((len(req.routing_key),)) + req.routing_key
    return (_INFER.pack(req.timeout_us, len(model), len(req.inputs), options, req.out_offset,
                        req.out_capacity)
            + model + optional + b"".join(_encode_tensor(t) for t in req.inputs)
            + bytes(req.inline))


def decode_infer(body: bytes | memoryview) -> InferRequest:
    """INFER body (§6.1); region offsets are checked later against the region size."""
    if _tbcore is not None:
        parsed = _tbcore.parse_infer(body)
        if parsed is not None:
            timeout_us, model, out_offset, out_capacity, tensors, start, version, key = parsed
            inputs = [TensorDesc(name, BY_CODE[code], shape, location, offset, nbytes, crc)
                      for name, code, shape, location, offset, nbytes, crc in tensors]
            return InferRequest(timeout_us, model, out_offset, out_capacity, inputs,
                                memoryview(body)[start:], version, key)
    return decode_infer_py(body)  # rejected (it says why), or no compiled parser


def decode_infer_py(body: bytes | memoryview) -> InferRequest:
    """``decode_infer`` in Python only: the reference the compiled parser is checked against."""
    r = _Reader(body)
    timeout_us, model_len, n_inputs, options, out_offset, out_capacity = r.unpack(
        _INFER, "INFER")
    if options & ~(INFER_OPT_VERSION | INFER_OPT_ROUTING_KEY):
        raise ProtocolError(f"unknown INFER option bits 0x{options:02x}")
    if not 0 < model_len <= MAX_NAME:
        raise ProtocolError(f"model name length {model_len} is not in 1..{MAX_NAME}")
    if not 0 < n_inputs <= MAX_INPUTS:
        raise ProtocolError(f"INFER has {n_inputs} inputs; 1..{MAX_INPUTS} are allowed")
    model = r.text(model_len, "model name")
    version = key = None
    if options & INFER_OPT_VERSION:
        (version,) = r.unpack(_U32, "model version")
        if version == 0:
            raise ProtocolError("INFER asks for model version 0; versions start at 1")
    if options & INFER_OPT_ROUTING_KEY:
        key_len = r.take(1, "routing key length")[0]
        if key_len == 0:
            raise ProtocolError("INFER routing key is empty; leave INFER_OPT_ROUTING_KEY off")
        key = bytes(r.take(key_len, "routing key"))
    inputs, inline = _decode_tensors(r, n_inputs, "input")
    return InferRequest(timeout_us, model, out_offset, out_capacity, inputs, inline, version,
                        key)


def encode_infer_ok(reply: InferReply) -> bytes:
    """INFER_OK body (§6.2)."""
    return (_INFER_OK.pack(len(reply.outputs), min(reply.batch_size, 0xFFFF),
                           min(reply.queue_us, 0xFFFFFFFF), min(reply.compute_us, 0xFFFFFFFF),
                           min(reply.preprocess_us, 0xFFFFFFFF), reply.version)
            + b"".join(_encode_tensor(t) for t in reply.outputs) + bytes(reply.inline))


def decode_infer_ok(body: bytes | memoryview) -> InferReply:
    """INFER_OK body (§6.2)."""
    r = _Reader(body)
    n, batch_size, queue_us, compute_us, preprocess_us, version = r.unpack(_INFER_OK,
                                                                           "INFER_OK")
    outputs, inline = _decode_tensors(r, n, "output")
    return InferReply(queue_us, compute_us, outputs, inline, preprocess_us, batch_size,
                      version)


def encode_bytes_items(items: list[bytes]) -> bytes:
    """BYTES tensor payload: u32 length + bytes per item (§2)."""
    return b"".join(_U32.pack(len(b)) + b for b in items)


def decode_bytes_items(buf: bytes | memoryview, count: int) -> list[bytes]:
    """Split a BYTES payload into ``count`` items, checking every length (§2)."""
    r = _Reader(buf)
    items = [bytes(r.take(_U32.unpack(r.take(4, "BYTES length"))[0], "BYTES item"))
             for _ in range(count)]
    r.done("BYTES tensor")
    return items
