<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

/**
 * How long a client polls for a reply before it sleeps in select() (spin-before-block, spec §8).
 *
 * Fixed: always the same time (0 = never spin). Auto (the default), per model: spin for
 * AUTO_WINDOW_US while most recent replies came within the window (a hit: no sleep, no
 * wake-up). When the hits drop below half (a slow model; busy cores, where the reply waits for
 * a server that a spinning caller keeps off a core), stop spinning for a number of calls that
 * doubles after each failed try (BACKOFF_MIN to BACKOFF_MAX calls), then try again. A try that
 * holds for BACKOFF_MIN calls resets the back-off. A try costs about three windows of CPU, so
 * under load the spinning costs well under 1 µs per call on average.
 *
 * Pure logic: the caller reports, per reply, whether it spun and whether the reply came in time.
 *
 * @internal
 */
final class SpinPolicy
{
    /** how long auto mode spins, in microseconds: a quick reply (~30-40 µs here) lands within it */
    public const AUTO_WINDOW_US = 50;
    /** calls without spinning after the first failed try */
    public const BACKOFF_MIN = 16;
    /** the longest pause between two tries, in calls */
    public const BACKOFF_MAX = 1024;
    /** the hit score's scale: FULL = every recent reply came within the window */
    private const FULL = 256;
    /** moving-average weight of a new hit or miss: 1 / 2^SHIFT (three misses in a row stop a try) */
    private const SHIFT = 2;
    /** models whose state is kept (a process calling ever new model names stays bounded) */
    private const MAX_MODELS = 64;

    /**
     * @var array<string, array{0: int, 1: int, 2: int, 3: int}> model => [hit score (0..FULL),
     *      calls left without spinning, back-off for the next failed try, calls spun in this try]
     */
    private array $state = [];

    /**
     * @param int|null $fixedMicros null: auto; else always spin this long (0 = never)
     */
    private function __construct(public readonly ?int $fixedMicros)
    {
    }

    /**
     * The policy for a Client's spinMicros argument: null = auto, 0 = never, > 0 = always that long.
     *
     * @throws \InvalidArgumentException for a negative value
     */
    public static function of(?int $spinMicros): self
    {
        if ($spinMicros !== null && $spinMicros < 0) {
            throw new \InvalidArgumentException('spinMicros must be >= 0 (0 = never spin), or null for auto');
        }
        return new self($spinMicros);
    }

    /**
     * Microseconds to spin for the next reply of $model (0 = block at once). Counts the call.
     */
    public function spinMicros(string $model): int
    {
        if ($this->fixedMicros !== null) {
            return $this->fixedMicros;
        }
        if (!isset($this->state[$model])) {
            return self::AUTO_WINDOW_US; // no history yet: try (the first replies decide)
        }
        if ($this->state[$model][1] > 0) {
            $this->state[$model][1]--;
            return 0;
        }
        return self::AUTO_WINDOW_US;
    }

    /**
     * Microseconds to spin for replies to PING, MODELS and ATTACH (rare: auto never spins for them).
     */
    public function controlSpinMicros(): int
    {
        return $this->fixedMicros ?? 0;
    }

    /**
     * Reports how a reply of $model was waited for: true = it came while spinning, false = the
     * spin ran out and the caller slept; null = no spin (blocked at once, or it was already read).
     */
    public function record(string $model, ?bool $hit): void
    {
        if ($hit === null || $this->fixedMicros !== null) {
            return;
        }
        if (!isset($this->state[$model]) && count($this->state) >= self::MAX_MODELS) {
            $this->state = [];
        }
        [$score, $pause, $backoff, $spun] = $this->state[$model] ?? [self::FULL, 0, self::BACKOFF_MIN, 0];
        $score += (($hit ? self::FULL : 0) - $score) >> self::SHIFT;
        $spun++;
        if ($score < self::FULL / 2) {
            // spinning does not pay now: pause, and wait longer before each further try
            $this->state[$model] = [self::FULL, $backoff, min($backoff * 2, self::BACKOFF_MAX), 0];
            return;
        }
        if ($spun >= self::BACKOFF_MIN) {
            $backoff = self::BACKOFF_MIN; // this try held: a later failure pauses briefly again
        }
        $this->state[$model] = [$score, $pause, $backoff, $spun];
    }

    /**
     * Whether the next call to $model would spin (without counting it; for tests and diagnostics).
     */
    public function wouldSpin(string $model): bool
    {
        return $this->fixedMicros !== null
            ? $this->fixedMicros > 0
            : ($this->state[$model][1] ?? 0) === 0;
    }
}
