"""Request handling: an INFER body -> a typed ``Request`` -> its model -> the reply frame."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .._errors import (
    InternalError,
    InvalidInputError,
    ModelError,
    OverloadedError,
    PayloadTooLargeError,
    ProtocolError,
    TensorBridgeError,
)
from .._models import LoadedModel
from .._region import Region
from .._request import Request
from .._scheduler import batch_key
from .._spec import (
    ALIGN,
    BY_TORCH,
    BYTES,
    LOCATION_INLINE,
    LOCATION_REGION,
    MAX_BODY,
    DType,
    ErrorCode,
    FrameType,
)
from .._wire import (
    InferReply,
    InferRequest,
    TensorDesc,
    crc32c,
    decode_bytes_items,
    decode_infer,
    encode_bytes_items,
    encode_error,
    encode_infer_ok,
)

if TYPE_CHECKING:
    from .connection import Peer

log = logging.getLogger("tensorbridge")
_SMALL = 1 << 16  # outputs up to this size are written with one bytes copy


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def build_request(conn: Peer, rid: int, body: bytes, arrived: float, seq: int
                  ) -> Request | None:
    """Decode, validate and preprocess an INFER; None when it was already answered with an
    error about its inputs. Frame-level problems (unknown model, draining) raise."""
    frame = decode_infer(body)

    def inputs() -> tuple[dict[str, Any], dict[str, tuple[DType, tuple[int, ...]]]]:
        if frame.out_capacity:
            _check_range(conn, "output area", frame.out_offset, frame.out_capacity)
        return ({d.name: _input(conn, d, frame.inline) for d in frame.inputs},
                {d.name: (d.dtype, d.shape) for d in frame.inputs})

    return admit(conn, rid, seq, arrived, frame, inputs)


def admit(conn: Peer, rid: int, seq: int, arrived: float, frame: InferRequest,
          inputs: Callable[[], tuple[dict[str, Any], dict[str, tuple[DType, tuple[int, ...]]]]]
          ) -> Request | None:
    """The checks and preprocessing of a decoded INFER, whose tensors ``inputs()`` makes (and
    whose (dtype, shape) by name it gives for the signature check): a ``Request``, or None
    when it was already answered with an error about its inputs. Frame-level problems
    (unknown model, draining) raise."""
    server = conn.server
    if server.draining:
        raise OverloadedError("the server is shutting down and takes no new requests; "
                              "retry against the restarted server")
    # From here on the request holds a use of its version until answered (reloads wait).
    served = server.registry.resolve(frame.model, frame.version, frame.routing_key)
    model, queue = served.model, served.queue
    assert model is not None and queue is not None  # resolve gives ready versions only
    try:
        tensors, given = inputs()
        problem = model.signature.check_inputs(given)
        if problem:
            raise InvalidInputError(f"model {model.name!r}: {problem}")
        preprocess_s = 0.0
        if model.pipeline.preprocess is not None:
            t0 = time.monotonic()
            tensors = model.preprocess(tensors)
            preprocess_s = time.monotonic() - t0
    except TensorBridgeError as exc:
        served.release()
        conn.emit_error(seq, rid, exc, model.name)
        count(conn, model, ErrorCode(exc.code).name.lower(), 0, 0, 0,
               time.monotonic() - arrived)
        return None
    except BaseException:
        served.release()
        raise
    deadline = arrived + frame.timeout_us / 1e6 if frame.timeout_us else None
    rows, key = batch_key(tensors, model.pipeline.pad) if queue.batching else (None, None)
    return Request(frame, rid, seq, conn, model, tensors, arrived, deadline, rows=rows, key=key,
                   preprocess_s=preprocess_s, served=served)


def queue_full(model: LoadedModel) -> OverloadedError:
    """The answer for a request its model's full queue could not take."""
    return OverloadedError(f"model {model.name!r} has {model.config.max_queue} requests queued "
                           "(max_queue); retry later or raise max_queue")


def reply_frame(conn: Peer, request: Request) -> bytes:
    """The INFER_OK (outputs written to the region) or ERROR frame of a finished request.

    Drops the request's inputs and outputs: views into the region must not outlive it."""
    try:
        return _reply(conn, request)
    except Exception as exc:  # never leave the request unanswered (pending forever)
        log.exception("internal error answering request %d", request.request_id)
        return conn.frame(FrameType.ERROR, request.request_id, encode_error(
            ErrorCode.INTERNAL, f"internal server error: {exc!r}"))
    finally:
        request.inputs.clear()
        request.result = None


def _reply(conn: Peer, request: Request) -> bytes:
    outcome, model, rid = request.result, request.model, request.request_id
    if isinstance(outcome, TensorBridgeError):
        # Not raised: a raised error's traceback would make a reference cycle through
        # this frame and keep region views alive until the next gc run.
        return _error_frame(conn, request, outcome)
    assert outcome is not None
    try:
        t0 = time.monotonic()
        outputs = model.postprocess(outcome)
        t1 = time.monotonic()
        reply = _place_outputs(conn, outputs, request.frame.out_offset,
                               request.frame.out_capacity)
    except TensorBridgeError as exc:
        return _error_frame(conn, request, exc)
    except Exception as exc:
        log.exception("internal error on request %d", rid)
        return _error_frame(conn, request, InternalError(f"internal server error: {exc!r}"))
    finally:
        del outcome
    done = time.monotonic()
    pre_s = request.preprocess_s + (t1 - t0)
    queue_s = max(0.0, request.started - request.arrived - request.preprocess_s)
    compute_s = done - request.started - (t1 - t0)
    reply.queue_us = int(queue_s * 1e6)
    reply.compute_us = int(compute_s * 1e6)
    reply.preprocess_us = int(pre_s * 1e6)
    reply.batch_size = request.batch_rows
    reply.version = model.version
    record_ok(conn, request, queue_s, pre_s, compute_s, done)
    return conn.frame(FrameType.INFER_OK, rid, encode_infer_ok(reply))


