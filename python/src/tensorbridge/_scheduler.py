"""Per-model work queues: bounded, deadline-aware, dynamically batched, served by instances.

A request for an idle model is run at once by the I/O thread that read it (``try_claim``):
no hand-off, no extra wake-up. A request for a busy model waits here and is run by one of the
model's instances (worker threads), so a slow model stalls nobody but the requests waiting
for it. When batching is on, an instance that takes work takes every compatible waiting
request (up to ``max_batch_size`` rows, following the configured policy), stacks them along
dim 0, runs one forward and splits the outputs back, row for row.

An instance whose call runs past ``watchdog_timeout`` is marked unhealthy: the requests it
holds are failed at once and a fresh instance takes over the queue. A Python thread cannot
be killed, so the stuck one is abandoned; whatever it returns later is dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ._errors import DeadlineExceededError, InternalError, ModelError, TensorBridgeError
from ._models import LoadedModel
from ._request import Request, call_deadline
from ._signature import ANY

log = logging.getLogger("tensorbridge")

#: The seed's queue-depth policy: above this many waiting requests, batch.
QUEUE_DEPTH_THRESHOLD = 50
#: Model calls shorter than this on average may run inline on the compiled loop's thread.
QUICK_CALL_S = 0.002


def _earliest(jobs: list[Request]) -> float | None:
    """The earliest deadline of ``jobs`` (None: none has one)."""
    deadlines = [j.deadline for j in jobs if j.deadline is not None]
    return min(deadlines) if deadlines else None


def batch_key(inputs: dict[str, Any], pad: Mapping[str, int] | None = None
              ) -> tuple[int | None, tuple[Any, ...] | None]:
    """(rows, key) of a job's inputs, or (None, None) when they cannot be stacked.

    Inputs named in ``pad`` (token ids of texts) may differ in dim 1: ``stack`` pads them.
    """
    rows = None
    key: list[tuple[object, ...]] = []
    for name in sorted(inputs):
        value = inputs[name]
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return None, None
        if rows is None:
            rows = value.shape[0]
        elif value.shape[0] != rows:
            return None, None
        if pad and name in pad:
            key.append((name, value.dtype, value.dim(), tuple(value.shape[2:])))
        else:
            key.append((name, value.dtype, tuple(value.shape[1:])))
    return rows, tuple(key)


def stack(parts: list[dict[str, Any]], pad: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Concatenate the jobs' inputs along dim 0; ``pad`` inputs are first padded along dim 1
    to the widest with their pad value (the attention mask pads with 0, so the model
    answers each row as it would alone)."""
    stacked = {}
    for name in parts[0]:
        values = [p[name] for p in parts]
        if name in pad:
            width = max(v.shape[1] for v in values)
            rows = sum(v.shape[0] for v in values)
            out = values[0].new_full((rows, width, *values[0].shape[2:]), pad[name])
            start = 0
            for v in values:
                out[start:start + v.shape[0], :v.shape[1]] = v
                start += v.shape[0]
            stacked[name] = out
        else:
            stacked[name] = torch.cat(values)
    return stacked


def batchable(model: LoadedModel) -> bool:
    """Whether requests for ``model`` may be stacked: batching asked for, and every input of
    the model's own signature has a dynamic first dim."""
    config = model.config
    if config.max_batch_size <= 1 and config.batch_policy != "queue_depth":
        return False
    signature = getattr(model, "forward_signature", model.signature)
    if not signature.inputs:
        return False
    return all(s.shape and s.shape[0] == -1 and s.datatype not in (ANY, "BYTES")
               for s in signature.inputs)


