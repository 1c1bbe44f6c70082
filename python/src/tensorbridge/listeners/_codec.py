"""OIP tensors <-> ``Tensor``: raw little-endian bytes (the binary tensor extension and gRPC's
``raw_*_contents``), JSON ``data`` lists and gRPC typed ``contents``.

Datatypes are the protocol's names (``FP32``, ``BYTES``...); every one TensorBridge serves
travels both ways. FP16 and BF16 in JSON are plain numbers (rounded to the nearest 16-bit
value on the way in, widened exactly on the way out); BYTES in JSON are UTF-8 strings.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .._errors import InvalidInputError, ProtocolError
from .._spec import BY_NAME, BYTES, MAX_DIMS, DType
from .._wire import decode_bytes_items
from ._gateway import Tensor

#: Dims above this cannot be indexed by torch on every platform.
_MAX_DIM = (1 << 31) - 1
_NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "INT8": np.int8, "INT16": np.int16,
          "INT32": np.int32, "INT64": np.int64, "FP16": np.float16, "FP32": np.float32,
          "FP64": np.float64, "BF16": np.float32}
_INTS = ("UINT8", "INT8", "INT16", "INT32", "INT64")
_FLOATS = ("FP16", "FP32", "FP64", "BF16")


def datatype(name: Any, where: str) -> DType:
    """The protocol datatype named ``name`` (exact protocol spelling)."""
    dtype = BY_NAME.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise InvalidInputError(f"{where}: datatype {name!r} is not one of "
                                f"{', '.join(BY_NAME)}")
    return dtype


def shape_of(raw: Any, where: str) -> tuple[int, ...]:
    """A checked shape: up to MAX_DIMS non-negative integer dims."""
    if not isinstance(raw, (list, tuple)) or len(raw) > MAX_DIMS or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_DIM for d in raw):
        raise InvalidInputError(f"{where}: shape must be a list of up to {MAX_DIMS} integers "
                                f"from 0 to {_MAX_DIM}, got {raw!r}")
    return tuple(raw)


def from_raw(name: str, dtype: DType, shape: tuple[int, ...],
             raw: bytes | bytearray | memoryview) -> Tensor:
    """An input from its raw bytes (a writable buffer is used in place, not copied)."""
    count = math.prod(shape)
    if dtype is BYTES:
        try:
            return Tensor(name, dtype, shape, decode_bytes_items(memoryview(raw), count))
        except ProtocolError as exc:
            raise InvalidInputError(f"input {name!r}: malformed BYTES tensor ({count} items "
                                    f"of 4-byte length + bytes expected): {exc}") from None
    assert dtype.torch is not None
    if len(raw) != count * dtype.itemsize:
        raise InvalidInputError(f"input {name!r}: {len(raw)} bytes for shape {list(shape)} "
                                f"of {dtype.name}; expected {count * dtype.itemsize}")
    if not count:
        return Tensor(name, dtype, shape, torch.empty(shape, dtype=dtype.torch))
    if isinstance(raw, bytes) or (isinstance(raw, memoryview) and raw.readonly):
        raw = bytearray(raw)  # torch warns on (and must not write into) a read-only buffer
    tensor = torch.frombuffer(raw, dtype=dtype.torch).view(shape)
    if dtype.name == "BOOL" and tensor.view(torch.uint8).max() > 1:
        raise InvalidInputError(f"input {name!r}: BOOL items must be 0 or 1")
    return Tensor(name, dtype, shape, tensor)


def from_list(name: str, dtype: DType, shape: tuple[int, ...], data: Any) -> Tensor:
    """An input from a JSON ``data`` list (flat or nested, row-major) or gRPC contents."""
    flat = _flatten(data) if isinstance(data, list) else list(data)
    count = math.prod(shape)
    if len(flat) != count:
        raise InvalidInputError(f"input {name!r}: {len(flat)} items for shape {list(shape)} "
                                f"({count} expected)")
    kind = dtype.name
    if kind == "BYTES":
        items = []
        for item in flat:
            if isinstance(item, str):
                items.append(item.encode())
            elif isinstance(item, bytes):
                items.append(item)
            else:
                raise InvalidInputError(f"input {name!r}: BYTES items must be strings, got "
                                        f"{type(item).__name__}")
        return Tensor(name, dtype, shape, items)
    if kind == "BOOL":
        ok = all(isinstance(x, bool) for x in flat)
    elif kind in _INTS:
        ok = all(isinstance(x, int) and not isinstance(x, bool) for x in flat)
    else:
        ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in flat)
    if not ok:
        want = {"BOOL": "true/false"}.get(kind, "integers" if kind in _INTS else "numbers")
        raise InvalidInputError(f"input {name!r}: {kind} data must be {want}")
    try:
        array: np.ndarray[Any, Any] = np.array(flat, dtype=_NUMPY[kind]).reshape(shape)
    except (OverflowError, ValueError) as exc:
        raise InvalidInputError(f"input {name!r}: a value does not fit {kind}: {exc}"
                                ) from None
    tensor = torch.from_numpy(array)
    if kind == "BF16":
        tensor = tensor.to(torch.bfloat16)
    return Tensor(name, dtype, shape, tensor)


def to_list(tensor: Tensor) -> list[Any]:
    """An output's items for JSON ``data`` (flat, row-major)."""
    if tensor.dtype is BYTES:
        try:
            return [item.decode() for item in tensor.value]
        except UnicodeDecodeError:
            raise InvalidInputError(f"output {tensor.name!r} holds bytes that are not UTF-8; "
                                    "ask for it as binary data (binary_data: true)") from None
    value = tensor.value.reshape(-1)
    if tensor.dtype.name in ("FP16", "BF16"):
        value = value.float()
    out: list[Any] = value.tolist()
    return out


#: gRPC typed contents field per datatype (FP16/BF16 have none: raw only).
CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "INT8": "int_contents",
            "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
            "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def _flatten(data: list[Any]) -> list[Any]:
    if not any(isinstance(x, list) for x in data):
        return data
    out: list[Any] = []

    def walk(items: list[Any]) -> None:
        for item in items:
            if isinstance(item, list):
                walk(item)
            else:
                out.append(item)

    walk(data)
    return out
