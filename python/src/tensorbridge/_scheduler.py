"""Per-model work queues: bounded, deadline-aware, served by the model's own threads.

A request for an idle model is run at once by the I/O thread that read it, after that
thread has handed the I/O role to another (``try_claim``): no hand-off, no extra wake-up.
A request for a busy model waits here and is run by the model's worker threads, so a slow
model stalls nobody but the requests waiting for it; a worker that finishes one request
takes the next without sleeping.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._models import LoadedModel


@dataclass(eq=False)
class Job:
    """One INFER waiting for, or running on, a model."""

    model: LoadedModel
    inputs: dict[str, Any]
    deadline: float | None
    arrived: float
    #: Called in a worker thread as run(job) when the job's turn comes.
    run: Callable[[Job], None]
    #: Called (in the I/O loop thread) as expire(job) when the deadline passed in the queue.
    expire: Callable[[Job], None]
    extra: dict[str, Any] = field(default_factory=dict)


class ModelQueue:
    """A bounded FIFO of jobs for one model and ``max_concurrency`` threads that run them."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self._jobs: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._active = 0  # requests running now, inline or in a worker
        self._threads = [threading.Thread(target=self._work, daemon=True,
                                          name=f"tb-model-{model.name}-{i}")
                         for i in range(model.config.max_concurrency)]
        for t in self._threads:
            t.start()

    def submit(self, job: Job) -> bool:
        """Queue a job; False when ``max_queue`` jobs already wait (the caller answers OVERLOADED)."""
        with self._cv:
            if len(self._jobs) >= self.model.config.max_queue:
                return False
            self._jobs.append(job)
            self._cv.notify()
            return True

    def try_claim(self) -> bool:
        """Take a compute slot for running a job inline; False when the model is busy."""
        with self._cv:
            if self._jobs or self._active >= self.model.config.max_concurrency:
                return False
            self._active += 1
            return True

    def run_claimed(self, job: Job) -> None:
        """Run a job in this thread with the slot taken by ``try_claim``, then free it."""
        job.extra["started"] = time.monotonic()
        try:
            job.run(job)
        finally:
            self._release()

    def _release(self) -> None:
        with self._cv:
            self._active -= 1
            self._cv.notify()

    def expire(self, now: float) -> list[Job]:
        """Remove and return the queued jobs whose deadline has passed."""
        with self._cv:
            if not any(j.deadline is not None and j.deadline <= now for j in self._jobs):
                return []
            dead = [j for j in self._jobs if j.deadline is not None and j.deadline <= now]
            self._jobs = deque(j for j in self._jobs if j not in dead)
            return dead

    def next_deadline(self) -> float | None:
        """The earliest deadline among queued jobs."""
        deadlines = [j.deadline for j in tuple(self._jobs) if j.deadline is not None]
        return min(deadlines) if deadlines else None

    def stop(self) -> None:
        """Let the worker threads finish their current job and exit."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=5)

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not (
                        self._jobs and self._active < self.model.config.max_concurrency):
                    self._cv.wait()
                if self._stopping:
                    return
                job = self._jobs.popleft()
                self._active += 1
            job.extra["started"] = time.monotonic()
            try:
                job.run(job)
            finally:
                self._release()
