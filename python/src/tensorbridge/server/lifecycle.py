"""``Server``: loading, start/drain/stop, and the pool threads that serve every connection.

A pool of threads all wait on one epoll. Connections are registered one-shot, so each event
reaches exactly one pool thread, which then owns that connection: it parses the frames and
answers the cheap ones (PING, MODELS, ATTACH). An INFER is validated there; if its model is
idle the same thread computes it at once (no hand-off, no extra wake-up: the latency of a
thread per connection), while the other pool threads keep serving everyone else; if the model
is busy the request waits in the model's bounded queue for its workers (``_scheduler``).
Either way the outputs go into the connection's region and the computing thread sends the
reply. A connection is paused while one of its requests is queued, so that replies go out in
request order (spec §5.2).

With ``loop = "c"`` (the default) the pool only accepts, ticks and expires queued requests;
the established connections belong to the compiled loop (``cloop``), which hands Python each
wake-up's frames at once and runs quick models inline on the one loop thread in Python.

Measured alternatives (docs/benchmarks.md, bench/results/): a thread per connection fell to
half of uvicorn's throughput at 16 PHP workers (GIL fights); one I/O thread handing every
request to a worker, or a leader that passes the I/O role on before computing, cost an
extra wake-up per request (~100 µs of server CPU at one client).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

import torch

from .. import __version__
from .._config import ServerConfig
from .._errors import OverloadedError
from .._metrics import Metrics
from .._models import LoadedModel
from .._registry import Registry
from .._request import Request
from .._scheduler import ModelQueue, deadline_error
from .._systemd import Notifier
from ..listeners import Listeners
from .accept import ONESHOT_IN, Admission, accept_pending, bind_listener, check_fd_limit
from .cloop import CLoop
from .cloop import available as cloop_available
from .connection import Connection, Peer
from .heartbeat import Heartbeat

log = logging.getLogger("tensorbridge")


class Server:
    """Serves loaded models on a Unix socket. ``start()`` returns; ``serve_forever()`` blocks."""

    def __init__(self, config: ServerConfig, models: Iterable[LoadedModel] | None = None) -> None:
        self.config = config
        self.metrics = Metrics(config.shm_cap)
        #: The served models and their versions (``resolve`` picks one per request).
        self.registry = Registry(config.models, config.repository, self._make_queue,
                                 self.metrics, config.poll_interval)
        self._ready_made = list(models or ())
        self.connections: set[Peer] = set()
        #: Connections accepted since start (shown by PING, used to check reuse).
        self.accepted = 0
        #: The listening socket while accepting (None before start and once draining).
        self.listener: socket.socket | None = None
        self._lock = threading.Lock()  # guards connections, accepted, _computing, _handlers
        self._epoll: select.epoll | None = None
        self._handlers: dict[int, Callable[[], None]] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._resumed: deque[Connection] = deque()
        self._pool: list[threading.Thread] = []
        self._computing = 0  # pool threads running a request inline
        #: The compiled loop serving the connections (``loop = "c"``), else None.
        self._cloop: CLoop | None = None
        self._io_count = 0  # threads that serve connections (one is kept free for I/O)
        self._stopped = threading.Event()
        self._shm_lock = threading.Lock()
        self._shm_total = 0
        #: Set by ``drain()``: new INFERs are refused while in-flight ones finish.
        self.draining = False
        #: Connection limits, idle clocks and the reserve descriptor (``accept``).
        self.admission = Admission(config)
        #: systemd's notify socket (READY=1, WATCHDOG=1), if the service manager gave one.
        self.notifier = Notifier()
        self.heartbeat = Heartbeat(self, self.notifier)
        #: The Open Inference Protocol listeners (``http_port``, ``grpc_port``).
        self.listeners = Listeners(self)

    @property
    def stopped(self) -> bool:
        """Whether ``stop()`` has begun."""
        return self._stopped.is_set()

    @property
    def models(self) -> dict[str, LoadedModel]:
        """The served models by name, each as the version requests get by default."""
        out = {}
        for name in self.registry.names():
            served = self.registry.default(name)
            if served is not None and served.model is not None:
                out[name] = served.model
        return out

    def _make_queue(self, model: LoadedModel) -> ModelQueue:
        return ModelQueue(model, self.metrics.batch, self.metrics.instances_alive)

    def load_models(self) -> None:
        """Load every model of the config and the repository, logging progress."""
        if self.config.threads > 0:
            torch.set_num_threads(self.config.threads)
        else:
            # N instances each running a forward at once share the cores: give each its part
            # rather than letting N pools of cpu_count threads fight (measured in S7).
            most = max((m.instance_count for m in self.config.models), default=1)
            if most > 1:
                threads = max(1, (os.cpu_count() or 1) // most)
                torch.set_num_threads(threads)
                log.info("%d instances of a model: %d torch thread(s) each", most, threads)
        self.registry.load_all()
        # What exists now (torch, the startup models) lives as long as the server: a full
        # collection need not scan it. Without this, the collection that frees an unloaded
        # version walks ~170k objects holding the GIL: 190 ms of stalled requests (S10).
        gc.freeze()

    def start(self) -> None:
        """Bind the socket and start serving in background threads."""
        check_fd_limit(self.config)
        listener = bind_listener(self.config)
        self.listener = listener
        for m in self._ready_made:  # given ready-made, not by load_models()
            self.metrics.model_loaded(m.name, 0.0, m.config.instance_count)
            self.registry.adopt(m)
        self._ready_made = []
        self.registry.start_polling()
        self._epoll = select.epoll()
        self._handlers[listener.fileno()] = lambda: accept_pending(self)
        self._epoll.register(listener.fileno(), select.EPOLLIN)
        self._handlers[self._wake_r.fileno()] = self._on_wake
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        self._handlers[self.heartbeat.fd] = self.heartbeat.on_tick
        self._epoll.register(self.heartbeat.fd, select.EPOLLIN)
        self.heartbeat.start()
        pool = self._io_count = self.config.io_threads
        if self.config.loop == "c" and cloop_available():
            # Connections are served by C threads; the pool only accepts, ticks, expires.
            # No more of them than CPUs: one runs Python at a time, and a spare one only
            # sleeps in epoll to be woken by the next frame (on 2 CPUs at 64 PHP processes,
            # 4 threads cost ~1.5x the server CPU per request of 2, and fewer requests/s).
            self._io_count = min(self._io_count, max(2, len(os.sched_getaffinity(0))))
            self._cloop = CLoop(self)
            self._cloop.start(self._io_count)
            pool = 1
        elif self.config.loop == "c":
            log.warning("the compiled loop is not built (make ext / pip install): serving "
                        "connections with the Python loop")
        self._pool = [threading.Thread(target=self._serve_events, name=f"tb-io-{i}",
                                       daemon=True) for i in range(pool)]
        for t in self._pool:
            t.start()
        try:
            self.listeners.start()
        except (OSError, RuntimeError) as exc:  # a port taken (grpcio raises RuntimeError)
            self.stop()
            raise OSError(f"cannot start the Open Inference Protocol listeners: {exc}") from None
        log.info("serving %s on %s", ", ".join(self.models) or "no models", self.config.socket)

    def serve_forever(self) -> None:
        """``start()``, then block until ``stop()`` is called (e.g. from a signal handler)."""
        if self._epoll is None:  # not started (a drain may have closed the listener already)
            self.start()
        # Woken twice a second: a signal the kernel delivered to another thread only sets a
        # flag, and Python runs its handler here once this thread runs bytecode again.
        while not self._stopped.wait(0.5):
            pass

    def drain(self, timeout: float) -> bool:
        """Stop accepting and refuse new INFERs, wait up to ``timeout`` seconds for the
        in-flight ones to be answered, then ``stop()``. True if nothing was cut off."""
        if self._stopped.is_set():
            return True
        self.draining = True
        self.notifier.notify("STOPPING=1")
        self._close_listener()
        log.info("draining: waiting up to %.1f s for in-flight requests", timeout)
        end = time.monotonic() + timeout
        while True:
            with self._lock:
                busy = sum(c.in_flight() for c in self.connections) + self.listeners.pending()
            if not busy:
                break
            if time.monotonic() >= end:
                log.warning("drain timeout: %d request(s) still in flight are cut off", busy)
                break
            time.sleep(0.01)
        self.stop()
        return not busy

    def _close_listener(self) -> None:
        listener, self.listener = self.listener, None
        if listener is None:
            return
        self._handlers.pop(listener.fileno(), None)
        try:
            if self._epoll is not None:
                self._epoll.unregister(listener.fileno())
        except (OSError, ValueError):
            pass
        listener.close()
        try:
            os.unlink(self.config.socket)
        except FileNotFoundError:
            pass

    def stop(self) -> None:
        """Stop accepting, close every connection (freeing its region) and remove the socket."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._wake()  # never drained once stopped: every pool thread sees it and leaves
        for t in self._pool:
            t.join(timeout=10)
        if self._cloop is not None:
            self._cloop.stop()
        self.heartbeat.stop()
        self.admission.close()
        self.notifier.close()
        self.listeners.close()
        self.registry.stop()
        for conn in list(self.connections):
            conn.close()
        self._close_listener()
        self.metrics.stop_http()
        if self._epoll is not None:
            self._epoll.close()
        self._wake_r.close()
        self._wake_w.close()

    def status(self) -> bytes:
        """PONG body (spec §4): identity plus connection counters."""
        return json.dumps({"server": "tensorbridge", "version": __version__, "protocol": 1,
                           "pid": os.getpid(), "connections_accepted": self.accepted,
                           "connections_open": len(self.connections),
                           "requests_in_flight": sum(c.in_flight() for c in list(self.connections)),
                           "ready": self.ready(),
                           "models": self.registry.names()}).encode()

    def ready(self) -> bool:
        """Serving, not draining, and every model has a healthy instance."""
        return (not self.draining and not self._stopped.is_set()
                and all(v.queue.healthy_instances() > 0 for v in self.registry.ready_versions()
                        if v.queue is not None))

    def metadata(self) -> bytes:
        """MODELS_OK body (spec §4.1)."""
        return json.dumps({"models": self.registry.metadata()}).encode()

    # -- the pool threads ----------------------------------------------------------------

    def _serve_events(self) -> None:
        """A pool thread: wait on the shared epoll for one event and serve it, forever.

        Every pool thread waits at once; a connection is registered one-shot, so exactly one
        thread gets its event and owns it until it re-arms it (``arm``)."""
        assert self._epoll is not None
        while not self._stopped.is_set():
            timeout = self._select_timeout()
            try:
                events = self._epoll.poll(-1 if timeout is None else timeout, 1)
            except OSError:
                return  # closed by stop()
            try:
                for fd, _ in events:
                    handler = self._handlers.get(fd)
                    if handler is not None:
                        handler()
                self._expire_queued()
            except Exception:  # a server bug must not cost a pool thread
                log.exception("internal error in a pool thread")

    def queue(self, name: str) -> ModelQueue:
        """The work queue of a model's default version."""
        served = self.registry.default(name)
        if served is None or served.queue is None:
            raise KeyError(name)
        return served.queue

    def dispatch(self, request: Request) -> bool:
        """Run ``request`` now, in this thread, if its model is idle; else queue it.

        False when the model's queue is full (the caller answers OVERLOADED)."""
        assert request.served is not None and request.served.queue is not None
        queue = request.served.queue
        if self._cloop is not None and not queue.quick:
            return queue.submit(request)
        with self._lock:
            # Keep one thread waiting on epoll: never let the last one go compute.
            spare = self._computing < self._io_count - 1
            instance = queue.try_claim() if spare else None
            if instance is not None:
                self._computing += 1
        if instance is None:
            return queue.submit(request)
        try:
            queue.run_claimed(instance, request)
        finally:
            with self._lock:
                self._computing -= 1
        return True

    def reserve_shm(self, nbytes: int) -> None:
        """Account for a region growing by ``nbytes``; OVERLOADED past ``shm_cap``."""
        with self._shm_lock:
            if nbytes > 0 and self._shm_total + nbytes > self.config.shm_cap:
                raise OverloadedError(
                    f"the server's shared-memory cap ({self.config.shm_cap >> 20} MiB, "
                    f"shm_cap_mb) is used up by {len(self.connections)} connections' regions; "
                    "retry later, use smaller tensors, or raise shm_cap_mb")
            self._shm_total += nbytes
        self.metrics.shm_mapped(nbytes)

    def release_shm(self, nbytes: int) -> None:
        """Account for a region of ``nbytes`` being unmapped."""
        with self._shm_lock:
            self._shm_total -= nbytes
        self.metrics.shm_mapped(-nbytes)

    def _select_timeout(self) -> float | None:
        deadlines = [d for q in self.registry.queues if (d := q.next_deadline()) is not None]
        return None if not deadlines else max(0.0, min(deadlines) - time.monotonic())

    def _expire_queued(self) -> None:
        now = time.monotonic()
        for queue in self.registry.queues:
            for request in queue.expire(now):
                request.finish(deadline_error(request), 0)

    # -- the connections' books ----------------------------------------------------------

    def open_connection(self, sock: socket.socket, pid: int, uid: int, gid: int) -> None:
        """Serve an accepted, admitted peer: file it and start delivering its frames."""
        log.debug("connection from pid %d (uid %d)", pid, uid)
        if self._cloop is not None:
            served = self._cloop.connect(sock, pid, uid, gid)
            self.admission.opened(served)
            self.adopt(served)
            self._cloop.watch(served)
            return
        conn = Connection(self, sock, pid, uid, gid)
        self.admission.opened(conn)
        self.adopt(conn)
        self.watch(conn)

    def deadline_queued(self) -> None:
        """A request with a deadline was queued by a compiled-loop thread: have the pool
        thread recompute when to expire queued requests."""
        self._wake()

    def adopt(self, conn: Peer) -> None:
        """Count a freshly accepted connection and route its events to it."""
        with self._lock:
            self.connections.add(conn)
            self.accepted += 1
            if isinstance(conn, Connection):
                self._handlers[conn.fd] = self._event_handler(conn)
        self.metrics.connections(1)

    def _event_handler(self, conn: Connection) -> Callable[[], None]:
        return lambda: self._on_event(conn)

    def _on_event(self, conn: Connection) -> None:
        self.admission.seen(conn)  # not idle
        conn.on_readable()

    def listen(self, on: bool) -> None:
        """Switch the listener's events on or off (off at the open-file limit, see
        ``accept.Admission``)."""
        listener = self.listener
        if listener is None or self._epoll is None:
            return
        try:
            self._epoll.modify(listener.fileno(), select.EPOLLIN if on else 0)
        except (OSError, ValueError):
            pass  # closed meanwhile (drain)

    def watch(self, conn: Connection) -> None:
        """Start delivering the events of an admitted connection to the pool."""
        if self._epoll is not None:
            self._epoll.register(conn.fd, ONESHOT_IN)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or we are shutting down

    def _on_wake(self) -> None:
        if self._stopped.is_set():
            return  # leave the byte there: it wakes the other pool threads too
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                conn = self._resumed.popleft()
            except IndexError:
                return
            conn.resume()

    def resume(self, conn: Connection) -> None:
        """Have a pool thread serve the frames that arrived while ``conn`` was busy."""
        self._resumed.append(conn)
        self._wake()

    def arm(self, conn: Connection) -> None:
        """Let the next event of ``conn`` reach a pool thread (one-shot registration)."""
        assert self._epoll is not None
        try:
            self._epoll.modify(conn.fd, ONESHOT_IN)
        except (OSError, ValueError):
            pass  # closed meanwhile

    def forget(self, conn: Peer) -> None:
        """Drop a closed connection from epoll and the books."""
        with self._lock:
            if conn not in self.connections:
                return
            self.connections.discard(conn)
            if isinstance(conn, Connection):
                self._handlers.pop(conn.fd, None)
        self.metrics.connections(-1)
        if self.admission.released(conn):
            self.listen(True)  # a descriptor is free again
        if self._epoll is not None and isinstance(conn, Connection):
            try:
                self._epoll.unregister(conn.fd)
            except (OSError, ValueError):
                pass
