<?php

declare(strict_types=1);

namespace TensorBridge\Exception;

use TensorBridge\ErrorCode;

/**
 * Thrown when the call's deadline passed: the client's own timeout fired (isClientDeadline()), or
 * the server dropped the request because its deadline passed before the model ran
 * (DEADLINE_EXCEEDED, isServerDeadline(); thrown as the subclass DeadlineExceededException).
 */
class TimeoutException extends TensorBridgeException
{
    /**
     * @param float $timeout the per-call timeout in seconds that was exceeded
     */
    public function __construct(
        string $message,
        private readonly float $timeout,
        ErrorCode|string|null $errorCode = null,
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

    /**
     * True when the server answered DEADLINE_EXCEEDED: the request was not computed.
     */
    public function isServerDeadline(): bool
    {
        return $this->errorCode() === ErrorCode::DEADLINE_EXCEEDED;
    }

    /**
     * True when the client's own timeout fired while it waited (the server may still run the request).
     */
    public function isClientDeadline(): bool
    {
        return !$this->isServerDeadline();
    }
}
