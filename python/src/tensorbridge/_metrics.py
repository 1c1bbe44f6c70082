"""Prometheus metrics of one server (``/metrics``), built on ``prometheus_client``.

Each ``Server`` owns one ``Metrics`` with its own ``CollectorRegistry``, so two servers in one
process (tests) never share counters. The server calls the recording methods; ``start_http``
serves the exposition format on a TCP port when ``metrics_port`` is set.

Metric names follow the Prometheus conventions (base units, ``_seconds``, ``_bytes``,
``_total``); ``deploy/prometheus/alerts.yml`` and ``deploy/grafana/tensorbridge.json`` use them,
and ``tests/test_deploy.py`` checks that every name they query is defined here.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter as Counter_
from collections.abc import Callable, Iterable
from functools import partial
from operator import itemgetter
from typing import Any

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

__all__ = ["LATENCY_BUCKETS", "BATCH_BUCKETS", "METRIC_NAMES", "Metrics"]

#: 0.1 ms .. 5 s: the calls this server is made for take 0.1-50 ms; slow ones up to seconds.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0)
#: Requests per model call when batching is on.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
#: Label used for a model name that no loaded model has (e.g. MODEL_NOT_FOUND): client-chosen
#: names must not create new time series, or a fuzzer could exhaust the server's memory.
OTHER_MODEL = "_other"

#: Every metric family this module exposes (as scraped, i.e. counters with ``_total``).
METRIC_NAMES = frozenset({
    "tensorbridge_requests_total",
    "tensorbridge_errors_total",
    "tensorbridge_queue_wait_seconds",
    "tensorbridge_preprocess_seconds",
    "tensorbridge_compute_seconds",
    "tensorbridge_request_duration_seconds",
    "tensorbridge_batch_size",
    "tensorbridge_in_flight_requests",
    "tensorbridge_connections_open",
    "tensorbridge_shm_mapped_bytes",
    "tensorbridge_shm_cap_bytes",
    "tensorbridge_shm_usage_ratio",
    "tensorbridge_instances_alive",
    "tensorbridge_instances_configured",
    "tensorbridge_model_load_seconds",
    "tensorbridge_model_version_requests_total",
    "tensorbridge_model_version_ready",
    "tensorbridge_model_load_failures_total",
    "tensorbridge_listener_requests_total",
})


#: Answered requests noted before the histograms take them in (also at every scrape).
FLUSH_EVERY = 1024


_NOTED_KEY = itemgetter(0, 1, 2)
_SECONDS = itemgetter(3, 4, 5, 6)


def _observe_all(hist: Any, values: np.ndarray) -> None:
    """``hist.observe(v)`` for every value, as one update per bucket (prometheus_client's
    bucket counters when it has them, one call per value otherwise)."""
    bounds = getattr(hist, "_upper_bounds", None)
    buckets, total = getattr(hist, "_buckets", None), getattr(hist, "_sum", None)
    if bounds is None or buckets is None or total is None or len(buckets) != len(bounds):
        for v in values.tolist():
            hist.observe(v)
        return
    # observe() counts v in the first bucket whose bound is >= v: searchsorted's "left".
    counts = np.bincount(np.searchsorted(np.asarray(bounds), values, side="left"),
                         minlength=len(bounds))
    for i in np.flatnonzero(counts).tolist():
        buckets[i].inc(int(counts[i]))
    total.inc(float(values.sum()))


def taken(counter: itertools.count[int]) -> int:
    """How many values ``next`` took from a count (its repr is ``count(N)``)."""
    return int(repr(counter)[6:-1])


class _Flush(Collector):
    """Registered first: a scrape flushes the noted requests before anything is collected."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        self.metrics.flush()
        return []

    def describe(self) -> Iterable[Metric]:
        return []


