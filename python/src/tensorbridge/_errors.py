"""The exception tree. Each class maps to one error code of spec/protocol.md §7."""

from __future__ import annotations

from ._spec import ErrorCode


class TensorBridgeError(Exception):
    """Base class of every error raised by tensorbridge."""

    code: ErrorCode = ErrorCode.INTERNAL


class ConnectionError(TensorBridgeError):  # noqa: A001 - mirrors PHP's ConnectionException
    """The server cannot be reached, or it closed the connection (crash or restart)."""


class TimeoutError(TensorBridgeError):  # noqa: A001 - mirrors PHP's TimeoutException
    """The client's deadline passed before the reply arrived."""


class ModelNotFoundError(TensorBridgeError):
    """No model of that name is loaded."""

    code = ErrorCode.MODEL_NOT_FOUND


class InvalidInputError(TensorBridgeError):
    """Inputs do not match the model's signature (names, datatypes or shapes)."""

    code = ErrorCode.INVALID_INPUT


class PayloadTooLargeError(InvalidInputError):
    """The request needs more shared memory than the region cap, or a frame beyond MAX_BODY."""

    code = ErrorCode.PAYLOAD_TOO_LARGE


class DeadlineExceededError(TimeoutError):
    """The request's deadline passed before the model ran; it was not computed."""

    code = ErrorCode.DEADLINE_EXCEEDED


class OverloadedError(TensorBridgeError):
    """The model's queue is full; retry later or raise ``max_queue``."""

    code = ErrorCode.OVERLOADED


class ModelError(TensorBridgeError):
    """The model raised an exception; the message keeps its type and text."""

    code = ErrorCode.MODEL_ERROR


class ProtocolError(TensorBridgeError):
    """A frame or descriptor violates the protocol."""

    code = ErrorCode.PROTOCOL_ERROR


class UnauthorizedError(ConnectionError):
    """The server refused this process's uid (see ``--allow-uid``)."""

    code = ErrorCode.UNAUTHORIZED


class InternalError(TensorBridgeError):
    """A bug in the server; it carried on."""

    code = ErrorCode.INTERNAL


_BY_CODE: dict[int, type[TensorBridgeError]] = {
    cls.code: cls
    for cls in (ModelNotFoundError, InvalidInputError, PayloadTooLargeError,
                DeadlineExceededError, OverloadedError, ModelError, ProtocolError,
                UnauthorizedError, InternalError)
}


def error_for_code(code: int, message: str) -> TensorBridgeError:
    """Build the exception matching an ERROR frame's code."""
    return _BY_CODE.get(code, InternalError)(message)
