"""Log set-up for ``tensorbridge serve``: plain text lines or one JSON object per line.

JSON lines carry ``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger`` and ``msg``,
plus every field passed with ``extra=`` (the slow-request warning passes ``model``, ``rid``,
``queue_ms`` and ``total_ms``), so log shippers can filter on them without parsing text.

Logging never blocks serving: records are formatted in the logging thread and handed to one
writer thread through a bounded buffer (``NonBlockingHandler``). When the sink stops reading
(a pipe nobody drains, a stuck terminal) the writer blocks, the buffer fills, and further
lines are dropped and counted; once the sink reads again the writer says how many were lost.
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
import threading
import time
from collections import deque
from datetime import datetime, timezone
from typing import Any, TextIO

__all__ = ["JsonFormatter", "NonBlockingHandler", "TEXT_FORMAT", "configure_logging", "say"]

TEXT_FORMAT = "%(asctime)s tensorbridge %(levelname)s %(message)s"
LOG_FORMATS = ("text", "json")

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        # default=str: an odd extra value (a Path, an exception) must not lose the line.
        return json.dumps(entry, default=str, ensure_ascii=False)


class NonBlockingHandler(logging.Handler):
    """Formats records at once and leaves the writing to a thread of its own.

    At most ``capacity`` lines wait; more are dropped and counted (``dropped``), and the
    writer reports the count as a WARNING line as soon as it can write again.
    """

    def __init__(self, stream: TextIO, capacity: int = 10_000) -> None:
        super().__init__()
        self.stream = stream
        self.capacity = capacity
        #: Lines dropped since start because the sink did not keep up.
        self.dropped = 0
        self._unreported = 0
        self._lines: deque[str] = deque()
        self._ready = threading.Condition(threading.Lock())
        self._writing = False
        self._writer = threading.Thread(target=self._write_lines, name="tb-log-writer",
                                        daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a bad record must not stop the caller
            self.handleError(record)
            return
        self.write(line)

    def write(self, line: str) -> None:
        """Queue one line as it is (never blocks; dropped when the buffer is full)."""
        with self._ready:
            if len(self._lines) >= self.capacity:
                self.dropped += 1
                self._unreported += 1
                return
            self._lines.append(line)
            self._ready.notify()

    def _write_lines(self) -> None:
        while True:
            with self._ready:
                while not self._lines and not self._unreported:
                    self._ready.wait()
                lines = list(self._lines)
                self._lines.clear()
                lost, self._unreported = self._unreported, 0
                self._writing = True
            if lost:
                lines.append(self._lost_line(lost))
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed sink: nothing else to tell it
            finally:
                with self._ready:
                    self._writing = False

    def _lost_line(self, lost: int) -> str:
        record = logging.LogRecord("tensorbridge", logging.WARNING, __file__, 0,
                                   "%d log line(s) dropped: the log sink did not keep up "
                                   "(%d dropped since start)", (lost, self.dropped), None)
        record.dropped = lost  # for JSON lines
        return self.format(record)

    def flush_for(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the queued lines to be written; True if they were."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with self._ready:
                if not self._lines and not self._writing and not self._unreported:
                    return True
            time.sleep(0.01)
        return False


_handler: NonBlockingHandler | None = None


def say(line: str) -> None:
    """Write one line as it is (the ready line) through the log writer, or to stderr."""
    if _handler is not None:
        _handler.write(line)
    else:
        print(line, file=sys.stderr, flush=True)


def configure_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None,
                      capacity: int = 10_000) -> NonBlockingHandler:
    """Send all log records at ``level`` and above to ``stream`` (stderr) as ``fmt`` lines,
    through a ``NonBlockingHandler``."""
    global _handler
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {list(LOG_FORMATS)}")
    handler = NonBlockingHandler(stream or sys.stderr, capacity)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    if _handler is None:
        # At exit, give the writer a moment for the last lines ("stopped"), never forever.
        atexit.register(lambda: _handler is not None and _handler.flush_for(2.0))
    _handler = handler
    root.setLevel(level.upper())
    # Python warnings (torch's deprecations) and crashes of threads go through the same
    # handler, so that a JSON log stays one object per line.
    logging.captureWarnings(True)
    threading.excepthook = _log_thread_crash
    return handler


def _log_thread_crash(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    exc = args.exc_value if args.exc_value is not None else args.exc_type()
    logging.getLogger("tensorbridge").critical("thread %s crashed", name, exc_info=exc)
