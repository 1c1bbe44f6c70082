<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

use TensorBridge\Exception\CircuitOpenException;

/**
 * Circuit breaker for one server socket: after `threshold` consecutive calls that failed to
 * connect or timed out, calls fail fast (CircuitOpenException, the socket is not touched) for
 * `coolDown` seconds; then one call is let through as a probe. A probe that gets an answer
 * closes the circuit; a probe that fails opens it for another cool-down.
 *
 * States: closed (no state stored, or failures below the threshold), open (open_until in the
 * future), half-open (open_until passed; the next caller to claim the probe goes through).
 *
 * @internal
 */
final class CircuitBreaker
{
    public const CLOSED = 'closed';
    public const OPEN = 'open';
    public const HALF_OPEN = 'half-open';

    /** @var (\Closure(): float)|null null: microtime(true) */
    private readonly ?\Closure $clock;
    /**
     * Seconds after a call reached the server during which this breaker takes the circuit to be
     * closed without reading the stored state: a busy worker then stats the shared state file at
     * most ten times a second instead of once per call. Its own failure ends the window at once.
     */
    public const TRUST_AFTER_SUCCESS = 0.1;

    /** until when (clock seconds) admit() trusts the last success instead of reading the store */
    private float $trustedUntil = -INF;
    /** whether the last admit() saw stored failures (a success then has something to clear) */
    private bool $dirty = false;

    /**
     * @param int $threshold consecutive failures that open the circuit; 0 turns the breaker off
     * @param float $coolDown seconds the circuit stays open before a probe
     * @param (\Closure(): float)|null $clock seconds on a clock all processes share; default microtime(true)
     */
    public function __construct(
        private readonly BreakerStore $store,
        private readonly string $socketPath,
        public readonly int $threshold,
        public readonly float $coolDown,
        ?\Closure $clock = null,
    ) {
        if ($threshold < 0) {
            throw new \InvalidArgumentException('breakerThreshold must be >= 0 (0 turns the breaker off)');
        }
        if (!($coolDown > 0.0) || is_infinite($coolDown)) {
            throw new \InvalidArgumentException('breakerCoolDown must be a positive number of seconds');
        }
        $this->clock = $clock;
    }

    /**
     * Called before a call may touch the socket. Returns true when the call is the probe.
     *
     * @param float $probeFor seconds the probe may take (its claim expires after that)
     * @throws CircuitOpenException while the circuit is open or another caller is probing
     */
    public function admit(float $probeFor): bool
    {
        if ($this->threshold === 0 || ($this->trustedUntil > -INF && $this->now() < $this->trustedUntil)) {
            return false;
        }
        $state = $this->store->load();
        $this->dirty = $state !== null;
        if ($state === null || $state['open_until'] === null) {
            return false;
        }
        $now = $this->now();
        $left = $state['open_until'] - $now;
        if ($left > $this->coolDown) {
            $left = $this->coolDown; // the clock went back: never wait longer than one cool-down
        }
        if ($left > 0.0) {
            throw $this->openException($state, $left, false);
        }
        if ($this->store->claimProbe($now, $now + $probeFor)) {
            return true;
        }
        throw $this->openException($state, 0.0, true);
    }

    /**
     * The call got an answer from the server (an ERROR reply counts): the circuit closes.
     */
    public function recordSuccess(bool $probe): void
    {
        if ($this->threshold === 0) {
            return;
        }
        if ($probe || $this->dirty) {
            $this->store->clear();
            $this->dirty = false;
        }
        $this->trustedUntil = $this->now() + min(self::TRUST_AFTER_SUCCESS, $this->coolDown);
    }

    /**
     * The call could not connect, lost its connection, or timed out.
     */
    public function recordFailure(bool $probe, string $reason): void
    {
        if ($this->threshold === 0) {
            return;
        }
        $this->trustedUntil = -INF;
        $state = $this->store->load() ?? ['failures' => 0, 'open_until' => null, 'reason' => ''];
        $failures = $state['failures'] + 1;
        $openUntil = $state['open_until'];
        if ($probe || $failures >= $this->threshold) {
            $openUntil = $this->now() + $this->coolDown;
        }
        $this->store->save(['failures' => $failures, 'open_until' => $openUntil, 'reason' => $reason]);
        $this->dirty = true;
        if ($probe) {
            $this->store->releaseProbe();
        }
    }

    /**
     * The call ended without telling whether the server is up (e.g. a local input error):
     * a probe claim is given back so that the next call probes.
     */
    public function recordNeutral(bool $probe): void
    {
        if ($probe) {
            $this->store->releaseProbe();
        }
    }

    /**
     * The current state: CLOSED, OPEN or HALF_OPEN.
     */
    public function state(): string
    {
        $state = $this->threshold === 0 ? null : $this->store->load();
        if ($state === null || $state['open_until'] === null) {
            return self::CLOSED;
        }
        return $state['open_until'] > $this->now() ? self::OPEN : self::HALF_OPEN;
    }

    private function now(): float
    {
        return $this->clock === null ? microtime(true) : ($this->clock)();
    }

    /**
     * @param array{failures: int, open_until: float|null, reason: string} $state
     */
    private function openException(array $state, float $left, bool $probing): CircuitOpenException
    {
        $when = $probing
            ? 'another call is probing the server now; retry in a moment'
            : sprintf(
                'failing fast for %.1f s more (until %s UTC), then one call will probe the server',
                $left,
                gmdate('H:i:s', (int) ceil(microtime(true) + $left)),
            );
        return new CircuitOpenException(sprintf(
            'circuit open for %s after %d consecutive connection failures or timeouts (last: %s); %s.'
            . ' Check that the server at that address (`tensorbridge serve`, or the OIP server at'
            . ' a URL) is running and answering.',
            $this->socketPath,
            $state['failures'],
            $state['reason'] !== '' ? rtrim($state['reason'], '.') : 'unknown',
            $when,
        ), $this->socketPath, $left);
    }
}
