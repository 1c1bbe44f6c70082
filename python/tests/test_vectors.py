"""The golden vectors of spec/vectors/vectors.json, byte-exact, through the Python codec."""

from __future__ import annotations

import pytest
import torch

from tensorbridge import ProtocolError
from tensorbridge._spec import BY_NAME, FrameType
from tensorbridge._wire import (
    AttachOk,
    InferReply,
    InferRequest,
    TensorDesc,
    check_crc,
    crc32c,
    decode_attach,
    decode_attach_ok,
    decode_bytes_items,
    decode_error,
    decode_header,
    decode_infer,
    decode_infer_ok,
    encode_attach,
    encode_attach_ok,
    encode_bytes_items,
    encode_error,
    encode_frame,
    encode_infer,
    encode_infer_ok,
)

from conftest import VECTORS

LOCATIONS = {"region": 0, "inline": 1}


def _desc(t: dict) -> TensorDesc:
    return TensorDesc(t["name"], BY_NAME[t["dtype"]], tuple(t["shape"]),
                      LOCATIONS[t["location"]], t["offset"], t["nbytes"], t["crc32c"])


def _encode_body(typ: str, b: dict) -> bytes:
    if typ == "ATTACH":
        return encode_attach(b["options"], b["min_region"])
    if typ == "ATTACH_OK":
        return encode_attach_ok(AttachOk(b["region_size"], b["region_cap"], b["max_body"]))
    if typ in ("PING", "MODELS"):
        return b""
    if typ in ("PONG", "MODELS_OK", "ADMIN", "ADMIN_OK"):
        return b["json"].encode()
    if typ == "ERROR":
        return encode_error(VECTORS["errors"][b["code"]], b["message"])
    inline = bytes.fromhex(b["inline_hex"])
    if typ == "INFER":
        return encode_infer(InferRequest(b["timeout_us"], b["model"], b["out_offset"],
                                         b["out_capacity"], [_desc(t) for t in b["inputs"]],
                                         inline, b["version"],
                                         None if b["routing_key"] is None
                                         else b["routing_key"].encode()))
    return encode_infer_ok(InferReply(b["queue_us"], b["compute_us"],
                                      [_desc(t) for t in b["outputs"]], inline,
                                      b["preprocess_us"], b["batch_size"], b["version"]))


def _decode_body(typ: str, body: bytes) -> dict:
    names = {v: k for k, v in VECTORS["errors"].items()}
    if typ == "ATTACH":
        options, min_region = decode_attach(body)
        return {"options": options, "min_region": min_region}
    if typ == "ATTACH_OK":
        ok = decode_attach_ok(body)
        return {"region_size": ok.region_size, "region_cap": ok.region_cap,
                "max_body": ok.max_body}
    if typ in ("PING", "MODELS"):
        assert body == b""
        return {}
    if typ in ("PONG", "MODELS_OK", "ADMIN", "ADMIN_OK"):
        return {"json": body.decode()}
    if typ == "ERROR":
        code, message = decode_error(body)
        return {"code": names[code], "message": message}

    def t(d: TensorDesc) -> dict:
        return {"name": d.name, "dtype": d.dtype.name, "shape": list(d.shape),
                "location": "region" if d.location == 0 else "inline", "offset": d.offset,
                "nbytes": d.nbytes, "crc32c": d.crc32c}

    if typ == "INFER":
        r = decode_infer(body)
        return {"timeout_us": r.timeout_us, "model": r.model, "out_offset": r.out_offset,
                "out_capacity": r.out_capacity, "inputs": [t(d) for d in r.inputs],
                "inline_hex": bytes(r.inline).hex(), "version": r.version,
                "routing_key": None if r.routing_key is None else r.routing_key.decode()}
    r2 = decode_infer_ok(body)
    return {"queue_us": r2.queue_us, "compute_us": r2.compute_us,
            "preprocess_us": r2.preprocess_us, "batch_size": r2.batch_size,
            "version": r2.version,
            "outputs": [t(d) for d in r2.outputs], "inline_hex": bytes(r2.inline).hex()}


def test_crc32c_check_value() -> None:
    check = VECTORS["crc32c_check"]
    assert crc32c(check["input"].encode()) == check["crc32c"]


@pytest.mark.parametrize("vec", VECTORS["valid"], ids=lambda v: v["name"])
def test_valid_vector_encodes_byte_exact(vec: dict) -> None:
    body = _encode_body(vec["type"], vec["body"])
    frame = encode_frame(FrameType[vec["type"]], vec["request_id"], body, vec["crc"])
    assert frame.hex() == vec["hex"]


@pytest.mark.parametrize("vec", VECTORS["valid"], ids=lambda v: v["name"])
def test_valid_vector_decodes_to_fields(vec: dict) -> None:
    raw = bytes.fromhex(vec["hex"])
    header = decode_header(raw[:24])
    assert header.type.name == vec["type"]
    assert header.request_id == vec["request_id"]
    assert bool(header.flags & 1) == vec["crc"]
    body = raw[24:]
    assert header.body_len == len(body)
    check_crc(header, body)
    assert _decode_body(vec["type"], body) == vec["body"]


@pytest.mark.parametrize("vec", VECTORS["invalid"], ids=lambda v: v["name"])
def test_invalid_vector_is_rejected(vec: dict) -> None:
    raw = bytes.fromhex(vec["hex"])
    assert vec["error"] == "PROTOCOL_ERROR"
    with pytest.raises(ProtocolError):
        header = decode_header(raw[:24])
        assert vec["stage"] == "body", "header should have been rejected"
        body = raw[24:24 + header.body_len]
        check_crc(header, body)
        _decode_body(header.type.name, body)


@pytest.mark.parametrize("vec", VECTORS["tensors"], ids=lambda v: v["name"])
def test_tensor_payload_vectors(vec: dict) -> None:
    dtype = BY_NAME[vec["dtype"]]
    raw = bytes.fromhex(vec["hex"])
    if dtype.torch is None:
        items = [v.encode() for v in vec["values"]]
        assert encode_bytes_items(items).hex() == vec["hex"]
        assert decode_bytes_items(raw, len(items)) == items
        return
    tensor = torch.tensor(vec["values"], dtype=dtype.torch)
    assert list(tensor.shape) == vec["shape"]
    assert tensor.reshape(-1).view(torch.uint8).numpy().tobytes().hex() == vec["hex"]
    decoded = torch.frombuffer(bytearray(raw), dtype=dtype.torch).view(vec["shape"])
    assert decoded.tolist() == vec["values"]


def test_protocol_constants_match_the_spec() -> None:
    """Every constant of _spec equals the spec's table, and no table has an extra entry."""
    from tensorbridge import _errors, _spec

    assert VECTORS["magic"] == _spec.MAGIC
    assert VECTORS["version"] == _spec.VERSION
    assert {t.name: t.value for t in _spec.FrameType} == VECTORS["types"]
    assert {e.name: e.value for e in _spec.ErrorCode} == VECTORS["errors"]
    assert {d.name: d.code for d in _spec.DTYPES} == VECTORS["dtypes"]
    assert {d.name: d.itemsize for d in _spec.DTYPES} == VECTORS["itemsizes"]
    for name, value in VECTORS["constants"].items():
        ours = getattr(_spec, name)
        assert (ours[0] if isinstance(ours, bytes) else ours) == value, name
    # Each code of the spec's error table comes back as the exception class that owns it.
    for name, code in VECTORS["errors"].items():
        exc = _errors.error_for_code(code, "message")
        assert exc.code == code and type(exc).code == code, name
