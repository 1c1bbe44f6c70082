"""The way in: the listening socket, accepting connections, and the checks on a new peer.

Everything a connection meets before its first frame lives here (binding and owning the socket
file, accepting, SO_PEERCRED and the allow-lists), so limits on who may connect, and how many,
have one place.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import stat
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._config import ServerConfig
from .._spec import ErrorCode, FrameType
from .._wire import encode_error, encode_frame
from .connection import Connection, hang_up

if TYPE_CHECKING:
    from .lifecycle import Server

log = logging.getLogger("tensorbridge")
_PEERCRED = struct.Struct("3i")
_SEND_TIMEOUT = struct.pack("ll", 5, 0)  # a client that stops reading for 5 s is dropped
#: The first event of a connection reaches exactly one pool thread.
ONESHOT_IN = select.EPOLLIN | select.EPOLLONESHOT


def bind_listener(config: ServerConfig) -> socket.socket:
    """The non-blocking listening socket at ``config.socket``, with its mode and owner set."""
    path = config.socket
    _clear_stale_socket(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, config.socket_mode)
    _chown(path, config.socket_owner, config.socket_group)
    listener.listen(512)
    listener.setblocking(False)
    return listener


def accept_pending(server: Server) -> None:
    """Accept every connection waiting on the listener; admitted ones are armed in epoll."""
    listener = server.listener  # drain() may close it meanwhile
    if listener is None:
        return
    while True:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if not server.stopped:
                log.warning("accept failed: %s", exc)
            return
        sock.setblocking(True)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _SEND_TIMEOUT)
        pid, uid, gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        conn = Connection(server, sock, pid, uid, gid)
        server.adopt(conn)
        log.debug("connection from pid %d (uid %d)", pid, uid)
        if authorized(server.config, conn):
            server.watch(conn)


def authorized(config: ServerConfig, conn: Connection) -> bool:
    """Check the peer's uid and gid (SO_PEERCRED); refuse it with UNAUTHORIZED if not allowed."""
    uids, gids = config.allow_uid, config.allow_gid
    if (not uids and not gids) or conn.peer_uid in uids or conn.peer_gid in gids:
        return True
    try:
        message = (f"uid {conn.peer_uid} (gid {conn.peer_gid}) may not use this server; "
                   f"allowed uids {uids}, gids {gids} (--allow-uid / --allow-gid)")
        conn.sock.sendall(encode_frame(FrameType.ERROR, 0, encode_error(
            ErrorCode.UNAUTHORIZED, message)))
        conn.server.metrics.error("unauthorized")
        hang_up(conn.sock)
    except OSError:
        pass
    conn.close()
    return False


def _chown(path: str, owner: str | None, group: str | None) -> None:
    """Give the socket file the configured owner and group (names or numeric ids)."""
    if owner is None and group is None:
        return
    import grp
    import pwd

    def resolve(value: str | None, lookup: Callable[[str], Any], what: str) -> int:
        if value is None:
            return -1
        if str(value).isdigit():
            return int(value)
        try:
            return lookup(str(value))[2]
        except KeyError:
            raise ValueError(f"socket_{what} {value!r}: no such {what} on this host") from None

    os.chown(path, resolve(owner, pwd.getpwnam, "owner"), resolve(group, grp.getgrnam, "group"))


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file left by a killed server; refuse to steal a live one."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise RuntimeError(f"{path} exists and is not a socket; choose another --socket path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise RuntimeError(f"another server is already listening on {path}")
