"""The event loop's heartbeat: a tick that a pool thread serves like any socket event.

A small thread writes one byte a period into a socket pair that the pool's epoll watches; the
pool thread that takes it sends ``WATCHDOG=1`` to systemd, closes connections silent past
``silent_timeout`` or idle past ``idle_timeout``, and switches a listener paused at the
open-file limit back on. If the loop
stops turning (every pool thread stuck, a deadlock, a C call holding the GIL), no tick is
served, no ``WATCHDOG=1`` goes out, and systemd kills and restarts the service.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import TYPE_CHECKING

from .._systemd import Notifier

if TYPE_CHECKING:
    from .lifecycle import Server

log = logging.getLogger("tensorbridge")
#: Ticks are at most this far apart (idle connections are closed within it of their time).
MAX_PERIOD = 1.0


class Heartbeat:
    """Ticks for ``server``'s pool; ``fd`` goes into its epoll, ``on_tick`` is its handler."""

    def __init__(self, server: Server, notifier: Notifier) -> None:
        self.server = server
        self.notifier = notifier
        watchdog = notifier.watchdog
        self.period = min(MAX_PERIOD, watchdog / 4) if watchdog else MAX_PERIOD
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._stop = threading.Event()
        self._busy = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="tb-heartbeat", daemon=True)
        #: Ticks served since start.
        self.ticks = 0

    @property
    def fd(self) -> int:
        """The descriptor the pool's epoll watches."""
        return self._r.fileno()

    def start(self) -> None:
        """Start ticking."""
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self._w.send(b"t")
            except OSError:
                pass  # ticks already waiting: the loop is behind, one more says nothing new

    def on_tick(self) -> None:
        """Served by a pool thread: the loop turns, so say so and do the periodic chores."""
        if not self._busy.acquire(blocking=False):
            return  # another pool thread is on it
        try:
            try:
                while self._r.recv(4096):
                    pass
            except (BlockingIOError, OSError):
                pass
            self.ticks += 1
            self.notifier.notify("WATCHDOG=1")
            server = self.server
            idle = server.admission.idle(time.monotonic())
            for conn in idle:
                conn.close()
            if idle:
                log.info("closed %d connection(s) silent for more than silent_timeout (%g s) "
                         "or idle_timeout (%g s)", len(idle), server.config.silent_timeout,
                         server.config.idle_timeout)
            if server.admission.paused:  # retried once a tick, never in a loop
                server.admission.retake_reserve()
                server.admission.paused = False
                server.listen(True)
        finally:
            self._busy.release()

    def stop(self) -> None:
        """Stop ticking and close the socket pair."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        self._r.close()
        self._w.close()
