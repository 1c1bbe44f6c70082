"""Human-edited source of the golden vectors; run it to regenerate ``vectors.json``.

The bytes are built here with explicit ``struct`` layouts that follow ``spec/protocol.md``
directly, independently of either implementation, so that both test suites check their
codec against the spec rather than against each other.

    python spec/vectors/source.py          # rewrites spec/vectors/vectors.json
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import crc32c as _crc

MAGIC = 0x31524254
TYPES = {"ATTACH": 0x01, "ATTACH_OK": 0x81, "PING": 0x02, "PONG": 0x82, "MODELS": 0x03,
         "MODELS_OK": 0x83, "INFER": 0x04, "INFER_OK": 0x84, "ADMIN": 0x05, "ADMIN_OK": 0x85,
         "ERROR": 0xFF}
INFER_OPT_VERSION = 0x01  # §6.1
INFER_OPT_ROUTING_KEY = 0x02  # §6.1
DTYPES = {"BOOL": 1, "UINT8": 2, "INT8": 3, "INT16": 4, "INT32": 5, "INT64": 6, "FP16": 7,
          "FP32": 8, "FP64": 9, "BF16": 10, "BYTES": 11}
ERRORS = {"MODEL_NOT_FOUND": 1, "INVALID_INPUT": 2, "PAYLOAD_TOO_LARGE": 3,
          "DEADLINE_EXCEEDED": 4, "OVERLOADED": 5, "MODEL_ERROR": 6, "PROTOCOL_ERROR": 7,
          "UNAUTHORIZED": 8, "INTERNAL": 9}
LOCATIONS = {"region": 0, "inline": 1}
# §2: bytes per element (0 = variable-length BYTES).
ITEMSIZES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "INT16": 2, "INT32": 4, "INT64": 8, "FP16": 2,
             "FP32": 4, "FP64": 8, "BF16": 2, "BYTES": 0}
# The numeric limits and flags every implementation writes once (§ in the comment).
CONSTANTS = {
    "HEADER_SIZE": 24,  # §3
    "MAX_BODY": 16 * 1024 * 1024,  # §3
    "FLAG_CRC": 0x0001,  # §3
    "MAX_DIMS": 8,  # §2
    "MAX_INPUTS": 64,  # §6.1
    "MAX_NAME": 255,  # §6.1, §6.3
    "ALIGN": 64,  # §5.2
    "PAGE": 4096,  # §5.1
    "OPT_CRC": 0x0001,  # §5.1
    "FD_CARRIER": 0xFD,  # §5.1
    "LOCATION_REGION": 0,  # §6.3
    "LOCATION_INLINE": 1,  # §6.3
    "INFER_OPT_VERSION": INFER_OPT_VERSION,  # §6.1
    "INFER_OPT_ROUTING_KEY": INFER_OPT_ROUTING_KEY,  # §6.1
}


def crc(data: bytes) -> int:
    return _crc.crc32c(data)


def frame(typ: str, request_id: int, body: bytes, use_crc: bool = False) -> bytes:
    flags = 1 if use_crc else 0
    return struct.pack("<IBBHQII", MAGIC, 1, TYPES[typ], flags, request_id, len(body),
                       crc(body) if use_crc else 0) + body


def tensor(t: dict) -> bytes:
    name = t["name"].encode()
    head = struct.pack("<BBBBHHQQII", DTYPES[t["dtype"]], len(t["shape"]),
                       LOCATIONS[t["location"]], 0, len(name), 0, t["offset"], t["nbytes"],
                       t["crc32c"], 0)
    return head + b"".join(struct.pack("<Q", d) for d in t["shape"]) + name


def body(typ: str, b: dict) -> bytes:
    if typ == "ATTACH":
        return struct.pack("<IIQ", b["options"], 0, b["min_region"])
    if typ == "ATTACH_OK":
        return struct.pack("<QQII", b["region_size"], b["region_cap"], b["max_body"], 0)
    if typ in ("PING", "MODELS"):
        return b""
    if typ in ("PONG", "MODELS_OK", "ADMIN", "ADMIN_OK"):
        return b["json"].encode()
    if typ == "ERROR":
        msg = b["message"].encode()
        return struct.pack("<HHI", ERRORS[b["code"]], 0, len(msg)) + msg
    inline = bytes.fromhex(b["inline_hex"])
    if typ == "INFER":
        model = b["model"].encode()
        options, optional = 0, b""
        if b.get("version") is not None:
            options |= INFER_OPT_VERSION
            optional += struct.pack("<I", b["version"])
        if b.get("routing_key") is not None:
            key = b["routing_key"].encode()
            options |= INFER_OPT_ROUTING_KEY
            optional += struct.pack("<B", len(key)) + key
        return (struct.pack("<IHBBQQ", b["timeout_us"], len(model), len(b["inputs"]), options,
                            b["out_offset"], b["out_capacity"])
                + model + optional + b"".join(tensor(t) for t in b["inputs"]) + inline)
    if typ == "INFER_OK":
        return (struct.pack("<HHIIII", len(b["outputs"]), b["batch_size"], b["queue_us"],
                            b["compute_us"], b["preprocess_us"], b["version"])
                + b"".join(tensor(t) for t in b["outputs"]) + inline)
    raise ValueError(typ)


def t(name, dtype, shape, offset, nbytes, location="region", crc32c=0):
    return {"name": name, "dtype": dtype, "shape": shape, "location": location,
            "offset": offset, "nbytes": nbytes, "crc32c": crc32c}


FLOATS = struct.pack("<4f", 1.0, -2.0, 0.5, 3.25)
VALID = [
    ("attach", "ATTACH", 1, {"options": 0, "min_region": 0}, False),
    ("attach_crc_1mib", "ATTACH", 0x7FFFFFFFFFFFFFFF, {"options": 1, "min_region": 1 << 20}, False),
    ("attach_ok", "ATTACH_OK", 7, {"region_size": 1 << 20, "region_cap": 1 << 30,
                                   "max_body": 1 << 24}, False),
    ("ping", "PING", 2, {}, False),
    ("pong", "PONG", 2, {"json": '{"server":"tensorbridge","version":"0.1.0","protocol":1}'}, False),
    ("models", "MODELS", 3, {}, False),
    ("models_ok", "MODELS_OK", 3, {"json": '{"models":[]}'}, False),
    ("infer_digits", "INFER", 0x0102030405060708, {
        "timeout_us": 1_000_000, "model": "digits", "out_offset": 4096, "out_capacity": 8192,
        "inputs": [t("input", "FP32", [2, 64], 0, 512)], "inline_hex": "", "version": None,
        "routing_key": None}, False),
    ("infer_pinned_version", "INFER", 13, {
        "timeout_us": 0, "model": "linear", "out_offset": 64, "out_capacity": 64,
        "inputs": [t("x", "FP32", [1, 1], 0, 4)], "inline_hex": "", "version": 2,
        "routing_key": None}, False),
    ("infer_routing_key", "INFER", 14, {
        "timeout_us": 0, "model": "linear", "out_offset": 64, "out_capacity": 64,
        "inputs": [t("x", "FP32", [1, 1], 0, 4)], "inline_hex": "", "version": None,
        "routing_key": "user-42"}, False),
    ("infer_version_and_key", "INFER", 15, {
        "timeout_us": 0, "model": "linear", "out_offset": 64, "out_capacity": 64,
        "inputs": [t("x", "FP32", [1, 1], 0, 4)], "inline_hex": "", "version": 70000,
        "routing_key": "größe"}, True),
    ("infer_two_inputs_inline", "INFER", 9, {
        "timeout_us": 0, "model": "echo", "out_offset": 0, "out_capacity": 0,
        "inputs": [t("a", "FP32", [4], 0, 16, "inline", crc(FLOATS)),
                   t("b", "BYTES", [2], 16, 13, "inline", crc(b"\x03\0\0\0abc\x02\0\0\0hi"))],
        "inline_hex": (FLOATS + b"\x03\0\0\0abc\x02\0\0\0hi").hex(), "version": None,
        "routing_key": None}, True),
    ("infer_scalar_bool", "INFER", 10, {
        "timeout_us": 50_000, "model": "m", "out_offset": 64, "out_capacity": 64,
        "inputs": [t("flag", "BOOL", [], 0, 1)], "inline_hex": "", "version": None,
        "routing_key": None}, False),
    ("infer_8_dims", "INFER", 11, {
        "timeout_us": 1, "model": "m", "out_offset": 128, "out_capacity": 0,
        "inputs": [t("x", "INT8", [1, 2, 1, 2, 1, 2, 1, 2], 64, 16)], "inline_hex": "",
        "version": None, "routing_key": None}, False),
    ("infer_ok", "INFER_OK", 0x0102030405060708, {
        "queue_us": 12, "compute_us": 345, "preprocess_us": 6789, "batch_size": 8, "version": 3,
        "outputs": [t("logits", "FP32", [2, 10], 4096, 80)], "inline_hex": ""}, False),
    ("infer_ok_inline", "INFER_OK", 12, {
        "queue_us": 0, "compute_us": 1, "preprocess_us": 0, "batch_size": 1, "version": 0,
        "outputs": [t("y", "FP32", [2, 2], 0, 16, "inline", crc(FLOATS))],
        "inline_hex": FLOATS.hex()}, True),
    ("error_model_not_found", "ERROR", 5, {
        "code": "MODEL_NOT_FOUND", "message": "model 'nope' is not loaded; loaded: digits"}, False),
    ("error_utf8", "ERROR", 6, {"code": "MODEL_ERROR", "message": "ValueError: größe ✗"}, False),
    ("error_version_not_found", "ERROR", 16, {
        "code": "MODEL_NOT_FOUND",
        "message": "model 'linear' has no version 7; versions: [1, 2]"}, False),
    ("admin_list", "ADMIN", 17, {"json": '{"command":"list"}'}, False),
    ("admin_reload", "ADMIN", 18, {"json": '{"command":"reload","model":"linear"}'}, False),
    ("admin_ok", "ADMIN_OK", 18, {"json": (
        '{"models":[{"name":"linear","policy":"latest","routing":null,"versions":'
        '[{"version":2,"state":"ready","reason":null,"load_seconds":0.153,'
        '"source":"/srv/models/linear/2/model.pt","backend":"torchscript"}]}]}')}, False),
    ("error_unauthorized_admin", "ERROR", 19, {
        "code": "UNAUTHORIZED",
        "message": "uid 33 may not send ADMIN commands; admin_uid is [0, 1000]"}, False),
]

# Tensor payload encodings (§2), for the PHP Tensor class and the Python codec.
TENSORS = [
    ("bool", "BOOL", [4], [True, False, False, True], "01000001"),
    ("uint8", "UINT8", [3], [0, 127, 255], "007fff"),
    ("int8", "INT8", [3], [-128, 0, 127], "80007f"),
    ("int16", "INT16", [2], [-2, 300], "feff2c01"),
    ("int32", "INT32", [2], [-1, 65536], "ffffffff00000100"),
    ("int64", "INT64", [1], [-5], "fbffffffffffffff"),
    ("fp16", "FP16", [4], [1.0, -2.0, 0.5, 65504.0], "003c00c00038ff7b"),
    ("fp32", "FP32", [2, 2], [[1.0, -2.0], [0.5, 3.25]], FLOATS.hex()),
    ("fp64", "FP64", [1], [0.1], struct.pack("<d", 0.1).hex()),
    ("bf16", "BF16", [3], [1.0, -2.0, 0.5], "803f00c0003f"),
    ("bytes", "BYTES", [2], ["abc", ""], "0300000061626300000000"),
    ("fp32_3d", "FP32", [1, 2, 1], [[[1.0], [-2.0]]], FLOATS[:8].hex()),
]


def invalid() -> list[tuple[str, bytes, str, str]]:
    good = frame("PING", 1, b"")
    hdr = bytearray(good)
    bad_magic = b"XBR1" + bytes(hdr[4:])
    bad_version = bytes(hdr[:4]) + b"\x02" + bytes(hdr[5:])
    bad_type = bytes(hdr[:5]) + b"\x42" + bytes(hdr[6:])
    bad_flags = bytes(hdr[:6]) + b"\x02\x00" + bytes(hdr[8:])
    too_long = struct.pack("<IBBHQII", MAGIC, 1, 0x02, 0, 1, (1 << 24) + 1, 0)
    bad_crc = struct.pack("<IBBHQII", MAGIC, 1, 0x01, 1, 1, 16, 0xDEADBEEF) + bytes(16)
    infer_ok = body("INFER", {"timeout_us": 0, "model": "m", "out_offset": 0, "out_capacity": 0,
                              "inputs": [t("x", "FP32", [4], 0, 16, "inline")],
                              "inline_hex": FLOATS.hex()})
    keyed = body("INFER", {"timeout_us": 0, "model": "m", "out_offset": 0, "out_capacity": 0,
                           "inputs": [t("x", "FP32", [4], 0, 16, "inline")],
                           "inline_hex": FLOATS.hex(), "version": 1, "routing_key": "k"})
    key_at = 24 + 1 + 4  # after the fixed part, the model name and the version

    def patched_keyed(offset: int, data: bytes) -> bytes:
        b = bytearray(keyed)
        b[offset:offset + len(data)] = data
        return frame("INFER", 4, bytes(b))

    def patched(offset: int, data: bytes) -> bytes:
        b = bytearray(infer_ok)
        b[offset:offset + len(data)] = data
        return frame("INFER", 3, bytes(b))
    desc = 24 + 1  # descriptor starts after the fixed part and the 1-byte model name
    return [
        ("bad_magic", bad_magic, "PROTOCOL_ERROR", "header"),
        ("bad_version", bad_version, "PROTOCOL_ERROR", "header"),
        ("unknown_type", bad_type, "PROTOCOL_ERROR", "header"),
        ("unknown_flags", bad_flags, "PROTOCOL_ERROR", "header"),
        ("body_too_long", too_long, "PROTOCOL_ERROR", "header"),
        ("crc_mismatch", bad_crc, "PROTOCOL_ERROR", "body"),
        ("attach_short_body", frame("ATTACH", 1, b"\0" * 8), "PROTOCOL_ERROR", "body"),
        ("infer_truncated", frame("INFER", 3, infer_ok[:-20]), "PROTOCOL_ERROR", "body"),
        ("infer_no_inputs", patched(6, b"\x00"), "PROTOCOL_ERROR", "body"),
        ("infer_unknown_dtype", patched(desc, b"\x63"), "PROTOCOL_ERROR", "body"),
        ("infer_too_many_dims", patched(desc + 1, b"\x09"), "PROTOCOL_ERROR", "body"),
        ("infer_bad_location", patched(desc + 2, b"\x07"), "PROTOCOL_ERROR", "body"),
        ("infer_inline_out_of_bounds", patched(desc + 8, struct.pack("<Q", 8)),
         "PROTOCOL_ERROR", "body"),
        ("infer_offset_overflow", patched(desc + 8, struct.pack("<Q", (1 << 64) - 8)),
         "PROTOCOL_ERROR", "body"),
        ("infer_nbytes_shape_mismatch", patched(desc + 32, struct.pack("<Q", 3)),
         "PROTOCOL_ERROR", "body"),
        ("infer_unknown_option", patched(7, b"\x04"), "PROTOCOL_ERROR", "body"),
        ("infer_version_zero", patched_keyed(25, struct.pack("<I", 0)), "PROTOCOL_ERROR",
         "body"),
        ("infer_routing_key_empty", patched_keyed(key_at, b"\x00"), "PROTOCOL_ERROR", "body"),
        ("infer_truncated_in_version", frame("INFER", 3, keyed[:27]), "PROTOCOL_ERROR",
         "body"),
    ]


def build() -> dict:
    valid = []
    for name, typ, rid, b, use_crc in VALID:
        valid.append({"name": name, "type": typ, "request_id": rid, "crc": use_crc,
                      "body": b, "hex": frame(typ, rid, body(typ, b), use_crc).hex()})
    return {
        "comment": "Generated by spec/vectors/source.py from spec/protocol.md; do not edit.",
        "magic": MAGIC, "version": 1, "types": TYPES, "dtypes": DTYPES, "errors": ERRORS,
        "itemsizes": ITEMSIZES, "constants": CONSTANTS,
        "crc32c_check": {"input": "123456789", "crc32c": crc(b"123456789")},
        "valid": valid,
        "tensors": [{"name": n, "dtype": d, "shape": s, "values": v, "hex": h}
                    for n, d, s, v, h in TENSORS],
        "invalid": [{"name": n, "hex": h.hex(), "error": e, "stage": s}
                    for n, h, e, s in invalid()],
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("vectors.json")
    out.write_text(json.dumps(build(), indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out}")
