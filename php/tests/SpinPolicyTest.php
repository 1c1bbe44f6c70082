<?php

declare(strict_types=1);

namespace TensorBridge\Tests;

use PHPUnit\Framework\TestCase;
use TensorBridge\Client;
use TensorBridge\Internal\SpinPolicy;

/**
 * When the client spins for a reply: fixed settings, and the auto policy driven by simulated
 * round trips (how long a reply takes when the caller spins, and when it sleeps at once).
 */
final class SpinPolicyTest extends TestCase
{
    private const WINDOW = SpinPolicy::AUTO_WINDOW_US;

    public function testFixedSettingsNeverAdapt(): void
    {
        $never = SpinPolicy::of(0);
        $always = SpinPolicy::of(80);
        for ($i = 0; $i < 50; $i++) {
            self::assertSame(0, $never->spinMicros('m'));
            self::assertSame(80, $always->spinMicros('m'));
            $always->record('m', 80, false, 900_000);
            $never->record('m', 0, null, 10_000);
        }
        self::assertSame(80, $always->controlSpinMicros());
        self::assertSame(0, $never->controlSpinMicros());
        self::assertFalse($never->wouldSpin('m'));
        self::assertTrue($always->wouldSpin('m'));
    }

    public function testNegativeIsRefused(): void
    {
        $this->expectException(\InvalidArgumentException::class);
        SpinPolicy::of(-1);
    }

    public function testClientRefusesNegativeSpin(): void
    {
        $this->expectException(\InvalidArgumentException::class);
        new Client('/nonexistent/tb.sock', spinMicros: -5);
    }

    public function testAutoSpinsWhenThatShortensRoundTripsAndStillChecksBlocking(): void
    {
        $p = SpinPolicy::of(null);
        self::assertSame(0, $p->controlSpinMicros(), 'auto never spins for PING/MODELS/ATTACH');
        // a wake-up costs 40 µs here: 30 µs spinning against 70 µs sleeping
        $plan = $this->drive($p, 400, spinNs: 30_000, blockNs: 70_000, hit: true);
        self::assertSame(0, $plan[0], 'the first call sleeps: it measures blocking');
        self::assertSame([1, 1, 1, 1], array_slice($plan, 1, SpinPolicy::TRY_CALLS), 'then a try');
        $steady = array_slice($plan, 100);
        $blocked = count(array_filter($steady, static fn (int $s): bool => $s === 0));
        $checks = count($steady) / SpinPolicy::CHECK_EVERY;
        self::assertEqualsWithDelta($checks, $blocked, 1.0, 'one call in CHECK_EVERY sleeps');
    }

    public function testAutoDoesNotSpinWhenSleepingIsAsFast(): void
    {
        $p = SpinPolicy::of(null);
        // replies come within the window, but a sleeping caller gets them as fast (cheap wake-ups)
        $plan = $this->drive($p, 3000, spinNs: 33_000, blockNs: 35_000, hit: true);
        self::assertSame([16, 32, 64, 128, 256, 512, 1024], array_slice($this->pauses($plan), 0, 7));
        self::assertLessThan(60, array_sum($plan), 'only the tries spin');
    }

    public function testAutoStopsWhenTwoRepliesInARowMissTheWindow(): void
    {
        $p = SpinPolicy::of(null);
        $plan = $this->drive($p, 200, spinNs: 30_000, blockNs: 70_000, hit: true);
        self::assertTrue($p->wouldSpin('m'));
        for ($i = 0; $i < 2; $i++) { // now the cores are busy: replies take 600 µs
            $spin = $p->spinMicros('m');
            $p->record('m', $spin, $spin > 0 ? false : null, 600_000);
        }
        self::assertFalse($p->wouldSpin('m'));
        self::assertCount(200, $plan);
    }

    public function testACheckThatFindsBlockingAsFastStopsTheSpinning(): void
    {
        $p = SpinPolicy::of(null);
        $this->drive($p, 100, spinNs: 30_000, blockNs: 70_000, hit: true);
        // the wake-ups got cheap (another host load): the checks see it within a few of them
        $plan = $this->drive($p, 400, spinNs: 30_000, blockNs: 31_000, hit: true);
        self::assertGreaterThan(90, array_sum(array_slice($plan, 0, 100)), 'still spinning at first');
        self::assertLessThan(20, array_sum(array_slice($plan, 200)), 'then only the tries spin');
    }

    public function testModelsAreJudgedSeparately(): void
    {
        $p = SpinPolicy::of(null);
        $this->drive($p, 100, spinNs: 30_000, blockNs: 70_000, hit: true, model: 'fast');
        $this->drive($p, 100, spinNs: 5_000_000, blockNs: 5_000_000, hit: false, model: 'slow');
        $fast = $this->drive($p, 32, spinNs: 30_000, blockNs: 70_000, hit: true, model: 'fast');
        $slow = $this->drive($p, 32, spinNs: 5_000_000, blockNs: 5_000_000, hit: false, model: 'slow');
        self::assertGreaterThanOrEqual(30, array_sum($fast));
        self::assertLessThanOrEqual(SpinPolicy::TRY_CALLS, array_sum($slow));
    }

    public function testRepliesReadAheadTeachNothing(): void
    {
        $p = SpinPolicy::of(null);
        $p->record('m', 0, null, 70_000);
        for ($i = 0; $i < 100; $i++) {
            self::assertSame(self::WINDOW, $p->spinMicros('m'));
            $p->record('m', self::WINDOW, null, 1_000); // already read ahead: no poll happened
        }
        self::assertTrue($p->wouldSpin('m'), 'still the same try');
    }

    /**
     * Runs $calls calls; each takes $spinNs when spun ($hit: within the window), $blockNs when not.
     *
     * @return list<int> per call: 1 = spun, 0 = slept at once
     */
    private function drive(
        SpinPolicy $p,
        int $calls,
        int $spinNs,
        int $blockNs,
        bool $hit,
        string $model = 'm',
    ): array {
        $plan = [];
        for ($i = 0; $i < $calls; $i++) {
            $spin = $p->spinMicros($model);
            $p->record($model, $spin, $spin > 0 ? $hit : null, $spin > 0 ? $spinNs : $blockNs);
            $plan[] = $spin > 0 ? 1 : 0;
        }
        return $plan;
    }

    /**
     * Lengths of the runs of sleeping calls between tries (the first call left out).
     *
     * @param list<int> $plan
     * @return list<int>
     */
    private function pauses(array $plan): array
    {
        $runs = [];
        $run = 0;
        foreach (array_slice($plan, 1) as $spun) {
            if ($spun === 0) {
                $run++;
            } elseif ($run > 0) {
                $runs[] = $run;
                $run = 0;
            }
        }
        return $runs;
    }
}
