<?php

declare(strict_types=1);

namespace TensorBridge\Tests;

use PHPUnit\Framework\TestCase;
use TensorBridge\Exception\CircuitOpenException;
use TensorBridge\Exception\ConnectionException;
use TensorBridge\Internal\BreakerStore;
use TensorBridge\Internal\CircuitBreaker;
use TensorBridge\Internal\FileBreakerStore;
use TensorBridge\Internal\MemoryBreakerStore;

require_once __DIR__ . '/TempDir.php';

/**
 * The breaker's state machine with a hand-driven clock, in memory and in files.
 */
final class CircuitBreakerTest extends TestCase
{
    private float $now = 1000.0;
    private string $dir = '';

    protected function setUp(): void
    {
        $this->dir = TempDir::create('tb-breaker-test');
    }

    protected function tearDown(): void
    {
        TempDir::remove($this->dir);
    }

    /**
     * @return iterable<string, array{string}>
     */
    public static function storeProvider(): iterable
    {
        yield 'memory' => ['memory'];
        yield 'file' => ['file'];
    }

    /**
     * @dataProvider storeProvider
     */
    public function testOpensAfterThresholdFailsFastThenLetsOneProbeThrough(string $kind): void
    {
        $b = $this->breaker($this->store($kind), 3, 10.0);
        self::assertSame(CircuitBreaker::CLOSED, $b->state());
        for ($i = 0; $i < 2; $i++) {
            self::assertFalse($b->admit(1.0));
            $b->recordFailure(false, 'cannot connect');
        }
        self::assertSame(CircuitBreaker::CLOSED, $b->state());
        self::assertFalse($b->admit(1.0));
        $b->recordFailure(false, 'cannot connect');
        self::assertSame(CircuitBreaker::OPEN, $b->state());

        $this->now += 4.0;
        $e = $this->rejected($b);
        self::assertEqualsWithDelta(6.0, $e->getRetryAfter(), 1e-6);
        self::assertStringContainsString('after 3 consecutive connection failures or timeouts', $e->getMessage());
        self::assertStringContainsString('last: cannot connect', $e->getMessage());
        self::assertStringContainsString('failing fast for 6.0 s more', $e->getMessage());
        self::assertSame('/tmp/x.sock', $e->getSocketPath());
        self::assertInstanceOf(ConnectionException::class, $e);

        $this->now += 6.0;
        self::assertSame(CircuitBreaker::HALF_OPEN, $b->state());
        self::assertTrue($b->admit(1.0), 'the first call after the cool-down is the probe');
        $other = $this->rejected($b); // only one probe at a time
        self::assertStringContainsString('another call is probing', $other->getMessage());
        $b->recordSuccess(true);
        self::assertSame(CircuitBreaker::CLOSED, $b->state());
        self::assertFalse($b->admit(1.0));
    }

    /**
     * @dataProvider storeProvider
     */
    public function testFailedProbeReopensForAnotherCoolDown(string $kind): void
    {
        $b = $this->breaker($this->store($kind), 1, 5.0);
        $b->admit(1.0);
        $b->recordFailure(false, 'timed out');
        $this->now += 5.0;
        self::assertTrue($b->admit(1.0));
        $b->recordFailure(true, 'still down');
        self::assertSame(CircuitBreaker::OPEN, $b->state());
        $e = $this->rejected($b);
        self::assertEqualsWithDelta(5.0, $e->getRetryAfter(), 1e-6);
        self::assertStringContainsString('last: still down', $e->getMessage());
        $this->now += 5.0;
        self::assertTrue($b->admit(1.0), 'the failed probe gave its claim back');
    }

    /**
     * @dataProvider storeProvider
     */
    public function testSuccessResetsTheConsecutiveCount(string $kind): void
    {
        $b = $this->breaker($this->store($kind), 2, 5.0);
        $b->admit(1.0);
        $b->recordFailure(false, 'x');
        $b->admit(1.0);
        $b->recordSuccess(false);
        $b->admit(1.0);
        $b->recordFailure(false, 'x');
        self::assertSame(CircuitBreaker::CLOSED, $b->state(), 'failures were not consecutive');
    }

    /**
     * @dataProvider storeProvider
     */
    public function testNeutralProbeGivesItsClaimBack(string $kind): void
    {
        $b = $this->breaker($this->store($kind), 1, 5.0);
        $b->admit(1.0);
        $b->recordFailure(false, 'x');
        $this->now += 5.0;
        self::assertTrue($b->admit(1.0));
        $b->recordNeutral(true); // e.g. the call failed on a local input check before any I/O
        self::assertSame(CircuitBreaker::HALF_OPEN, $b->state());
        self::assertTrue($b->admit(1.0));
    }

    /**
     * @dataProvider storeProvider
     */
    public function testAProbeClaimExpiresWhenItsCallerDied(string $kind): void
    {
        $store = $this->store($kind);
        $b = $this->breaker($store, 1, 5.0);
        $b->admit(1.0);
        $b->recordFailure(false, 'x');
        $this->now += 5.0;
        self::assertTrue($b->admit(2.0)); // this caller never reports back
        $this->now += 1.0;
        $this->rejected($b);
        $this->now += 1.5;
        self::assertTrue($b->admit(2.0), 'the stale claim expired');
    }

    public function testThresholdZeroTurnsTheBreakerOff(): void
    {
        $b = $this->breaker($this->store('memory'), 0, 5.0);
        for ($i = 0; $i < 10; $i++) {
            self::assertFalse($b->admit(1.0));
            $b->recordFailure(false, 'x');
        }
        self::assertSame(CircuitBreaker::CLOSED, $b->state());
    }

