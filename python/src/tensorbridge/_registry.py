"""Which model versions are served, and their lifecycle: load, reload, unload, poll.

Each model has a *route*: an immutable snapshot of its ready versions (``_routing.Route``).
A request resolves its model once, takes a use of the chosen version (``acquire``) and gives
it back when answered (``release``). A reload loads and warms the new versions beside the old
ones, then replaces the route in one assignment: requests decoded after that run on the new
versions, those already holding the old ones finish there, and an old version is freed (its
instances stopped, its memory returned) when its last use is given back. A version that fails
to load or warm up leaves the route as it was; the failure is kept for ``list``, logged and
counted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import InvalidInputError, ModelError, ModelNotFoundError
from ._models import LoadedModel, ModelConfig, load_model
from ._repository import Repository, select_versions
from ._routing import Route, parse_split

if TYPE_CHECKING:
    from ._scheduler import ModelQueue

log = logging.getLogger("tensorbridge")

LOADING, READY, UNLOADING, FAILED = "loading", "ready", "unloading", "failed"
#: Commands of an ADMIN frame (spec §11).
COMMANDS = ("list", "load", "unload", "reload")


class ServedVersion:
    """One copy of one model version: its state, and when ready its model and work queue."""

    def __init__(self, name: str, version: int, config: ModelConfig,
                 stamp: tuple[int, ...]) -> None:
        self.name = name
        self.version = version
        self.config = config
        self.stamp = stamp
        self.state = LOADING
        self.reason: str | None = None
        self.load_seconds: float | None = None
        self.model: LoadedModel | None = None
        #: The version's work queue (the server makes it: ``make_queue``).
        self.queue: ModelQueue | None = None
        self._lock = threading.Lock()
        self._users = 0
        self._retired = False
        self._freed = False
        self._on_freed: Callable[[ServedVersion], None] | None = None

    def acquire(self) -> bool:
        """Take a use for one request; False once the version has been freed."""
        with self._lock:
            if self._freed:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        """Give a use back; the last one of a retired version frees it."""
        with self._lock:
            self._users -= 1
            free = self._retired and self._users == 0 and not self._freed
            if free:
                self._freed = True
        if free:
            self._free_later()

    def retire(self, on_freed: Callable[[ServedVersion], None]) -> None:
        """Take no new requests (the route no longer holds it); free it once drained."""
        with self._lock:
            if self._retired:
                return
            self._retired = True
            if self.state == READY:
                self.state = UNLOADING
            self._on_freed = on_freed
            free = self._users == 0 and not self._freed
            if free:
                self._freed = True
        if free:
            self._free_later()

    def info(self) -> dict[str, Any]:
        """This copy as a ``list`` entry (spec §11)."""
        return {"version": self.version, "state": self.state, "reason": self.reason,
                "load_seconds": None if self.load_seconds is None
                else round(self.load_seconds, 3),
                "source": self.config.source, "backend": _backend(self.config.source)}

    def _free_later(self) -> None:
        # Never in the caller's thread: that may be a pool thread answering a request, and
        # stopping the instances joins their threads.
        threading.Thread(target=self._free, name=f"tb-free-{self.name}-{self.version}",
                         daemon=True).start()

    def _free(self) -> None:
        queue, self.queue, self.model = self.queue, None, None
        if queue is not None:
            queue.stop()
        del queue
        gc.collect()
        _trim_heap()
        log.info("model %r version %d freed", self.name, self.version)
        if self._on_freed is not None:
            self._on_freed(self)


def _backend(source: str) -> str:
    from ._backends import backend_name

    return backend_name(source) if source else ""


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


@dataclass(eq=False)
class _Entry:
    """Everything the registry keeps about one model name."""

    name: str
    #: A model given with a source (``--model``, ``[models.X] source = ...``): one version, 1.
    fixed: ModelConfig | None = None
    #: ``[models.X]`` keys without a source: they override the repository's config.toml.
    overrides: ModelConfig | None = None
    route: Route[ServedVersion] = field(default_factory=lambda: Route({}, None))
    split: dict[int, float] | None = None
    policy: Any = "latest"
    #: Every copy listed by ``list``: loading, ready, unloading and failed ones.
    copies: list[ServedVersion] = field(default_factory=list)
    #: One lifecycle command at a time per model.
    op: threading.Lock = field(default_factory=threading.Lock)
    #: ``unload`` was asked for: polling does not bring the model back.
    unloaded: bool = False
    #: Versions whose files failed to load, by stamp: polling does not retry them unchanged.
    failed_stamps: dict[int, tuple[int, ...]] = field(default_factory=dict)


class Registry:
    """The served models and versions; the server asks it ``resolve(name, version, key)``."""

    def __init__(self, models: list[ModelConfig], repository: str | None,
                 make_queue: Callable[[LoadedModel], ModelQueue],
                 metrics: Any = None, poll_interval: float = 0.0) -> None:
        self.repository = Repository(repository) if repository else None
        self._make_queue = make_queue
        self._metrics = metrics
        self._lock = threading.Lock()  # guards _entries and every entry's copies
        self._entries: dict[str, _Entry] = {}
        self._poll_interval = poll_interval
        #: Bumped whenever a model's route is replaced: what a connection remembers of an
        #: earlier ``resolve`` (``fixed_choice``) holds only while this is unchanged.
        self.generation = 0
        #: The queues of every copy not yet freed, rebuilt on each change: the pool threads
        #: read it on every wake-up (deadlines), so it is never built on that path.
        self.queues: tuple[ModelQueue, ...] = ()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        for config in models:
            if config.source:
                self._entries[config.name] = _Entry(config.name, fixed=config,
                                                    policy=config.version_policy)
            elif self.repository is not None and (self.repository.path / config.name).is_dir():
                self._entries[config.name] = _Entry(config.name, overrides=config)
            else:
                raise ValueError(f"[models.{config.name}] has no source, and no repository "
                                 f"folder {config.name!r} exists to take it from")
        if self.repository is not None:
            for name in self.repository.names():
                self._entries.setdefault(name, _Entry(name))

    # -- the request path ----------------------------------------------------------------

    def resolve(self, name: str, version: int | None = None,
                key: bytes | None = None) -> ServedVersion:
        """The ready version a request runs on, with a use taken (``release`` it when done).

        Raises ``ModelNotFoundError`` naming what exists."""
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFoundError(f"model {name!r} is not loaded; loaded models: "
                                     f"{self.names()}")
        while True:
            route = entry.route
            served = (route.by_version.get(version) if version is not None
                      else route.pick(key))
            if served is None:
                if version is not None and route.by_version:
                    raise ModelNotFoundError(
                        f"model {name!r} has no version {version}; versions: "
                        f"{sorted(route.by_version)}")
                raise ModelNotFoundError(
                    f"model {name!r} has no ready version (unloaded, or its load failed: "
                    f"see `tensorbridge models list`); `tensorbridge models load {name}` "
                    "loads it")
            if served.acquire():
                return served
            # Freed between reading the route and taking the use: the route is new by now.

    def fixed_choice(self, name: str, version: int | None, key: bytes | None) -> bool:
        """Whether ``resolve(name, version, key)`` gives the same version every time until
        ``generation`` changes (False for a random A/B split: it must pick per request)."""
        entry = self._entries.get(name)
        return entry is not None and (version is not None or key is not None or not entry.split)

    def names(self) -> list[str]:
        """Models with at least one ready version."""
        return sorted(n for n, e in self._entries.items() if e.route.by_version)

    def ready_versions(self) -> Iterator[ServedVersion]:
        """Every routed version of every model."""
        for entry in list(self._entries.values()):
            yield from entry.route.by_version.values()

    def default(self, name: str) -> ServedVersion | None:
        """The version a request for ``name`` without a version or key would get now."""
        entry = self._entries.get(name)
        return entry.route.newest if entry is not None else None

    def adopt(self, model: LoadedModel) -> None:
        """Serve a model loaded by the caller as version 1 (``Server(config, models)``)."""
        copy = ServedVersion(model.name, model.version, model.config, ())
        copy.model, copy.queue, copy.load_seconds = model, self._make_queue(model), 0.0
        entry = _Entry(model.name, fixed=model.config)
        with self._lock:
            self._entries[model.name] = entry
            entry.copies.append(copy)
        self._state(copy, READY)
        entry.route = Route({model.version: copy}, None)
        self._routes_changed()
        self._queues_changed()

    def _routes_changed(self) -> None:
        with self._lock:  # two models may be switched at once: no increment may be lost
            self.generation += 1

    def _queues_changed(self) -> None:
        with self._lock:
            self.queues = tuple(c.queue for e in self._entries.values() for c in e.copies
                                if c.queue is not None)

    def metadata(self) -> list[dict[str, Any]]:
        """MODELS_OK entries (spec §4.1): the default version's signature, every version."""
        out = []
        for name in self.names():
            entry = self._entries[name]
            default = entry.route.newest
            if default is None or default.model is None:
                continue
            out.append({**default.model.metadata(), "versions": self._version_states(entry)})
        return out

    def _version_states(self, entry: _Entry) -> list[dict[str, Any]]:
        rank = {READY: 0, LOADING: 1, UNLOADING: 2, FAILED: 3}
        best: dict[int, str] = {}
        with self._lock:
            for copy in entry.copies:
                if copy.version not in best or rank[copy.state] < rank[best[copy.version]]:
                    best[copy.version] = copy.state
        return [{"version": v, "state": best[v]} for v in sorted(best, reverse=True)]

    # -- lifecycle -----------------------------------------------------------------------

    def load_all(self) -> None:
        """Load every model at start; the first failure raises ``ValueError`` naming it."""
        for i, name in enumerate(sorted(self._entries), 1):
            log.info("model %d/%d", i, len(self._entries))
            try:
                self.load(name)
            except ModelError as exc:  # at start a model that cannot load is a config error
                raise ValueError(str(exc)) from None

    def admin(self, command: str, name: str | None) -> dict[str, Any]:
        """One ADMIN command (spec §11) -> the ADMIN_OK body."""
        if command not in COMMANDS:
            raise InvalidInputError(f"unknown admin command {command!r}; use one of "
                                    f"{', '.join(COMMANDS)}")
        if command != "list" or name is not None:
            if not isinstance(name, str) or not name:
                raise InvalidInputError(f"admin command {command!r} needs a model name")
            if command == "load":
                self.load(name)
            elif command == "reload":
                self.reload(name)
            elif command == "unload":
                self.unload(name)
            else:
                self._entry(name, known_only=True)
        return {"models": self.describe(name)}

    def describe(self, name: str | None = None) -> list[dict[str, Any]]:
        """``list`` entries (spec §11) for one model or all."""
        names = [name] if name is not None else sorted(self._entries)
        out = []
        for n in names:
            entry = self._entries.get(n)
            if entry is None:
                continue
            with self._lock:
                copies = sorted(entry.copies, key=lambda c: -c.version)
            out.append({"name": n, "policy": entry.policy,
                        "routing": {str(v): w for v, w in entry.split.items()}
                        if entry.split else None,
                        "versions": [c.info() for c in copies]})
        return out

    def load(self, name: str) -> None:
        """Serve the versions the policy selects, loading those not ready yet."""
        self._change(self._entry(name), force=False)

    def reload(self, name: str) -> None:
        """Load fresh copies of the policy's versions beside the old, then switch to them."""
        self._change(self._entry(name, known_only=True), force=True)

    def unload(self, name: str) -> None:
        """Route nothing to the model any more; free each version when drained."""
        entry = self._entry(name, known_only=True)
        with entry.op:
            entry.unloaded = True
            old, entry.route = entry.route, Route({}, None)
            self._routes_changed()
            with self._lock:
                entry.copies = [c for c in entry.copies if c.state != FAILED]
            for copy in old.by_version.values():
                self._state(copy, UNLOADING)
                copy.retire(self._forget)
            log.info("model %r unloaded; versions %s drain and are freed",
                     name, sorted(old.by_version))

    def _entry(self, name: str, known_only: bool = False) -> _Entry:
        entry = self._entries.get(name)
        if entry is None and not known_only and self.repository is not None \
                and name in self.repository.names():
            with self._lock:
                entry = self._entries.setdefault(name, _Entry(name))
        if entry is None:
            where = f" or a folder of {self.repository.path}" if self.repository else ""
            raise ModelNotFoundError(f"model {name!r} is not configured{where}; known models: "
                                     f"{sorted(self._entries)}")
        return entry

    def _wanted(self, entry: _Entry) -> dict[int, tuple[ModelConfig, tuple[int, ...]]]:
        """{version: (config, stamp)} the model's policy selects now."""
        if entry.fixed is not None:
            path = Path(entry.fixed.source)
            stamp = (path.stat().st_mtime_ns, path.stat().st_size) if path.is_file() else ()
            entry.split = parse_split(entry.fixed.routing)
            return {1: (entry.fixed, stamp)}
        assert self.repository is not None
        base = self.repository.model_config(entry.name, entry.overrides)
        entry.policy = base.version_policy
        entry.split = parse_split(base.routing)
        folders = self.repository.versions(entry.name)
        chosen = select_versions(base.version_policy, list(folders))
        if not chosen:
            raise ModelNotFoundError(f"model {entry.name!r}: no version folder of "
                                     f"{self.repository.path / entry.name} matches its "
                                     f"version_policy {base.version_policy!r}")
        return {v: (self.repository.version_config(base, folders[v]), folders[v].stamp)
                for v in chosen}

    def _change(self, entry: _Entry, force: bool, polling: bool = False) -> None:
        with entry.op:
            try:
                wanted = self._wanted(entry)
            except ValueError as exc:
                raise ModelError(f"model {entry.name!r}: {exc}") from None
            current = entry.route.by_version
            todo = {v: cs for v, cs in wanted.items()
                    if force or v not in current or current[v].stamp != cs[1]}
            if polling:
                todo = {v: cs for v, cs in todo.items()
                        if entry.failed_stamps.get(v) != cs[1]}
                if not todo and set(current) <= set(wanted):
                    return
            fresh = self._load_copies(entry, todo)
            kept = {v: current[v] for v in wanted if v not in fresh and v in current}
            old, entry.route = entry.route, Route({**kept, **fresh}, entry.split)
            self._routes_changed()
            entry.unloaded = False
            for version, copy in old.by_version.items():
                if entry.route.by_version.get(version) is not copy:
                    copy.retire(self._forget)
            if fresh or old.by_version.keys() != entry.route.by_version.keys():
                log.info("model %r now serves versions %s (newly loaded: %s)", entry.name,
                         sorted(entry.route.by_version), sorted(fresh))

    def _load_copies(self, entry: _Entry, todo: dict[int, tuple[ModelConfig, tuple[int, ...]]]
                     ) -> dict[int, ServedVersion]:
        """Load and warm every version of ``todo``; all or none (``ModelError``)."""
        copies = {v: ServedVersion(entry.name, v, config, stamp)
                  for v, (config, stamp) in todo.items()}
        with self._lock:
            entry.copies.extend(copies.values())
        failures = []
        for version, copy in sorted(copies.items(), reverse=True):
            t0 = time.monotonic()
            try:
                model = load_model(copy.config, version)
                copy.queue = self._make_queue(model)
                copy.model = model
                self._queues_changed()
            except Exception as exc:  # the model's own failure: reported, the old one serves
                copy.reason = (str(exc) if isinstance(exc, (ValueError, ModelError))
                               else f"{type(exc).__name__}: {exc}")
                entry.failed_stamps[version] = copy.stamp
                self._state(copy, FAILED)
                failures.append(f"version {version}: {copy.reason}")
                log.error("model %r version %d failed to load or warm up: %s", entry.name,
                          version, copy.reason)
                if self._metrics is not None:
                    self._metrics.load_failed(entry.name)
                continue
            copy.load_seconds = time.monotonic() - t0
            entry.failed_stamps.pop(version, None)
            self._state(copy, READY)
            if self._metrics is not None:
                self._metrics.model_loaded(entry.name, copy.load_seconds,
                                           copy.config.instance_count)
        with self._lock:  # an earlier failure of a version is replaced by its new copy
            entry.copies = [c for c in entry.copies if c.state != FAILED or c in
                            copies.values() or c.version not in copies]
        if failures:
            for copy in copies.values():
                if copy.state == READY:
                    copy.retire(self._forget)
            serving = sorted(entry.route.by_version)
            raise ModelError(f"model {entry.name!r}: {'; '.join(failures)}. "
                             + (f"Versions {serving} keep serving." if serving else
                                "Nothing of it is served."))
        return copies

    def _state(self, copy: ServedVersion, state: str) -> None:
        copy.state = state
        if self._metrics is not None:
            self._metrics.version_ready(copy.name, copy.version, state == READY)

    def _forget(self, copy: ServedVersion) -> None:
        """A retired copy was freed: it leaves the list."""
        entry = self._entries.get(copy.name)
        if entry is not None:
            with self._lock:
                entry.copies = [c for c in entry.copies if c is not copy]
            self._queues_changed()
            if self._metrics is not None and copy.version not in entry.route.by_version:
                self._metrics.version_ready(copy.name, copy.version, False)

    # -- polling -------------------------------------------------------------------------

    def start_polling(self) -> None:
        """Watch the repository every ``poll_interval`` seconds (0 = never)."""
        if self._poll_interval <= 0 or self.repository is None:
            return
        self._poller = threading.Thread(target=self._poll, name="tb-repository-poll",
                                        daemon=True)
        self._poller.start()

    def stop(self) -> None:
        """Stop polling and every version's instances."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=10)
        for queue in self.queues:
            queue.stop()

    def _poll(self) -> None:
        assert self.repository is not None
        while not self._stop.wait(self._poll_interval):
            try:
                on_disk = set(self.repository.names())
            except OSError as exc:
                log.warning("repository poll: %s", exc)
                continue
            for name in sorted(on_disk | set(self._entries)):
                entry = self._entries.get(name)
                try:
                    if name not in on_disk:
                        if entry is not None and entry.fixed is None and entry.route.by_version:
                            log.info("repository poll: %r was removed; unloading", name)
                            self.unload(name)
                        continue
                    entry = self._entry(name)
                    if not entry.unloaded:
                        self._change(entry, force=False, polling=True)
                except Exception as exc:  # reported in list and the log; polling carries on
                    log.warning("repository poll: model %r: %s", name, exc)
