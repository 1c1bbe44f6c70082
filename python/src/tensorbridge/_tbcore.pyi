"""Types of the compiled frame parser and event loop (python/csrc/tb_module.c, tb_pyloop.c)."""

from collections.abc import Callable
from typing import Any

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

class Loop:
    """The compiled event loop of the established connections (tb_loop.c)."""

    def __init__(self, handler: Callable[[list[tuple[Any, ...]]], None]) -> None: ...
    def add(self, fd: int, /) -> int:
        """Adopt a connected socket (its fd, closed by the loop from now on); its id."""
    def start(self, cid: int, /) -> None:
        """Start serving a connection's frames."""
    def set_region(self, cid: int, memfd: int, size: int, use_crc: bool, /) -> None:
        """Map the connection's region."""
    def reply(self, cid: int, seq: int, frame: bytes, fd: int = -1, hangup: bool = False, /
              ) -> bool:
        """Send a reply in order; True if the connection is now closed."""
    def reply_ok(self, cid: int, seq: int, request_id: int, out_offset: int, out_capacity: int,
                 outputs: list[tuple[str, int, Any]], queue_us: int, compute_us: int,
                 preprocess_us: int, batch_size: int, version: int, /) -> int:
        """Place outputs and send INFER_OK: 1 closed, 0 sent, -1 not here (Python path)."""
    def close(self, cid: int, /) -> bool:
        """Close a connection; True if it was open."""
    def pending(self, cid: int, /) -> int:
        """Frames of a connection not answered."""
    def run(self) -> None:
        """Serve events until stop()."""
    def stop(self) -> None:
        """Make every run() return."""
