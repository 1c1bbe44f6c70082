<?php

declare(strict_types=1);

namespace TensorBridge\Transport;

/**
 * When one public call must be over: a point on the monotonic clock plus the timeout it came from
 * (for messages). Every step of the call, connection set-up included, stops at it.
 */
final class Deadline
{
    /**
     * @param int $at hrtime(true) nanoseconds at which the call's time is up
     * @param float $timeout the timeout in seconds this deadline was made from
     */
    public function __construct(public readonly int $at, public readonly float $timeout)
    {
    }

    /**
     * The deadline $seconds from now.
     */
    public static function in(float $seconds): self
    {
        return new self(hrtime(true) + (int) round($seconds * 1e9), $seconds);
    }

    /**
     * Nanoseconds left (negative once passed).
     */
    public function remainingNs(): int
    {
        return $this->at - hrtime(true);
    }
}