class Metrics:
    """The server's counters, gauges and histograms, in a registry of their own."""

    def __init__(self, shm_cap_bytes: int) -> None:
        # The *_created series double the output and no dashboard or alert reads them
        # (a process-wide switch of prometheus_client; it only ever turns them off).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()  # guards _shm and _known
        self._shm = 0
        self._shm_cap = max(int(shm_cap_bytes), 1)
        self._known: set[str] = set()
        self._children: dict[tuple[str, str], tuple[Any, ...]] = {}
        self._http: Any = None
        r = self.registry
        #: Answered requests waiting to be put into the counters and histograms (``answered``):
        #: (model, version, status, queue_s, preprocess_s, compute_s, total_s).
        self._pending: list[tuple[str, int, str, float, float, float, float]] = []
        self._pending_lock = threading.Lock()
        r.register(_Flush(self))  # first: every scrape takes the pending requests in
        # process_resident_memory_bytes, process_open_fds: what the soak tests watch too.
        ProcessCollector(registry=r)
        self._requests = Counter("tensorbridge_requests", "Requests answered, by model and "
                                 "status (ok or the error name)", ["model", "status"],
                                 registry=r)
        self._errors = Counter("tensorbridge_errors", "Errors answered, by error code name "
                               "(spec §7) and model", ["code", "model"], registry=r)
        hist = {
            "queue": ("tensorbridge_queue_wait_seconds",
                      "Time a request waited for its model"),
            "preprocess": ("tensorbridge_preprocess_seconds",
                           "Time spent decoding and validating a request"),
            "compute": ("tensorbridge_compute_seconds",
                        "Time spent in the model, including writing outputs"),
            "total": ("tensorbridge_request_duration_seconds",
                      "Time from the request's arrival to its reply"),
        }
        self._hist = {key: Histogram(name, text, ["model"], buckets=LATENCY_BUCKETS,
                                     registry=r) for key, (name, text) in hist.items()}
        self._batch = Histogram("tensorbridge_batch_size", "Rows computed in one model call "
                                "(models with batching on)",
                                ["model"], buckets=BATCH_BUCKETS, registry=r)
        in_flight = Gauge("tensorbridge_in_flight_requests",
                          "Requests received and not yet answered", registry=r)
        # Counted on every request by two counters whose next() is atomic (no lock), read
        # when scraped.
        self._received, self._answered = itertools.count(), itertools.count()
        #: One request received / answered (its in-flight count): C calls, no Python frame
        #: on the hot path.
        self.received: Callable[[], int] = partial(next, self._received)
        self.answered_one: Callable[[], int] = partial(next, self._answered)
        in_flight.set_function(self._in_flight_now)
        self._connections = Gauge("tensorbridge_connections_open", "Open client connections",
                                  registry=r)
        self._shm_bytes = Gauge("tensorbridge_shm_mapped_bytes",
                                "Shared memory mapped by all connections' regions", registry=r)
        cap = Gauge("tensorbridge_shm_cap_bytes", "Configured cap on the shared memory of all "
                    "regions (shm_cap_mb)", registry=r)
        cap.set(self._shm_cap)
        self._shm_ratio = Gauge("tensorbridge_shm_usage_ratio",
                                "tensorbridge_shm_mapped_bytes / tensorbridge_shm_cap_bytes",
                                registry=r)
        self._alive = Gauge("tensorbridge_instances_alive", "Healthy model instances",
                            ["model"], registry=r)
        self._configured = Gauge("tensorbridge_instances_configured",
                                 "Model instances the configuration asks for", ["model"],
                                 registry=r)
        self._load = Gauge("tensorbridge_model_load_seconds",
                           "Time the model took to load and warm up", ["model"], registry=r)
        self._version_requests = Counter(
            "tensorbridge_model_version_requests", "Requests answered, by model, version and "
            "status (which version A/B routing and reloads sent them to)",
            ["model", "version", "status"], registry=r)
        self._version_children: dict[tuple[str, int, str], Any] = {}
        self._version_ready = Gauge("tensorbridge_model_version_ready",
                                    "1 while a model version is loaded and routed, else 0",
                                    ["model", "version"], registry=r)
        self._listener = Counter(
            "tensorbridge_listener_requests", "Inference requests answered through an Open "
            "Inference Protocol listener (also counted in tensorbridge_requests_total), by "
            "listener (http or grpc), model and status", ["listener", "model", "status"],
            registry=r)
        self._listener_children: dict[tuple[str, str, str], Any] = {}
        self._load_failures = Counter("tensorbridge_model_load_failures",
                                      "Model versions that failed to load or warm up",
                                      ["model"], registry=r)

    def start_http(self, host: str, port: int) -> None:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread."""
        self._http = start_http_server(port, addr=host, registry=self.registry)

    def stop_http(self) -> None:
        """Stop the ``/metrics`` server, if started."""
        if isinstance(self._http, tuple):  # prometheus_client >= 0.17: (server, thread)
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(5)
        self._http = None

    def model_loaded(self, model: str, seconds: float, instances: int) -> None:
        """A model is loaded and warmed up; ``instances`` is how many the config asks for."""
        with self._lock:
            self._known.add(model)
        self._load.labels(model).set(seconds)
        self._configured.labels(model).set(instances)
        self._alive.labels(model).set(instances)

    def load_failed(self, model: str) -> None:
        """A version of ``model`` failed to load or warm up (the old one keeps serving)."""
        with self._lock:
            self._known.add(model)
        self._load_failures.labels(model).inc()

    def version_ready(self, model: str, version: int, ready: bool) -> None:
        """A version became ready (routed) or stopped being so."""
        with self._lock:
            self._known.add(model)
        self._version_ready.labels(model, str(version)).set(1 if ready else 0)

    def instances_alive(self, model: str, n: int) -> None:
        """How many of the model's instances are healthy now."""
        self._alive.labels(self._model(model)).set(n)

    def answered(self, model: str, version: int, status: str, queue_s: float,
                 preprocess_s: float, compute_s: float, total_s: float) -> None:
        """One INFER answered by ``version`` of ``model``; ``status`` is ``ok`` or the error
        name in lower case."""
        # On every request, so only noted here: five observations cost ~3 µs a request, a
        # bulk update per (model, status) at the next scrape or FLUSH_EVERY requests ~0.1.
        with self._pending_lock:
            self._pending.append((model, version, status, queue_s, preprocess_s, compute_s,
                                  total_s))
            full = len(self._pending) >= FLUSH_EVERY
        if full:
            self.flush()

    def flush(self) -> None:
        """Put the answered requests noted so far into the counters and histograms."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
        # Grouped by C-level passes (map, Counter): a flush takes ~0.1 µs a request.
        noted = Counter_(map(_NOTED_KEY, pending))
        by_status: dict[tuple[str, str], int] = {}
        for (model, _, status), n in noted.items():
            by_status[(model, status)] = by_status.get((model, status), 0) + n
        for key, n in noted.items():
            child = self._version_children.get(key)
            if child is None:
                model, version, status = key
                child = self._version_requests.labels(self._model(model), str(version), status)
                self._version_children[key] = child
            child.inc(n)
        for (model, status), n in by_status.items():
            children = self._children.get((model, status))
            if children is None:
                label = self._model(model)
                children = (self._requests.labels(label, status),
                            *(self._hist[k].labels(label)
                              for k in ("queue", "preprocess", "compute", "total")))
                if label == model:  # unknown names share "_other": not cached one by one
                    self._children[(model, status)] = children
            requests, *hists = children
            requests.inc(n)
            rows = pending if len(by_status) == 1 else [
                p for p in pending if p[0] == model and p[2] == status]
            values = np.asarray(list(map(_SECONDS, rows)), dtype=np.float64)
            for k, hist in enumerate(hists):
                _observe_all(hist, values[:, k])

    def listener_request(self, listener: str, model: str, status: str) -> None:
        """One inference answered through the ``http`` or ``grpc`` listener."""
        key = (listener, model, status)
        child = self._listener_children.get(key)
        if child is None:
            label = self._model(model) if model else ""
            child = self._listener.labels(listener, label, status)
            if label == model:  # as in flush: "_other" names are not cached one by one
                self._listener_children[key] = child
        child.inc()

    def error(self, code: str, model: str | None = None) -> None:
        """One ERROR frame sent, e.g. ``error("invalid_input", "digits")``."""
        self._errors.labels(code.lower(), "" if model is None else self._model(model)).inc()

    def batch(self, model: str, size: int) -> None:
        """One model call computed ``size`` requests together."""
        self._batch.labels(self._model(model)).observe(size)

    def _in_flight_now(self) -> float:
        return float(taken(self._received) - taken(self._answered))

    def shm_mapped(self, delta_bytes: int) -> None:
        """A region was created (+size) or released (-size)."""
        with self._lock:
            self._shm += delta_bytes
            mapped = self._shm
        self._shm_bytes.set(mapped)
        self._shm_ratio.set(mapped / self._shm_cap)

    def connections(self, delta: int) -> None:
        """A connection was accepted (+1) or closed (-1)."""
        self._connections.inc(delta)

    def text(self) -> bytes:
        """The exposition text, as ``/metrics`` serves it."""
        return generate_latest(self.registry)

    def _model(self, model: str) -> str:
        with self._lock:
            return model if model in self._known else OTHER_MODEL
