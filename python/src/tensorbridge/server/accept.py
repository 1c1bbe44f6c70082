"""The way in: the listening socket, accepting connections, and the checks on a new peer.

Everything a connection meets before its first frame lives here (binding and owning the socket
file, accepting, SO_PEERCRED and the allow-lists), so limits on who may connect, and how many,
have one place.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import select
import socket
import stat
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._config import ServerConfig
from .._spec import ErrorCode, FrameType
from .._wire import encode_error, encode_frame
from .connection import Peer, hang_up

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


class Admission:
    """Who may stay connected: the connection limits, idle times and the reserve descriptor.

    At the open-file limit (EMFILE/ENFILE) ``accept`` fails while the peer waits in the
    backlog, and the listener stays readable: retrying would spin. Instead one descriptor is
    kept in reserve; it is freed to accept the waiting peer, which gets ``ERROR OVERLOADED``
    and is closed, and the reserve is taken again. When even that fails, the listener is
    switched off until a connection closes. Either way the condition is logged once when it
    starts and once, with the count of refused peers, when it ends.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        #: Held by the one pool thread accepting.
        self.accepting = threading.Lock()
        self._lock = threading.Lock()  # guards every field below
        self._by_uid: Counter[int] = Counter()
        self._last_seen: dict[Peer, float] = {}
        self._silent: set[Peer] = set()  # not a byte received yet
        self._reserve: int | None = _open_reserve()
        #: Peers refused for lack of descriptors in the current episode, and since start.
        self.fd_refused = 0
        self.fd_refused_total = 0
        self._fd_since: float | None = None
        #: Whether the listener is switched off until a descriptor is freed.
        self.paused = False

    def admit(self, uid: int) -> str | None:
        """Count a new peer of ``uid``; or say which limit it is over (nothing counted)."""
        config = self.config
        with self._lock:
            total = sum(self._by_uid.values())
            if total >= config.max_connections:
                return (f"the server has {total} open connections, its max_connections; "
                        "retry later, or raise max_connections")
            if self._by_uid[uid] >= config.max_connections_per_uid:
                return (f"uid {uid} has {self._by_uid[uid]} open connections, the server's "
                        "max_connections_per_uid; close idle ones, retry later, or raise "
                        "max_connections_per_uid")
            self._by_uid[uid] += 1
            return None

    def opened(self, conn: Peer) -> None:
        """Start the silence clock of an admitted connection."""
        with self._lock:
            self._last_seen[conn] = time.monotonic()
            self._silent.add(conn)

    def seen(self, conn: Peer) -> None:
        """The connection had an event: it is not idle."""
        if conn in self._last_seen:  # dict and set stores: atomic under the GIL
            self._last_seen[conn] = time.monotonic()
            self._silent.discard(conn)

    def released(self, conn: Peer) -> bool:
        """Forget a closed connection; True when the listener should be switched on again."""
        with self._lock:
            self._silent.discard(conn)
            if self._last_seen.pop(conn, None) is not None:
                self._by_uid[conn.peer_uid] -= 1
                if self._by_uid[conn.peer_uid] <= 0:
                    del self._by_uid[conn.peer_uid]
            if self._reserve is None:
                self._reserve = _open_reserve()
            resume, self.paused = self.paused, False
        return resume

    def idle(self, now: float) -> list[Peer]:
        """Connections to close: silent since accepted for ``silent_timeout``, or with
        nothing in flight and silent for ``idle_timeout``."""
        silent, idle = self.config.silent_timeout, self.config.idle_timeout
        if silent <= 0 and idle <= 0:
            return []
        with self._lock:
            stale = [c for c, seen in self._last_seen.items()
                     if (c in self._silent and 0 < silent < now - seen)
                     or 0 < idle < now - seen]
        return [c for c in stale if c.in_flight() == 0 and not c.owned]

    def out_of_descriptors(self, listener: socket.socket, exc: OSError) -> str:
        """Refuse one waiting peer with the reserve descriptor: ``"refused"`` (look for the
        next), ``"none waiting"`` (accept fails with EMFILE even on an empty backlog), or
        ``"paused"`` (no descriptor even for that: switch the listener off until one frees)."""
        with self._lock:
            if self._fd_since is None:
                self._fd_since = time.monotonic()
                log.warning("out of file descriptors (%s, limit %d): refusing new connections "
                            "with OVERLOADED until some close; raise LimitNOFILE or lower "
                            "max_connections", exc.strerror, _nofile_limit())
            if self._reserve is None:
                self.paused = True
                return "paused"
            os.close(self._reserve)
            self._reserve = None
            try:
                sock: socket.socket | None = listener.accept()[0]
            except (BlockingIOError, InterruptedError):  # nobody waits any more
                self._reserve = _open_reserve()
                return "none waiting" if self._reserve is not None else "paused"
            except OSError:  # another thread took the freed descriptor first
                sock = None
            if sock is not None:
                self.fd_refused += 1
                self.fd_refused_total += 1
                _send_refusal(sock, ErrorCode.OVERLOADED,
                              "the server is out of file descriptors; retry later (operators: "
                              "raise LimitNOFILE, or lower max_connections)")
            self._reserve = _open_reserve()
            if self._reserve is None or sock is None:
                self.paused = True
                return "paused"
            return "refused"

    def accepted_again(self) -> None:
        """A connection was accepted normally: end an out-of-descriptors episode, if any."""
        if self._fd_since is None:
            return
        with self._lock:
            if self._fd_since is None:
                return
            log.warning("accepting again: %d connection(s) refused for lack of file "
                        "descriptors over %.1f s", self.fd_refused,
                        time.monotonic() - self._fd_since)
            self._fd_since, self.fd_refused = None, 0

    def retake_reserve(self) -> None:
        """Take the reserve descriptor again if a refusal could not (once a tick)."""
        with self._lock:
            if self._reserve is None:
                self._reserve = _open_reserve()

    def close(self) -> None:
        """Give the reserve descriptor back (at stop)."""
        with self._lock:
            if self._reserve is not None:
                os.close(self._reserve)
                self._reserve = None


