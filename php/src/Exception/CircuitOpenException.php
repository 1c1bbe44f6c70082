<?php

declare(strict_types=1);

namespace TensorBridge\Exception;

/**
 * Thrown without contacting the server while the client's circuit breaker is open: the last
 * calls to this socket failed to connect or timed out, so calls fail fast until the cool-down
 * ends and one call probes the server again. Nothing was sent; retrying later is safe.
 */
final class CircuitOpenException extends ConnectionException
{
    /**
     * @param float $retryAfter seconds until a call will be let through to probe the server
     */
    public function __construct(
        string $message,
        private readonly string $socketPath,
        private readonly float $retryAfter,
    ) {
        parent::__construct($message);
    }

    /**
     * The server socket the breaker guards.
     */
    public function getSocketPath(): string
    {
        return $this->socketPath;
    }

    /**
     * Seconds until the breaker lets one call through to probe the server (0 when a probe by
     * another call or worker is under way).
     */
    public function getRetryAfter(): float
    {
        return $this->retryAfter;
    }
}
