"""systemd's notify protocol (``Type=notify``): ``READY=1`` once the models are warm,
``WATCHDOG=1`` from the event loop's heartbeat, ``STOPPING=1`` when draining.

Only the datagram protocol of sd_notify(3), without libsystemd: a socket named by
``$NOTIFY_SOCKET`` (``@`` = the abstract namespace). The socket is opened once at start, so
that a heartbeat still goes out when the process is at its open-file limit. Outside systemd
(no ``$NOTIFY_SOCKET``) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["Notifier"]

log = logging.getLogger("tensorbridge")


class Notifier:
    """The service manager's notify socket, if there is one."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET") or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        #: Seconds within which systemd wants a WATCHDOG=1 (``WatchdogSec=``); None = off.
        self.watchdog: float | None = (
            int(usec) / 1e6 if usec.isdigit() and int(usec) > 0
            and (not pid or pid == str(os.getpid())) else None)
        self._sock: socket.socket | None = None
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    def notify(self, state: str) -> bool:
        """Send ``state`` (``READY=1``, ``WATCHDOG=1``, ``STATUS=...``); False if not sent."""
        if self._sock is None or self.address is None:
            return False
        address = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            self._sock.sendto(state.encode(), address)
        except OSError as exc:  # a full or gone manager must not stop serving
            log.debug("sd_notify %r failed: %s", state, exc)
            return False
        return True

    def close(self) -> None:
        """Close the socket (at stop)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
