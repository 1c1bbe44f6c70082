<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

use TensorBridge\Exception\InvalidInputException;
use TensorBridge\Exception\ModelNotFoundException;
use TensorBridge\Exception\OverloadedException;
use TensorBridge\Exception\PayloadTooLargeException;
use TensorBridge\Exception\ProtocolException;
use TensorBridge\Exception\ServerException;
use TensorBridge\Exception\TensorBridgeException;
use TensorBridge\Exception\TimeoutException;
use TensorBridge\Exception\UnauthorizedException;

/**
 * The one place where ERROR codes (spec §7) become exceptions.
 *
 * @internal
 */
final class ErrorMapper
{
    public const NAMES = [
        1 => 'MODEL_NOT_FOUND',
        2 => 'INVALID_INPUT',
        3 => 'PAYLOAD_TOO_LARGE',
        4 => 'DEADLINE_EXCEEDED',
        5 => 'OVERLOADED',
        6 => 'MODEL_ERROR',
        7 => 'PROTOCOL_ERROR',
        8 => 'UNAUTHORIZED',
        9 => 'INTERNAL',
    ];

    /**
     * Whether the server closes the connection after sending this error.
     */
    public static function closesConnection(ErrorReply $error): bool
    {
        return $error->code === 7 || $error->code === 8;
    }

    /**
     * Builds the exception for an ERROR reply.
     *
     * @param string $model the model the request was for ('' when none)
     * @param float $timeout the call's timeout in seconds
     */
    public static function toException(ErrorReply $error, string $model, float $timeout): TensorBridgeException
    {
        $name = self::NAMES[$error->code] ?? null;
        $msg = $error->message;
        return match ($error->code) {
            1 => new ModelNotFoundException(
                sprintf('model "%s" is not loaded on the server: %s', $model, $msg),
                $model,
                $name,
            ),
            2 => new InvalidInputException('invalid input: ' . $msg, $name),
            3 => new PayloadTooLargeException('payload too large: ' . $msg, $name),
            4 => new TimeoutException(
                sprintf(
                    'the server dropped the request: its deadline (%.3f s) passed before the model ran: %s',
                    $timeout,
                    $msg,
                ),
                $timeout,
                $name,
            ),
            5 => new OverloadedException(
                sprintf('model "%s" is overloaded (its queue is full), retry later: %s', $model, $msg),
                $name,
            ),
            6 => new ServerException(sprintf('model "%s" raised: %s', $model, $msg), $name),
            7 => new ProtocolException('the server rejected a frame (protocol error): ' . $msg, $name),
            8 => new UnauthorizedException(
                'the server refused this process (UNAUTHORIZED); check its --allow-uid setting: ' . $msg,
                $name,
            ),
            9 => new ServerException('internal server error: ' . $msg, $name),
            default => new ServerException(sprintf('server error code %d: %s', $error->code, $msg), null),
        };
    }
}
