"""``tensorbridge watchdog``: a Supervisor event listener that restarts a hung server.

Supervisor restarts a program only when it exits; a server whose loop stopped turning (a
deadlock, a C call holding the GIL) stays up and answers nothing. This listener subscribes to
``TICK_5``; on each tick it sends PING over the socket (the event loop answers it). After
``--failures`` ticks in a row without an answer it SIGKILLs the process listening on the
socket (found with ``SO_PEERCRED``, so no RPC access to supervisord is needed), and
``autorestart=true`` starts a fresh one. A server that answers but is not ready (loading,
draining) is left alone. Protocol: supervisord's event listener docs (READY / RESULT 2 OK).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
from typing import TextIO

from ._client import Client
from ._errors import ConnectionError, TensorBridgeError, TimeoutError

__all__ = ["listener_pid", "run"]

_PEERCRED = struct.Struct("3i")


def listener_pid(path: str) -> int | None:
    """The pid of the process listening on the Unix socket ``path`` (None if nobody is).

    The kernel queues the connection even when that process is hung, and reports the
    listener's credentials to the connecting side."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(1.0)
        sock.connect(path)
        pid, _, _ = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        return pid if pid > 0 else None
    except OSError:
        return None
    finally:
        sock.close()


def answers(path: str, timeout: float) -> bool:
    """Whether the server's loop answers a PING within ``timeout`` seconds."""
    try:
        with Client(path, timeout=timeout) as client:
            client.ping()
        return True
    except (ConnectionError, TimeoutError):
        return False
    except TensorBridgeError:
        return True  # it answered, if with an error


def run(path: str, failures: int, timeout: float, stdin: TextIO = sys.stdin,
        stdout: TextIO = sys.stdout, log: TextIO = sys.stderr) -> int:
    """Serve supervisord's event stream until it closes; return the number of kills."""
    missed, kills = 0, 0
    while True:
        stdout.write("READY\n")
        stdout.flush()
        header = stdin.readline()
        if not header:
            return kills
        fields = dict(item.split(":", 1) for item in header.split())
        stdin.read(int(fields.get("len", "0")))
        if fields.get("eventname", "").startswith("TICK"):
            if answers(path, timeout):
                missed = 0
            else:
                missed += 1
                print(f"tensorbridge watchdog: {path}: no answer within {timeout:g} s "
                      f"({missed}/{failures})", file=log, flush=True)
                pid = listener_pid(path) if missed >= failures else None
                if pid is not None:
                    print(f"tensorbridge watchdog: killing the hung server (pid {pid}) so that "
                          "Supervisor restarts it", file=log, flush=True)
                    try:
                        os.kill(pid, signal.SIGKILL)
                        kills += 1
                    except OSError as exc:
                        print(f"tensorbridge watchdog: cannot kill pid {pid}: {exc}", file=log,
                              flush=True)
                    missed = 0
        stdout.write("RESULT 2\nOK")
        stdout.flush()
