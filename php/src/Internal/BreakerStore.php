<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

/**
 * Where a circuit breaker keeps its state, so that it can outlive one web request.
 *
 * The state is `['failures' => int, 'open_until' => float|null, 'reason' => string]`
 * (open_until in clock seconds; null while closed).
 *
 * @internal
 */
interface BreakerStore
{
    /**
     * The stored state, or null when there is none (the breaker is closed with no failures).
     *
     * @return array{failures: int, open_until: float|null, reason: string}|null
     */
    public function load(): ?array;

    /**
     * Replaces the stored state.
     *
     * @param array{failures: int, open_until: float|null, reason: string} $state
     */
    public function save(array $state): void;

    /**
     * Forgets the state and any probe claim (the breaker closes).
     */
    public function clear(): void;

    /**
     * Claims the one probe allowed after a cool-down; false when another caller holds an
     * unexpired claim. A claim expires at $until, so a caller that died mid-probe does not
     * keep the breaker open for ever.
     */
    public function claimProbe(float $now, float $until): bool;

    /**
     * Gives up a probe claim without changing the state.
     */
    public function releaseProbe(): void;
}
