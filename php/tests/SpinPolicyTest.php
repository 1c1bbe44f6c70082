<?php

declare(strict_types=1);

namespace TensorBridge\Tests;

use PHPUnit\Framework\TestCase;
use TensorBridge\Client;
use TensorBridge\Internal\SpinPolicy;

/**
 * When the client spins for a reply: fixed settings, and the auto policy driven by a sequence of
 * hits (reply came while spinning) and misses (the spin ran out and the caller slept).
 */
final class SpinPolicyTest extends TestCase
{
    public function testFixedSettingsNeverAdapt(): void
    {
        $never = SpinPolicy::of(0);
        $always = SpinPolicy::of(80);
        for ($i = 0; $i < 50; $i++) {
            self::assertSame(0, $never->spinMicros('m'));
            self::assertSame(80, $always->spinMicros('m'));
            $always->record('m', false);
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

    public function testAutoSpinsFromTheStartAndKeepsSpinningWhileRepliesComeInTime(): void
    {
        $p = SpinPolicy::of(null);
        self::assertNull($p->fixedMicros);
        self::assertSame(0, $p->controlSpinMicros(), 'auto never spins for PING/MODELS/ATTACH');
        for ($i = 0; $i < 500; $i++) {
            self::assertSame(SpinPolicy::AUTO_WINDOW_US, $p->spinMicros('echo'), "call $i");
            $p->record('echo', $i % 3 !== 0); // two hits in three: spinning still pays
        }
    }

    public function testAutoStopsAfterMissesThenRetriesWithGrowingPauses(): void
    {
        $p = SpinPolicy::of(null);
        $pauses = [];
        $spins = 0;
        for ($call = 0; $call < 20000; $call++) {
            $spin = $p->spinMicros('resnet');
            if ($spin > 0) {
                $spins++;
                $p->record('resnet', false); // every spin runs out: a slow model or busy cores
                continue;
            }
            $p->record('resnet', null); // blocked at once: nothing learned
            $last = array_key_last($pauses);
            if ($last !== null && $pauses[$last][1] === $call - 1) {
                $pauses[$last][1] = $call;
            } else {
                $pauses[] = [$call, $call];
            }
        }
        $lengths = array_map(static fn (array $r): int => $r[1] - $r[0] + 1, $pauses);
        self::assertSame([16, 32, 64, 128, 256, 512, 1024, 1024], array_slice($lengths, 0, 8));
        self::assertSame(3, $pauses[0][0], 'three misses in a row stop the first try');
        // under steady misses the tries cost a few spins per BACKOFF_MAX calls
        self::assertLessThan(20000 / 100, $spins);
    }

    public function testATryThatHoldsResetsTheBackOff(): void
    {
        $p = SpinPolicy::of(null);
        $this->missUntilPaused($p);      // pause 16
        $this->waitOutPause($p, 16);
        $this->missUntilPaused($p);      // pause 32
        $this->waitOutPause($p, 32);
        for ($i = 0; $i < SpinPolicy::BACKOFF_MIN; $i++) {
            self::assertTrue($p->wouldSpin('m'));
            $p->spinMicros('m');
            $p->record('m', true);       // the cores are free again: replies come in time
        }
        $this->missUntilPaused($p);
        $this->waitOutPause($p, SpinPolicy::BACKOFF_MIN);
    }

    public function testModelsAreJudgedSeparately(): void
    {
        $p = SpinPolicy::of(null);
        $this->missUntilPaused($p, 'slow');
        self::assertFalse($p->wouldSpin('slow'));
        self::assertTrue($p->wouldSpin('fast'));
        self::assertSame(SpinPolicy::AUTO_WINDOW_US, $p->spinMicros('fast'));
        self::assertSame(0, $p->spinMicros('slow'));
    }

    public function testUnansweredSpinsDoNotCount(): void
    {
        $p = SpinPolicy::of(null);
        for ($i = 0; $i < 100; $i++) {
            $p->spinMicros('m');
            $p->record('m', null); // the reply was already read ahead: no spin happened
        }
        self::assertTrue($p->wouldSpin('m'));
    }

    private function missUntilPaused(SpinPolicy $p, string $model = 'm'): void
    {
        for ($i = 0; $i < 10 && $p->wouldSpin($model); $i++) {
            self::assertSame(SpinPolicy::AUTO_WINDOW_US, $p->spinMicros($model));
            $p->record($model, false);
        }
        self::assertFalse($p->wouldSpin($model));
    }

    private function waitOutPause(SpinPolicy $p, int $calls): void
    {
        for ($i = 0; $i < $calls; $i++) {
            self::assertSame(0, $p->spinMicros('m'), "paused call $i of $calls");
        }
        self::assertTrue($p->wouldSpin('m'));
    }
}
