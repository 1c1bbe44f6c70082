"""Types of the compiled frame parser (python/csrc/tb_module.c)."""

Buffer = bytes | bytearray | memoryview

def parse_header(buf: Buffer, /) -> tuple[int, int, int, int, int] | None:
    """24 header bytes -> (type, flags, request_id, body_len, crc), or None if invalid."""

def parse_infer(
    body: Buffer, /
) -> tuple[
    int, str, int, int,
    list[tuple[str, int, tuple[int, ...], int, int, int, int]],
    int, int | None, bytes | None,
] | None:
    """INFER body -> (timeout_us, model, out_offset, out_capacity, [(name, dtype_code, shape,
    location, offset, nbytes, crc32c)], inline_start, version, routing_key), or None."""
