"""The floors: the cheapest possible PHP <-> Python round trips on this machine.

On connect the server hands the client a 16 MiB memfd (as TensorBridge does). Then a blocking
thread per connection answers fixed 24-byte messages: the first 8 bytes give a payload length
n; the server copies n bytes out of the shared memory into a tensor (one memcpy) and replies.
n = 0 is the raw Unix-socket ping-pong floor; n > 0 is the raw shared-memory copy floor.
Run: ``python bench/floor_server.py PATH``.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import sys
import threading

import torch

SIZE = 16 << 20


def _serve(conn: socket.socket) -> None:
    buf = bytearray(24)
    view = memoryview(buf)
    fd = os.memfd_create("floor", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    mm = mmap.mmap(fd, SIZE)
    socket.send_fds(conn, [b"\xfd"], [fd])
    os.close(fd)
    whole = torch.frombuffer(mm, dtype=torch.uint8)
    with conn:
        while True:
            got = 0
            while got < 24:
                n = conn.recv_into(view[got:])
                if n == 0:
                    return
                got += n
            (length,) = struct.unpack_from("<Q", buf)
            if length:
                whole[:length].clone()
            conn.sendall(buf)


def main(path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main(sys.argv[1])
