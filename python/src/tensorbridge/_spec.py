"""Constants of the wire protocol. Every value points back to a section of spec/protocol.md."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

MAGIC = 0x31524254  # §3: the bytes "TBR1"
VERSION = 1  # §3
HEADER_SIZE = 24  # §3
MAX_BODY = 16 * 1024 * 1024  # §3
FLAG_CRC = 0x0001  # §3
MAX_DIMS = 8  # §2
MAX_INPUTS = 64  # §6.1
MAX_NAME = 255  # §6.1, §6.3
ALIGN = 64  # §5.2
PAGE = 4096  # §5.1
OPT_CRC = 0x0001  # §5.1
FD_CARRIER = b"\xfd"  # §5.1
LOCATION_REGION = 0  # §6.3
LOCATION_INLINE = 1  # §6.3
INFER_OPT_VERSION = 0x01  # §6.1: a u32 version follows the model name
INFER_OPT_ROUTING_KEY = 0x02  # §6.1: a u8 length and a routing key follow


class FrameType(enum.IntEnum):
    """Frame types (§4)."""

    ATTACH = 0x01
    ATTACH_OK = 0x81
    PING = 0x02
    PONG = 0x82
    MODELS = 0x03
    MODELS_OK = 0x83
    INFER = 0x04
    INFER_OK = 0x84
    ADMIN = 0x05
    ADMIN_OK = 0x85
    ERROR = 0xFF


class ErrorCode(enum.IntEnum):
    """Error codes carried by ERROR frames (§7)."""

    MODEL_NOT_FOUND = 1
    INVALID_INPUT = 2
    PAYLOAD_TOO_LARGE = 3
    DEADLINE_EXCEEDED = 4
    OVERLOADED = 5
    MODEL_ERROR = 6
    PROTOCOL_ERROR = 7
    UNAUTHORIZED = 8
    INTERNAL = 9


@dataclass(frozen=True)
class DType:
    """One row of the data type table (§2)."""

    code: int
    name: str
    itemsize: int  # 0 for BYTES (variable)
    torch: torch.dtype | None


# §2: the single table; lookups in both directions are derived from it.
DTYPES: tuple[DType, ...] = (
    DType(1, "BOOL", 1, torch.bool),
    DType(2, "UINT8", 1, torch.uint8),
    DType(3, "INT8", 1, torch.int8),
    DType(4, "INT16", 2, torch.int16),
    DType(5, "INT32", 4, torch.int32),
    DType(6, "INT64", 8, torch.int64),
    DType(7, "FP16", 2, torch.float16),
    DType(8, "FP32", 4, torch.float32),
    DType(9, "FP64", 8, torch.float64),
    DType(10, "BF16", 2, torch.bfloat16),
    DType(11, "BYTES", 0, None),
)
BY_CODE = {d.code: d for d in DTYPES}
BY_NAME = {d.name: d for d in DTYPES}
BY_TORCH = {d.torch: d for d in DTYPES if d.torch is not None}
BYTES = BY_NAME["BYTES"]

_ALIASES = {
    "bool": "BOOL", "uint8": "UINT8", "int8": "INT8", "int16": "INT16", "int32": "INT32",
    "int64": "INT64", "float16": "FP16", "half": "FP16", "float32": "FP32", "float": "FP32",
    "float64": "FP64", "double": "FP64", "bfloat16": "BF16", "bytes": "BYTES", "str": "BYTES",
}


def dtype_by_name(name: str) -> DType:
    """Look up a data type by its KServe name (``FP32``) or a torch/numpy alias (``float32``)."""
    key = _ALIASES.get(name.lower(), name.upper())
    try:
        return BY_NAME[key]
    except KeyError:
        known = ", ".join(BY_NAME)
        raise ValueError(f"unknown datatype {name!r}; use one of {known}") from None
