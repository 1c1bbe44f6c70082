"""ADMIN frames (spec §11): list, load, unload, reload, for the uids of ``admin_uid`` only."""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any

from .._errors import InternalError, InvalidInputError, TensorBridgeError, UnauthorizedError
from .._spec import ErrorCode, FrameType
from .._wire import encode_error

if TYPE_CHECKING:
    from .connection import Peer

log = logging.getLogger("tensorbridge")


def admin_uids(configured: list[int]) -> list[int]:
    """Who may send ADMIN: ``admin_uid``, or by default the server's own uid and root."""
    return list(configured) if configured else sorted({os.getuid(), 0})


def handle(conn: Peer, rid: int, body: bytes, seq: int) -> None:
    """Check the peer, decode the command; ``list`` is answered at once, the others (which
    load or free models) from a thread of their own once done."""
    allowed = admin_uids(conn.server.config.admin_uid)
    if conn.peer_uid not in allowed:
        raise UnauthorizedError(f"uid {conn.peer_uid} may not send ADMIN commands; admin_uid "
                                f"is {allowed} (run the command as one of them, or add the "
                                "uid to admin_uid)")
    command, model = _decode(body)
    registry = conn.server.registry
    if command == "list":
        conn.emit(seq, _ok(conn, rid, registry.admin(command, model)))
        return
    log.info("admin: %s %s (uid %d, pid %d)", command, model, conn.peer_uid, conn.peer_pid)

    def work() -> bytes:
        try:
            return _ok(conn, rid, registry.admin(command, model))
        except TensorBridgeError as exc:
            error: TensorBridgeError = exc
        except Exception as exc:  # a bug must still be answered
            log.exception("admin %s %s failed", command, model)
            error = InternalError(f"internal server error: {exc!r}")
        conn.server.metrics.error(ErrorCode(error.code).name, None)
        return conn.frame(FrameType.ERROR, rid, encode_error(error.code, str(error)))

    conn.answer_later(seq, work)


def _decode(body: bytes) -> tuple[str, str | None]:
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"ADMIN body is not JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        raise InvalidInputError('ADMIN body must be {"command": ..., "model": ...}')
    model = request.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidInputError("ADMIN model must be a string")
    return request["command"], model


def _ok(conn: Peer, rid: int, result: dict[str, Any]) -> bytes:
    return conn.frame(FrameType.ADMIN_OK, rid, json.dumps(result).encode())
