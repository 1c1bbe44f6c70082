<?php

declare(strict_types=1);

namespace TensorBridge\Exception;

/**
 * Base class of every exception thrown by the TensorBridge client.
 */
class TensorBridgeException extends \RuntimeException
{
    /**
     * @param string|null $errorCode the spec error name (e.g. 'MODEL_NOT_FOUND') when the server sent an ERROR frame
     */
    public function __construct(
        string $message = '',
        private readonly ?string $errorCode = null,
        ?\Throwable $previous = null,
    ) {
        parent::__construct($message, self::numericCode($errorCode), $previous);
    }

    /**
     * The protocol error name (spec §7, e.g. 'MODEL_NOT_FOUND'), or null for client-side conditions.
     */
    public function getErrorCode(): ?string
    {
        return $this->errorCode;
    }

    private static function numericCode(?string $name): int
    {
        return match ($name) {
            'MODEL_NOT_FOUND' => 1,
            'INVALID_INPUT' => 2,
            'PAYLOAD_TOO_LARGE' => 3,
            'DEADLINE_EXCEEDED' => 4,
            'OVERLOADED' => 5,
            'MODEL_ERROR' => 6,
            'PROTOCOL_ERROR' => 7,
            'UNAUTHORIZED' => 8,
            'INTERNAL' => 9,
            default => 0,
        };
    }
}
