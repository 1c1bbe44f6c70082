<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

/**
 * How long a client polls for a reply before it sleeps in select() (spin-before-block, spec §8).
 *
 * Fixed: always the same time (0 = never spin). Auto (the default) measures, per model, what
 * spinning buys: the moving-average round trip of calls that spun for up to AUTO_WINDOW_US and
 * of calls that slept at once. It spins only while that makes round trips at least 1/8 shorter.
 * Whether it does depends on the host: a wake-up costs ~30-45 µs on some VMs and little on
 * others, and with more callers than cores a spinning caller keeps the server off a core.
 *
 * Blocking is the starting point. After the first call (blocking), TRY_CALLS calls spin; if
 * they were not faster, the next try comes after BACKOFF_MIN calls, then twice as many, up to
 * BACKOFF_MAX. While spinning, one call in CHECK_EVERY blocks to keep the other average fresh:
 * a check that finds spinning no longer pays pauses it (the back-off doubles; each check that
 * holds halves it again). Replies that miss the window stop it at once: two in a try of four
 * (where other callers compete for the cores, replies come late that often), three in a row
 * once spinning.
 *
 * Pure logic: the caller asks before each call and reports how it went.
 *
 * @internal
 */
final class SpinPolicy
{
    /** how long auto mode spins, in microseconds */
    public const AUTO_WINDOW_US = 50;
    /** calls that spin in one try */
    public const TRY_CALLS = 4;
    /** calls between the first failed try and the next */
    public const BACKOFF_MIN = 16;
    /** the longest pause between two tries, in calls */
    public const BACKOFF_MAX = 1024;
    /** while spinning, one call in this many sleeps at once (to measure blocking) */
    public const CHECK_EVERY = 16;

    private const BLOCK = 0;
    private const TRY = 1;
    private const SPIN = 2;
    /** hit score scale: FULL = every recent spin got its reply within the window */
    private const FULL = 256;
    /** moving-average weight of a new sample: 1 / 2^SHIFT */
    private const SHIFT = 2;
    /** a single round trip never counts for more than this (ns): one stall does not decide */
    private const SAMPLE_CAP_NS = 2_000_000;
    /** models whose state is kept (a process calling ever new model names stays bounded) */
    private const MAX_MODELS = 64;

    /**
     * @var array<string, array{0: int, 1: int, 2: int, 3: int, 4: int, 5: int}> model => [mode,
     *      average spun round trip ns, average blocked round trip ns, calls left in this mode's
     *      phase, back-off for the next failed try, hit score]
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
     * Microseconds to spin for the next reply of $model (0 = sleep at once).
     */
    public function spinMicros(string $model): int
    {
        if ($this->fixedMicros !== null) {
            return $this->fixedMicros;
        }
        $s = $this->state[$model] ?? null;
        if ($s === null) {
            return 0; // the first call measures blocking
        }
        if ($s[0] === self::SPIN) {
            return $s[3] === 0 ? 0 : self::AUTO_WINDOW_US; // 0: this call is the check
        }
        if ($s[0] === self::TRY) {
            return self::AUTO_WINDOW_US;
        }
        return $s[3] === 0 ? self::AUTO_WINDOW_US : 0; // BLOCK: a try starts when the pause is over
    }

    /**
     * Microseconds to spin for replies to PING, MODELS and ATTACH (rare: auto never spins for them).
     */
    public function controlSpinMicros(): int
    {
        return $this->fixedMicros ?? 0;
    }

    /**
     * Reports one call's reply: how long it was polled for ($spunMicros, from spinMicros()),
     * whether it came while polling ($hit: null when no poll happened, e.g. the reply had been
     * read already) and the round trip from send to reply (ns).
     */
    public function record(string $model, int $spunMicros, ?bool $hit, int $roundTripNs): void
    {
        if ($this->fixedMicros !== null || ($spunMicros > 0 && $hit === null)) {
            return;
        }
        $rtt = min(max($roundTripNs, 0), self::SAMPLE_CAP_NS);
        if (!isset($this->state[$model])) {
            if (count($this->state) >= self::MAX_MODELS) {
                $this->state = [];
            }
            // the first call blocked: the next ones try spinning
            $this->state[$model] = [self::BLOCK, 0, $rtt, 0, self::BACKOFF_MIN, self::FULL];
            return;
        }
        [$mode, $spin, $block, $left, $backoff, $score] = $this->state[$model];
        if ($spunMicros === 0) {
            $block = self::average($block, $rtt);
            if ($mode === self::SPIN) { // a check call: does spinning still pay?
                // a check that holds halves the back-off; one that fails pauses and doubles it,
                // so spinning that flips on and off settles on pausing long
                $this->state[$model] = self::pays($spin, $block)
                    ? [self::SPIN, $spin, $block, self::CHECK_EVERY - 1, max($backoff >> 1, self::BACKOFF_MIN), $score]
                    : [self::BLOCK, 0, $block, $backoff, min($backoff * 2, self::BACKOFF_MAX), self::FULL];
                return;
            }
            $this->state[$model] = [$mode, $spin, $block, max($left - 1, 0), $backoff, $score];
            return;
        }
        $spin = $spin === 0 ? $rtt : self::average($spin, $rtt);
        $score += (($hit === true ? self::FULL : 0) - $score) >> self::SHIFT;
        if ($mode === self::BLOCK) { // the pause is over: this call starts a try
            $mode = self::TRY;
            $left = self::TRY_CALLS;
        }
        $left--;
        // a try must be near perfect (one late reply in four at most); established spinning
        // stops when about half the replies come late
        $missing = $score < ($mode === self::SPIN ? self::FULL / 2 : self::FULL * 3 / 4);
        if ($mode === self::TRY && $left > 0 && !$missing) {
            $this->state[$model] = [self::TRY, $spin, $block, $left, $backoff, $score];
        } elseif (!$missing && self::pays($spin, $block)) {
            $left = $mode === self::TRY ? self::CHECK_EVERY - 1 : max($left, 0);
            $this->state[$model] = [self::SPIN, $spin, $block, $left, $backoff, $score];
        } else {
            // spinning does not pay now: pause, and wait longer before each further try
            $this->state[$model] = [self::BLOCK, 0, $block, $backoff, min($backoff * 2, self::BACKOFF_MAX), self::FULL];
        }
    }

    /**
     * Whether the next call to $model would spin (without counting it; for tests and diagnostics).
     */
    public function wouldSpin(string $model): bool
    {
        return $this->spinMicros($model) > 0;
    }

    /**
     * Spinning pays when its round trips are at least 1/8 shorter than blocking ones.
     */
    private static function pays(int $spin, int $block): bool
    {
        return $spin * 8 <= $block * 7;
    }

    private static function average(int $old, int $sample): int
    {
        return $old + (($sample - $old) >> self::SHIFT);
    }
}