class _Instance:
    """One copy of the model serving the queue: a worker thread and what it runs now."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.healthy = True
        self.busy_since: float | None = None
        self.jobs: list[Request] = []
        self.thread: threading.Thread | None = None


class ModelQueue:
    """A bounded FIFO of jobs for one model, and the instances that run them."""

    def __init__(self, model: LoadedModel,
                 on_batch: Callable[[str, int], None] | None = None,
                 on_instances: Callable[[str, int], None] | None = None) -> None:
        self.model = model
        config = model.config
        self.batching = batchable(model)
        self.max_rows = max(1, config.max_batch_size) if self.batching else 1
        if config.batch_policy == "queue_depth" and self.batching and config.max_batch_size <= 1:
            self.max_rows = 32  # the seed's cap
        self.delay = config.max_queue_delay_us / 1e6 if self.batching else 0.0
        self.preferred = sorted(p for p in config.preferred_batch_sizes if 0 < p <= self.max_rows)
        self.watchdog_timeout = config.watchdog_timeout
        #: Rows of each forward run so far, by size (the batch-size distribution; recorded
        #: for batching models only).
        self.batch_sizes: dict[int, int] = {}
        self.replaced = 0
        #: Moving average of a model call's seconds; unknown = slow.
        self.call_s = float("inf")
        #: Whether a call takes under ``QUICK_CALL_S`` on average: only such calls run inline
        #: on the compiled loop's one Python thread (a slow one would hold everyone's replies
        #: while the model's other instances idle). Kept with ``call_s``: read per request.
        self.quick = False
        self._on_batch = on_batch
        self._on_instances = on_instances
        self._jobs: deque[Request] = deque()
        # The condition's own lock, taken directly where nothing waits on the condition:
        # ``with`` on a Condition is a Python-level call, on a lock a C one (the hot path).
        self._mutex = threading.Lock()
        self._cv = threading.Condition(self._mutex)
        self._stopping = False
        self._instances: list[_Instance] = []
        self._next_index = 0
        for _ in range(config.instance_count):
            self._add_instance()
        self._watchdog: threading.Thread | None = None
        if self.watchdog_timeout > 0:
            self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                              name=f"tb-watchdog-{model.name}")
            self._watchdog.start()
        # A backend that forwards calls elsewhere (the remote one) can be unavailable and says
        # when that flips, takes the calls' deadline, and has connections to close at stop.
        watch = getattr(model.module, "watch_availability", None)
        self._forwards = callable(watch)
        if watch is not None and self._forwards:
            watch(self._report_instances)
        self._report_instances()

    # -- submitting ------------------------------------------------------------------------

    def submit(self, job: Request) -> bool:
        """Queue a job; False when ``max_queue`` jobs already wait (the caller answers OVERLOADED)."""
        with self._cv:
            if len(self._jobs) >= self.model.config.max_queue:
                return False
            self._jobs.append(job)
            # All: the watchdog and instances busy inline wait here too, and notify() might
            # wake one of them instead of the idle instance.
            self._cv.notify_all()
            return True

    def try_claim(self) -> _Instance | None:
        """Take an idle instance for running a job inline, or None when the job must queue
        (the model is busy, others wait, or batching wants to wait for company)."""
        with self._mutex:
            # With a watchdog, calls run on instance threads only: a stuck inline call would
            # hold a pool thread and its connection, which the watchdog cannot give back.
            if self._jobs or self.delay > 0 or self.watchdog_timeout > 0:
                return None
            for inst in self._instances:
                if inst.healthy and inst.busy_since is None:
                    inst.busy_since = time.monotonic()
                    return inst
            return None

    def run_claimed(self, inst: _Instance, job: Request) -> None:
        """Run a job in this thread on the instance taken by ``try_claim``, then free it."""
        try:
            self._run_one(inst, job)
        except Exception as exc:  # a server bug: answer, so the connection is not left pending
            log.exception("model %r: internal error running a request", self.model.name)
            job.finish(InternalError(f"internal server error: {exc!r}"), 0)
        finally:
            self._release(inst)

    # -- housekeeping ----------------------------------------------------------------------

    def expire(self, now: float) -> list[Request]:
        """Remove and return the queued jobs whose deadline has passed."""
        if not self._jobs:  # every pool-thread turn asks every queue: skip the lock when empty
            return []
        with self._cv:
            if not any(j.deadline is not None and j.deadline <= now for j in self._jobs):
                return []
            dead = [j for j in self._jobs if j.deadline is not None and j.deadline <= now]
            self._jobs = deque(j for j in self._jobs if j not in dead)
            return dead

    def next_deadline(self) -> float | None:
        """The earliest deadline among queued jobs."""
        if not self._jobs:
            return None
        deadlines = [j.deadline for j in tuple(self._jobs) if j.deadline is not None]
        return min(deadlines) if deadlines else None

    def pending(self) -> int:
        """Jobs queued or running."""
        with self._cv:
            return len(self._jobs) + sum(len(i.jobs) for i in self._instances if i.healthy)

    def healthy_instances(self) -> int:
        """Instances able to take work (none while the backend is unavailable)."""
        if not getattr(self.model.module, "available", True):
            return 0
        with self._cv:
            return sum(i.healthy for i in self._instances)

    def stop(self) -> None:
        """Let the instances finish their current call and exit."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        for inst in list(self._instances):
            if inst.thread is not None and inst.healthy:
                inst.thread.join(timeout=5)
        # A backend with connections and a poller of its own (the remote one) closes them:
        # a version loaded at start is never garbage-collected (gc.freeze).
        if self._forwards:
            self.model.module.close()

    # -- instances -------------------------------------------------------------------------

    def _add_instance(self) -> None:
        inst = _Instance(self._next_index)
        self._next_index += 1
        inst.thread = threading.Thread(target=self._work, args=(inst,), daemon=True,
                                       name=f"tb-model-{self.model.name}-{inst.index}")
        self._instances.append(inst)
        inst.thread.start()

    def _report_instances(self) -> None:
        if self._on_instances is not None:
            self._on_instances(self.model.name, self.healthy_instances())

    def _release(self, inst: _Instance) -> None:
        with self._mutex:
            inst.busy_since = None
            inst.jobs = []
            if self._jobs:
                # Only then has a sleeping instance something to take: waking the instances
                # after every inline call cost a context switch and a GIL hand-over each.
                self._cv.notify_all()

    def _work(self, inst: _Instance) -> None:
        while True:
            with self._cv:
                while True:
                    if self._stopping or not inst.healthy:
                        return
                    wait = None
                    if self._jobs and inst.busy_since is None:  # not running a job inline
                        batch, wait = self._take(time.monotonic())
                        if batch:
                            inst.busy_since = time.monotonic()
                            break
                    self._cv.wait(wait)
            try:
                self._run(inst, batch)
            except Exception as exc:  # a server bug: answer, and keep the instance alive
                log.exception("model %r: internal error running a batch", self.model.name)
                error = InternalError(f"internal server error: {exc!r}")
                for job in batch:
                    job.finish(error, 0)
            finally:
                self._release(inst)

    def _take(self, now: float) -> tuple[list[Request], float | None]:
        """Pick the next batch under the lock: (jobs, None), or ([], seconds to wait)."""
        head = self._jobs[0]
        if not self.batching or head.key is None:
            return [self._jobs.popleft()], None
        same = [j for j in self._jobs if j.key == head.key]
        if self.model.config.batch_policy == "queue_depth":
            depth = len(self._jobs)
            want = 1 if depth <= QUEUE_DEPTH_THRESHOLD else max(4, min(32, depth // 2))
            return self._pop(same, min(want, self.max_rows)), None
        rows = sum(j.rows or 0 for j in same)
        # Idle instances (this one included) share what waits, so that on a CPU two
        # instances run two half batches at once rather than one full batch on one core.
        idle = sum(1 for i in self._instances if i.healthy and i.busy_since is None)
        target = min(self.max_rows, max(1, -(-rows // max(1, idle))))
        if rows < self.max_rows:
            fits = [p for p in self.preferred if p <= rows]
            # Wait for company until the delay has passed, but never more than half of any
            # waiting request's time budget: one that could run now must not expire waiting.
            until = min([head.arrived + self.delay]
                        + [j.arrived + (j.deadline - j.arrived) / 2 for j in same
                           if j.deadline is not None])
            if now < until and not (fits and fits[-1] == self.preferred[-1]):
                return [], until - now
            target = fits[-1] if fits and self.preferred else target
        batch = self._pop(same, target)
        if self._jobs:
            self._cv.notify_all()  # what is left may go to another idle instance now
        return batch, None

    def _pop(self, same: list[Request], max_rows: int) -> list[Request]:
        taken: list[Request] = []
        rows = 0
        for job in same:
            if taken and rows + (job.rows or 0) > max_rows:
                break
            taken.append(job)
            rows += job.rows or 0
        chosen = set(map(id, taken))
        self._jobs = deque(j for j in self._jobs if id(j) not in chosen)
        return taken

    # -- running ---------------------------------------------------------------------------

    def _run(self, inst: _Instance, jobs: list[Request]) -> None:
        if len(jobs) == 1:
            self._run_one(inst, jobs[0])
            return
        started = time.monotonic()
        live = []
        for job in jobs:
            job.started = started
            if job.deadline is not None and started >= job.deadline:
                job.finish(deadline_error(job), 0)
            else:
                live.append(job)
        if not live:
            return
        if len(live) == 1:
            self._run_one(inst, live[0], started)
            return
        inst.jobs = live
        rows = sum(j.rows or 0 for j in live)
        parts = self._call(live)
        if isinstance(parts, TensorBridgeError):
            if inst.healthy and isinstance(parts, ModelError):
                # One request may have caused it: run each alone so only its caller fails.
                for job in live:
                    self._run_one(inst, job)
                return
            for job in live:
                job.finish(parts, rows)
            return
        self._called(started, rows)
        for job, part in zip(live, parts, strict=True):
            job.finish(part, rows)

    def _run_one(self, inst: _Instance, job: Request, started: float = 0.0) -> None:
        """``_run`` of one job (the common case, kept short: it is the inline path)."""
        if not started:
            started = time.monotonic()
            job.started = started
            if job.deadline is not None and started >= job.deadline:
                job.finish(deadline_error(job), 0)
                return
        inst.jobs = [job]
        rows = job.rows or 1
        parts = self._call(inst.jobs)
        if isinstance(parts, TensorBridgeError):
            job.finish(parts, rows)
            return
        self._called(started, rows)
        job.finish(parts[0], rows)

    def _call(self, live: list[Request]) -> list[dict[str, Any]] | TensorBridgeError:
        """One model call for ``live`` (stacked when several): each job's outputs, or the
        error to answer them all with.

        The error is a fresh one without the traceback: the model's frames hold views into
        the clients' regions, which must not outlive the request (a cycle would keep them).
        Not only ModelError: moving outputs off a device, stacking or splitting can raise
        too, and every job must still be answered. A backend's typed error (the remote's
        OVERLOADED or DEADLINE_EXCEEDED) keeps its type."""
        token = call_deadline.set(_earliest(live)) if self._forwards else None
        try:
            if len(live) == 1:
                return [self.model.forward(live[0].inputs)]
            stacked = stack([j.inputs for j in live], self.model.pipeline.pad)
            return self._split(self.model.forward(stacked), [j.rows or 0 for j in live])
        except Exception as exc:
            error = (type(exc)(str(exc)) if isinstance(exc, TensorBridgeError) else
                     ModelError(f"model {self.model.name!r}: {type(exc).__name__}: {exc}"))
            del exc
            return error
        finally:
            if token is not None:
                call_deadline.reset(token)

    def _called(self, started: float, rows: int) -> None:
        took = time.monotonic() - started
        self.call_s = took if self.call_s == float("inf") else self.call_s + (took - self.call_s) / 8
        self.quick = self.call_s < QUICK_CALL_S
        if self.batching:
            self._record(rows)

    def _split(self, outputs: dict[str, Any], rows: list[int]) -> list[dict[str, Any]]:
        total = sum(rows)
        parts: list[dict[str, Any]] = [{} for _ in rows]
        for name, value in outputs.items():
            rows_out = value.shape[0] if isinstance(value, torch.Tensor) and value.dim() else (
                len(value) if isinstance(value, (list, tuple)) else None)
            if rows_out != total:
                raise ModelError(
                    f"model {self.model.name!r} output {name!r} has {rows_out} rows for a "
                    f"batch of {total}; this model cannot be batched: set max_batch_size = 1")
            start = 0
            for part, n in zip(parts, rows, strict=True):
                part[name] = value[start:start + n]
                start += n
        return parts

    def _record(self, rows: int) -> None:
        if not self.batching:
            return  # every call is one request: nothing to learn, and this path is hot
        with self._cv:
            self.batch_sizes[rows] = self.batch_sizes.get(rows, 0) + 1
        if self._on_batch is not None:
            self._on_batch(self.model.name, rows)

    # -- watchdog --------------------------------------------------------------------------

    def _watch(self) -> None:
        period = min(max(self.watchdog_timeout / 10, 0.02), 1.0)
        while True:
            with self._cv:
                if self._stopping:
                    return
                self._cv.wait(period)
                now = time.monotonic()
                stuck = [i for i in self._instances if i.healthy and i.busy_since is not None
                         and now - i.busy_since > self.watchdog_timeout]
                for inst in stuck:
                    inst.healthy = False
                    self._instances.remove(inst)
                    self.replaced += 1
                    self._add_instance()
                    log.error("watchdog: model %r instance %d has been in one call for %.1f s "
                              "(watchdog_timeout %.1f s); failing its %d request(s) and "
                              "starting instance %d", self.model.name, inst.index,
                              now - (inst.busy_since or now), self.watchdog_timeout,
                              len(inst.jobs), self._next_index - 1)
            for inst in stuck:
                error = ModelError(
                    f"model {self.model.name!r} did not answer within its watchdog_timeout of "
                    f"{self.watchdog_timeout:g} s; the stuck instance was replaced. Retry; if "
                    "it keeps happening, check the model for hangs or raise watchdog_timeout")
                for job in list(inst.jobs):
                    job.finish(error, 0)
            if stuck:
                self._report_instances()


def deadline_error(job: Request) -> DeadlineExceededError:
    """The answer for a job whose deadline passed before its model could run."""
    return DeadlineExceededError(
        f"the request's deadline ({job.timeout_us / 1000:.1f} ms) passed "
        f"before model {job.model.name!r} could run; it was not computed")
