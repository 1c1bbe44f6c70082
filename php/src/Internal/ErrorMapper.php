<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

use TensorBridge\ErrorCode;
use TensorBridge\Exception\DeadlineExceededException;
use TensorBridge\Exception\InternalException;
use TensorBridge\Exception\InvalidInputException;
use TensorBridge\Exception\ModelException;
use TensorBridge\Exception\ModelNotFoundException;
use TensorBridge\Exception\OverloadedException;
use TensorBridge\Exception\PayloadTooLargeException;
use TensorBridge\Exception\ProtocolException;
use TensorBridge\Exception\ServerException;
use TensorBridge\Exception\TensorBridgeException;
use TensorBridge\Exception\UnauthorizedException;

/**
 * The one place where ERROR codes (spec §7) become exceptions.
 *
 * @internal
 */
final class ErrorMapper
{
    /**
     * Whether the server closes the connection after sending this error.
     */
    public static function closesConnection(ErrorReply $error): bool
    {
        return ErrorCode::tryFrom($error->code)?->closesConnection() ?? false;
    }

    /**
     * Builds the exception for an ERROR reply.
     *
     * @param string $model the model the request was for ('' when none)
     * @param float $timeout the call's timeout in seconds
     */
    public static function toException(ErrorReply $error, string $model, float $timeout): TensorBridgeException
    {
        $code = ErrorCode::tryFrom($error->code);
        $msg = $error->message;
        return match ($code) {
            ErrorCode::MODEL_NOT_FOUND => new ModelNotFoundException(
                sprintf('model "%s" is not loaded on the server: %s', $model, $msg),
                $model,
            ),
            ErrorCode::INVALID_INPUT => new InvalidInputException('invalid input: ' . $msg, $code),
            ErrorCode::PAYLOAD_TOO_LARGE => new PayloadTooLargeException('payload too large: ' . $msg, $code),
            ErrorCode::DEADLINE_EXCEEDED => new DeadlineExceededException(
                sprintf(
                    'the server gave up on the request (DEADLINE_EXCEEDED): its deadline (%.3f s) passed'
                    . ' before the model (or the remote server a remote model forwards to) answered: %s.'
                    . ' Raise the timeout or check the server load.',
                    $timeout,
                    $msg,
                ),
                $timeout,
            ),
            // With no model the refusal is the connection's own (max_connections and the like).
            ErrorCode::OVERLOADED => new OverloadedException(
                $model === ''
                    ? 'the server refused the connection (OVERLOADED), retry later: ' . $msg
                    : sprintf('model "%s" is overloaded (its queue is full), retry later: %s', $model, $msg),
                $code,
            ),
            ErrorCode::MODEL_ERROR => new ModelException(sprintf('model "%s" raised: %s', $model, $msg)),
            ErrorCode::PROTOCOL_ERROR => new ProtocolException(
                'the server rejected a frame (protocol error): ' . $msg,
                $code,
            ),
            ErrorCode::UNAUTHORIZED => new UnauthorizedException(
                'the server refused this process (UNAUTHORIZED); check its --allow-uid setting: ' . $msg,
                $code,
            ),
            ErrorCode::INTERNAL => new InternalException('internal server error: ' . $msg),
            null => new ServerException(sprintf('server error code %d: %s', $error->code, $msg)),
        };
    }
}
