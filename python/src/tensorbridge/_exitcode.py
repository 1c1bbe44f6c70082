"""The exit statuses of every ``tensorbridge`` command, in one place (docs/operations.md)."""

from __future__ import annotations

from enum import IntEnum

__all__ = ["ExitCode"]


class ExitCode(IntEnum):
    """Exit statuses of every ``tensorbridge`` command (docs/operations.md)."""

    #: Done; ``health``: the server answered a real request and is ready.
    OK = 0
    #: ``serve`` failed while running; ``health``: the server answers but is not ready (a
    #: model has no healthy instance, it is draining, or the test request failed).
    FAILURE = 1
    #: Bad usage or configuration (unknown key, wrong type, out-of-range value, missing
    #: model file or factory); ``serve`` stops with it before binding anything.
    CONFIG = 2
    #: ``health``/``models``: no server answered on the socket within ``--timeout``.
    UNREACHABLE = 3