def accept_pending(server: Server) -> None:
    """Accept every connection waiting on the listener; admitted ones are armed in epoll.

    One pool thread accepts at a time (the others wait, then find the backlog empty): the
    reserve descriptor freed for a refusal must go to that refusal, not to a parallel accept.
    """
    with server.admission.accepting:
        _accept_all(server)


def _accept_all(server: Server) -> None:
    listener = server.listener  # drain() may close it meanwhile
    if listener is None:
        return
    admission = server.admission
    while True:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if server.stopped:
                return
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                outcome = admission.out_of_descriptors(listener, exc)
                if outcome == "refused":
                    continue  # others may wait in the backlog
                if outcome == "paused":
                    server.listen(False)  # until a connection closes (Admission.released)
                return
            log.warning("accept failed: %s", exc)
            return
        admission.accepted_again()
        pid, uid, gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if not _allowed(server.config, uid, gid):
            config = server.config
            _send_refusal(sock, ErrorCode.UNAUTHORIZED,
                          f"uid {uid} (gid {gid}) may not use this server; allowed uids "
                          f"{config.allow_uid}, gids {config.allow_gid} (--allow-uid / "
                          "--allow-gid)")
            server.metrics.error("unauthorized")
            continue
        refusal = admission.admit(uid)
        if refusal is not None:
            _send_refusal(sock, ErrorCode.OVERLOADED, refusal)
            server.metrics.error("overloaded")
            log.debug("refused pid %d (uid %d): %s", pid, uid, refusal)
            continue
        sock.setblocking(True)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _SEND_TIMEOUT)
        server.open_connection(sock, pid, uid, gid)


def _allowed(config: ServerConfig, uid: int, gid: int) -> bool:
    """The peer's uid and gid (SO_PEERCRED) against ``allow_uid`` / ``allow_gid``."""
    uids, gids = config.allow_uid, config.allow_gid
    return (not uids and not gids) or uid in uids or gid in gids


def _send_refusal(sock: socket.socket, code: ErrorCode, message: str) -> None:
    """Tell a peer why it is not served (ERROR with request id 0), hang up and close."""
    try:
        sock.setblocking(False)  # a peer that does not read must not hold up the accept path
        sock.sendall(encode_frame(FrameType.ERROR, 0, encode_error(code, message)))
        hang_up(sock)
    except OSError:
        pass
    finally:
        sock.close()


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _nofile_limit() -> int:
    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


#: Descriptors the server holds besides its connections (models, logs, epoll, listener, ...).
_FDS_OF_THE_SERVER = 64


def check_fd_limit(config: ServerConfig) -> None:
    """Raise the soft open-file limit towards the hard one if the connection limits need it
    (a socket and a region memfd per connection, plus the server's own); warn if still short."""
    needed = 2 * config.max_connections + _FDS_OF_THE_SERVER
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("the open-file limit (%d) is too low for max_connections = %d (each "
                    "connection holds a socket and a region: about %d needed); connections "
                    "past about %d get OVERLOADED. Raise LimitNOFILE (systemd) / minfds "
                    "(Supervisor) / ulimit -n, or lower max_connections", soft,
                    config.max_connections, needed, max(0, (soft - _FDS_OF_THE_SERVER) // 2))


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
            return int(lookup(str(value))[2])
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
