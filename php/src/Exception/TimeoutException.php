<?php

declare(strict_types=1);

namespace TensorBridge\Exception;

/**
 * Thrown when the call's deadline passed, on the client side or on the server (DEADLINE_EXCEEDED).
 */
final class TimeoutException extends TensorBridgeException
{
    /**
     * @param float $timeout the per-call timeout in seconds that was exceeded
     */
    public function __construct(
        string $message,
        private readonly float $timeout,
        ?string $errorCode = null,
        ?\Throwable $previous = null,
    ) {
        parent::__construct($message, $errorCode, $previous);
    }

    /**
     * The per-call timeout in seconds that was exceeded.
     */
    public function getTimeout(): float
    {
        return $this->timeout;
    }
}