    public function testAClockThatWentBackNeverWaitsMoreThanOneCoolDown(): void
    {
        $b = $this->breaker($this->store('memory'), 1, 5.0);
        $b->admit(1.0);
        $b->recordFailure(false, 'x');
        $this->now -= 3600.0;
        self::assertEqualsWithDelta(5.0, $this->rejected($b)->getRetryAfter(), 1e-6);
    }

    public function testAfterASuccessTheStoredStateIsReadAgainWithinATenthOfASecond(): void
    {
        $a = $this->breaker($this->store('file'), 1, 5.0);
        $b = $this->breaker($this->store('file'), 1, 5.0);
        $a->admit(1.0);
        $a->recordSuccess(false);
        $b->admit(1.0);
        $b->recordFailure(false, 'down'); // another worker opens the circuit
        self::assertFalse($a->admit(1.0), 'a call that reached the server just now trusts it');
        $this->now += CircuitBreaker::TRUST_AFTER_SUCCESS;
        $this->rejected($a);
    }

    public function testFileStateIsSharedBetweenBreakersAndRemovedWhenClosed(): void
    {
        $a = $this->breaker($this->store('file'), 2, 5.0);
        $b = $this->breaker($this->store('file'), 2, 5.0); // another Client, web request or worker
        $a->admit(1.0);
        $a->recordFailure(false, 'x');
        $b->admit(1.0);
        $b->recordFailure(false, 'y');
        self::assertSame(CircuitBreaker::OPEN, $a->state());
        $this->rejected($a);
        self::assertNotSame([], glob($this->dir . '/*.json'));
        $this->now += 5.0;
        self::assertTrue($a->admit(1.0));
        $this->rejected($b); // a's probe is under way
        $a->recordSuccess(true);
        self::assertFalse($b->admit(1.0));
        self::assertSame([], array_values(array_diff(scandir($this->dir) ?: [], ['.', '..'])));
    }

    public function testFilesOfAnotherUserAreIgnored(): void
    {
        if (posix_geteuid() !== 0) {
            self::markTestSkipped('needs root to create a file owned by another user');
        }
        $store = new FileBreakerStore($this->dir, 'k', 0);
        $store->save(['failures' => 9, 'open_until' => $this->now + 60.0, 'reason' => 'planted']);
        self::assertNotNull($store->load());
        chown($this->dir . '/k.json', 65534);
        clearstatcache();
        self::assertNull($store->load(), 'a state file planted by another user must not open the breaker');
    }

    public function testGivenStateDirectoryMustBePrivate(): void
    {
        chmod($this->dir, 0755);
        $this->expectException(\InvalidArgumentException::class);
        $this->expectExceptionMessage('mode 0700');
        FileBreakerStore::forSocket('/tmp/x.sock', $this->dir);
    }

    public function testStateIsNotWrittenToADirectoryOthersCanWrite(): void
    {
        chmod($this->dir, 0777);
        $store = new FileBreakerStore($this->dir, 'k', posix_geteuid());
        $store->save(['failures' => 1, 'open_until' => null, 'reason' => 'x']);
        self::assertNull($store->load());
        self::assertSame([], array_values(array_diff(scandir($this->dir) ?: [], ['.', '..'])));
    }

    public function testStateIsNotWrittenThroughASymlinkedDirectory(): void
    {
        // Another user could plant /tmp/tensorbridge-<uid> as a link to a private directory of ours.
        $target = $this->dir . '/target';
        mkdir($target, 0700);
        symlink($target, $this->dir . '/link');
        $store = new FileBreakerStore($this->dir . '/link', 'k', posix_geteuid());
        $store->save(['failures' => 1, 'open_until' => null, 'reason' => 'x']);
        self::assertSame([], array_values(array_diff(scandir($target) ?: [], ['.', '..'])));
        unlink($this->dir . '/link');
        rmdir($target);
    }

    public function testStateFilesAreCreatedPrivate(): void
    {
        $mask = umask(0022);
        $store = new FileBreakerStore($this->dir, 'k', posix_geteuid());
        $store->save(['failures' => 1, 'open_until' => null, 'reason' => 'x']);
        umask($mask);
        $files = array_values(array_diff(scandir($this->dir) ?: [], ['.', '..']));
        self::assertCount(1, $files);
        self::assertSame(0600, fileperms($this->dir . '/' . $files[0]) & 0777);
        $store->clear();
    }

    public function testGivenStateDirectoryIsCreated(): void
    {
        $sub = $this->dir . '/state';
        $store = FileBreakerStore::forSocket('/tmp/x.sock', $sub);
        self::assertInstanceOf(FileBreakerStore::class, $store);
        self::assertSame(0700, fileperms($sub) & 0777);
        rmdir($sub);
    }

    public function testBadSettingsAreRejected(): void
    {
        $this->expectException(\InvalidArgumentException::class);
        new CircuitBreaker(new MemoryBreakerStore('k'), '/x', 3, 0.0);
    }

    private function store(string $kind): BreakerStore
    {
        return $kind === 'memory'
            ? new MemoryBreakerStore('test-' . bin2hex(random_bytes(6)))
            : new FileBreakerStore($this->dir, 'k', posix_geteuid());
    }

    private function breaker(BreakerStore $store, int $threshold, float $coolDown): CircuitBreaker
    {
        return new CircuitBreaker($store, '/tmp/x.sock', $threshold, $coolDown, fn (): float => $this->now);
    }

    private function rejected(CircuitBreaker $b): CircuitOpenException
    {
        try {
            $b->admit(1.0);
        } catch (CircuitOpenException $e) {
            return $e;
        }
        self::fail('expected the breaker to fail fast');
    }
}
