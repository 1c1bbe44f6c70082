<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

/**
 * Breaker state in process memory, shared by the Clients of one PHP process for one key.
 *
 * PHP-FPM clears it at the end of every web request; FileBreakerStore is used where it can be.
 *
 * @internal
 */
final class MemoryBreakerStore implements BreakerStore
{
    /** @var array<string, array{failures: int, open_until: float|null, reason: string}> */
    private static array $states = [];
    /** @var array<string, float> key => probe claim expiry */
    private static array $probes = [];

    public function __construct(private readonly string $key)
    {
    }

    public function load(): ?array
    {
        return self::$states[$this->key] ?? null;
    }

    public function save(array $state): void
    {
        self::$states[$this->key] = $state;
    }

    public function clear(): void
    {
        unset(self::$states[$this->key], self::$probes[$this->key]);
    }

    public function claimProbe(float $now, float $until): bool
    {
        if (isset(self::$probes[$this->key]) && self::$probes[$this->key] > $now) {
            return false;
        }
        self::$probes[$this->key] = $until;
        return true;
    }

    public function releaseProbe(): void
    {
        unset(self::$probes[$this->key]);
    }
}