def record_ok(conn: Peer, request: Request, queue_s: float, pre_s: float, compute_s: float,
              done: float) -> None:
    """Count an answered request in the metrics, and log it if slow."""
    model = request.model
    count(conn, model, "ok", queue_s, pre_s, compute_s, done - request.arrived)
    total_ms = (done - request.arrived) * 1000
    slow = conn.server.config.slow_ms
    if slow and total_ms > slow:
        log.warning("slow request: model %r took %.1f ms (queued %.1f ms)", model.name,
                    total_ms, queue_s * 1000,
                    extra={"model": model.name, "rid": request.request_id,
                           "total_ms": round(total_ms, 3), "queue_ms": round(queue_s * 1000, 3)})


def _error_frame(conn: Peer, request: Request, error: TensorBridgeError) -> bytes:
    status = ErrorCode(error.code).name.lower()
    conn.server.metrics.error(status, request.model.name)
    count(conn, request.model, status, 0, 0, 0, time.monotonic() - request.arrived)
    return conn.frame(FrameType.ERROR, request.request_id, encode_error(error.code, str(error)))


def count(conn: Peer, model: LoadedModel, status: str, queue_s: float, pre_s: float,
          compute_s: float, total_s: float) -> None:
    """Record one answered INFER in the metrics."""
    conn.server.metrics.answered(model.name, model.version, status, queue_s, pre_s, compute_s,
                                 total_s)


def _check_range(conn: Peer, what: str, offset: int, nbytes: int) -> None:
    if conn.region is None:
        raise ProtocolError(f"{what} refers to the region, but no ATTACH was sent on this "
                            "connection")
    if offset % ALIGN:
        raise ProtocolError(f"{what} offset {offset} is not a multiple of {ALIGN}")
    if offset + nbytes > conn.region.size:
        raise ProtocolError(f"{what} [{offset}, {offset + nbytes}) lies outside the "
                            f"{conn.region.size}-byte region")


def _input(conn: Peer, d: TensorDesc, inline: memoryview | bytes) -> Any:
    region = conn.region
    if d.location == LOCATION_REGION:
        _check_range(conn, f"input {d.name!r}", d.offset, d.nbytes)
        assert region is not None
        if conn.use_crc or d.dtype is BYTES:
            raw = region.read(d.offset, d.nbytes)
    else:
        raw = bytes(inline[d.offset:d.offset + d.nbytes])
    if conn.use_crc and crc32c(raw) != d.crc32c:
        raise ProtocolError(f"input {d.name!r}: checksum mismatch (data corrupted)")
    if d.dtype is BYTES:
        try:
            return decode_bytes_items(raw, d.count)
        except ProtocolError as exc:
            raise InvalidInputError(f"input {d.name!r}: malformed BYTES tensor: {exc}"
                                    ) from None
    assert d.dtype.torch is not None
    if d.location == LOCATION_REGION:
        assert region is not None
        tensor = region_input(region, d.name, d.dtype, d.offset, d.count, d.shape)
    else:
        try:
            if d.count:
                tensor = torch.frombuffer(bytearray(raw), dtype=d.dtype.torch).view(d.shape)
            else:
                tensor = torch.empty(d.shape, dtype=d.dtype.torch)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise _unshapeable(d.name, d.shape, exc) from None
    if d.dtype.name == "BOOL" and d.count and tensor.view(torch.uint8).max() > 1:
        raise InvalidInputError(f"input {d.name!r}: BOOL items must be 0 or 1")
    return tensor


def region_input(region: Region, name: str, dtype: DType, offset: int, count: int,
                 shape: tuple[int, ...]) -> Any:
    """A tensor viewing an input in the region (bounds checked by the caller)."""
    assert dtype.torch is not None
    try:
        return region.view(dtype.torch, offset, count, shape)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise _unshapeable(name, shape, exc) from None


def _unshapeable(name: str, shape: tuple[int, ...], exc: Exception) -> InvalidInputError:
    # e.g. an empty tensor whose other dims are too large for torch to index
    return InvalidInputError(f"input {name!r}: shape {list(shape)} cannot be made into a "
                             f"tensor ({exc}); send dims below 2^31")


def _place_outputs(conn: Peer, outputs: dict[str, Any], out_offset: int,
                   out_capacity: int) -> InferReply:
    region, use_crc = conn.region, conn.use_crc
    prepared = [_prepare_output(name, value) for name, value in outputs.items()]
    end = out_offset + out_capacity
    cursor = out_offset
    descs: list[TensorDesc] = []
    inline = bytearray()
    for name, dtype, value, nbytes, data in prepared:
        offset = _align(cursor)
        if region is not None and out_capacity and offset + nbytes <= end:
            if data is None and nbytes <= _SMALL and dtype.name != "BF16":
                data = value.numpy().tobytes()  # cheaper than a tensor copy when small
            if data is not None:
                region.write(offset, data)
            elif nbytes:
                region.view(dtype.torch, offset, value.numel(), value.shape).copy_(value)
            location, cursor = LOCATION_REGION, offset + nbytes
            checksum = crc32c(region.read(offset, nbytes)) if use_crc else 0
        else:
            if data is None:
                data = value.reshape(-1).view(torch.uint8).numpy().tobytes()
            location, offset = LOCATION_INLINE, len(inline)
            inline += data
            checksum = crc32c(data) if use_crc else 0
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

