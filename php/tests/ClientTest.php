<?php

declare(strict_types=1);

namespace TensorBridge\Tests;

use PHPUnit\Framework\TestCase;
use TensorBridge\BatchResult;
use TensorBridge\Client;
use TensorBridge\ErrorCode;
use TensorBridge\Exception\CircuitOpenException;
use TensorBridge\Exception\ConnectionException;
use TensorBridge\Exception\DeadlineExceededException;
use TensorBridge\Exception\InternalException;
use TensorBridge\Exception\InvalidInputException;
use TensorBridge\Exception\ModelException;
use TensorBridge\Exception\ModelNotFoundException;
use TensorBridge\Exception\OverloadedException;
use TensorBridge\Exception\PayloadTooLargeException;
use TensorBridge\Exception\ProtocolException;
use TensorBridge\Exception\ServerException;
use TensorBridge\Exception\TensorBridgeException;
use TensorBridge\Exception\TimeoutException;
use TensorBridge\Exception\UnauthorizedException;
use TensorBridge\Tensor;
use TensorBridge\Internal\ErrorMapper;
use TensorBridge\Internal\ErrorReply;

require_once __DIR__ . '/TempDir.php';

/**
 * Client behaviour that needs no server: error mapping, connection failures, input checks.
 */
final class ClientTest extends TestCase
{
    private string $stateDir = '';

    protected function setUp(): void
    {
        $this->stateDir = TempDir::create('tb-client-test');
    }

    protected function tearDown(): void
    {
        TempDir::remove($this->stateDir);
    }

    /**
     * @return iterable<string, array{int, class-string, string}>
     */
    public static function errorProvider(): iterable
    {
        yield 'MODEL_NOT_FOUND' => [1, ModelNotFoundException::class, 'MODEL_NOT_FOUND'];
        yield 'INVALID_INPUT' => [2, InvalidInputException::class, 'INVALID_INPUT'];
        yield 'PAYLOAD_TOO_LARGE' => [3, PayloadTooLargeException::class, 'PAYLOAD_TOO_LARGE'];
        yield 'DEADLINE_EXCEEDED' => [4, DeadlineExceededException::class, 'DEADLINE_EXCEEDED'];
        yield 'OVERLOADED' => [5, OverloadedException::class, 'OVERLOADED'];
        yield 'MODEL_ERROR' => [6, ModelException::class, 'MODEL_ERROR'];
        yield 'PROTOCOL_ERROR' => [7, ProtocolException::class, 'PROTOCOL_ERROR'];
        yield 'UNAUTHORIZED' => [8, UnauthorizedException::class, 'UNAUTHORIZED'];
        yield 'INTERNAL' => [9, InternalException::class, 'INTERNAL'];
    }

    /**
     * @dataProvider errorProvider
     * @param class-string $class
     */
    public function testErrorCodesMapToTheSpecTable(int $code, string $class, string $name): void
    {
        $e = ErrorMapper::toException(new ErrorReply($code, 'details here'), 'digits', 1.5);
        self::assertInstanceOf($class, $e);
        self::assertInstanceOf(TensorBridgeException::class, $e);
        self::assertSame($name, $e->getErrorCode());
        self::assertSame($code, $e->getCode());
        self::assertSame(ErrorCode::from($code), $e->errorCode());
        self::assertStringContainsString('details here', $e->getMessage());
        if ($e instanceof ModelNotFoundException) {
            self::assertSame('digits', $e->getModelName());
        }
        if ($e instanceof TimeoutException) {
            self::assertSame(1.5, $e->getTimeout());
            self::assertTrue($e->isServerDeadline());
            self::assertFalse($e->isClientDeadline());
            self::assertStringContainsString('DEADLINE_EXCEEDED', $e->getMessage());
        }
    }

    public function testTheSpecErrorTableNamesTheExceptionsThrown(): void
    {
        $spec = (string) file_get_contents(__DIR__ . '/../../spec/protocol.md');
        $row = '/^\| (\d+) +\| `(\w+)` +\| `(\w+)Exception`[^|]*\| `(\w+)Error`/m';
        preg_match_all($row, $spec, $rows, PREG_SET_ORDER);
        self::assertCount(count(ErrorCode::cases()), $rows);
        foreach ($rows as [, $code, $name, $php, $python]) {
            $e = ErrorMapper::toException(new ErrorReply((int) $code, 'm'), 'x', 1.0);
            self::assertSame($name, $e->getErrorCode());
            self::assertSame($php . 'Exception', (new \ReflectionClass($e))->getShortName());
            self::assertSame($python, $php, 'Python XError and PHP XException share X');
        }
    }

    public function testOnlyProtocolAndUnauthorizedErrorsCloseTheConnection(): void
    {
        $closing = array_filter(ErrorCode::cases(), static fn (ErrorCode $c): bool => $c->closesConnection());
        self::assertSame([ErrorCode::PROTOCOL_ERROR, ErrorCode::UNAUTHORIZED], array_values($closing));
        self::assertTrue(ErrorMapper::closesConnection(new ErrorReply(8, 'no')));
        self::assertFalse(ErrorMapper::closesConnection(new ErrorReply(42, 'unknown code')));
    }

    public function testAClientSideTimeoutSaysSo(): void
    {
        $e = new TimeoutException('timed out', 0.25);
        self::assertTrue($e->isClientDeadline());
        self::assertFalse($e->isServerDeadline());
        self::assertNull($e->errorCode());
        self::assertSame(0, $e->getCode());
    }

    public function testErrorNamesAndEnumsAreInterchangeable(): void
    {
        $byName = new TensorBridgeException('x', 'OVERLOADED');
        $byEnum = new TensorBridgeException('x', ErrorCode::OVERLOADED);
        self::assertSame('OVERLOADED', $byName->getErrorCode());
        self::assertSame(ErrorCode::OVERLOADED, $byEnum->errorCode());
        self::assertSame(5, $byName->getCode());
        self::assertNull((new TensorBridgeException('x', 'NOT_A_CODE'))->errorCode());
    }

    public function testSubclassRelations(): void
    {
        self::assertInstanceOf(InvalidInputException::class, new PayloadTooLargeException('x'));
        self::assertInstanceOf(ServerException::class, new OverloadedException('x'));
        self::assertInstanceOf(ConnectionException::class, new UnauthorizedException('x'));
        self::assertInstanceOf(\RuntimeException::class, new ProtocolException('x'));
        self::assertInstanceOf(TimeoutException::class, new DeadlineExceededException('x', 1.0));
        self::assertInstanceOf(ServerException::class, new ModelException('x'));
        self::assertInstanceOf(ServerException::class, new InternalException('x'));
    }

    public function testAConnectionRefusedAtAcceptNamesTheServerSettingNotAModel(): void
    {
        $e = ErrorMapper::toException(
            new ErrorReply(ErrorCode::OVERLOADED->value, 'max_connections (20) reached'),
            '',
            1.0,
        );
        self::assertInstanceOf(OverloadedException::class, $e);
        self::assertStringStartsWith('the server refused the connection (OVERLOADED)', $e->getMessage());
        self::assertStringContainsString('max_connections (20) reached', $e->getMessage());
        self::assertStringNotContainsString('model ""', $e->getMessage());
    }

    public function testUnknownErrorCodeIsAServerException(): void
    {
        $e = ErrorMapper::toException(new ErrorReply(42, 'new'), '', 1.0);
        self::assertInstanceOf(ServerException::class, $e);
        self::assertNull($e->getErrorCode());
    }

    /**
     * @return iterable<string, array{bool}>
     */
    public static function persistenceProvider(): iterable
    {
        yield 'persistent' => [true];
        yield 'non-persistent' => [false];
    }

    /**
     * @dataProvider persistenceProvider
     */
    public function testMissingSocketSaysWhatToDo(bool $persistent): void
    {
        $path = sys_get_temp_dir() . '/tensorbridge-test-missing-' . getmypid() . '.sock';
        $client = new Client($path, timeout: 0.5, persistent: $persistent, breakerStateDir: $this->stateDir);
        try {
            $client->ping();
            self::fail('expected a ConnectionException');
        } catch (ConnectionException $e) {
            self::assertStringContainsString("cannot connect to $path", $e->getMessage());
            self::assertStringContainsString("tensorbridge serve --socket $path", $e->getMessage());
            self::assertNull($e->getErrorCode());
        }
    }

    public function testInputsMustBeNamed(): void
    {
        $client = new Client('/nonexistent/tb.sock');
        $this->expectException(InvalidInputException::class);
        $this->expectExceptionMessage('keyed by input name');
        $client->infer('digits', [[1.0, 2.0]]);
    }

    public function testNoInputs(): void
    {
        $this->expectException(InvalidInputException::class);
        (new Client('/nonexistent/tb.sock'))->infer('digits', []);
    }

    public function testInferManyOfNothing(): void
    {
        self::assertSame([], (new Client('/nonexistent/tb.sock'))->inferMany('digits', []));
    }

    public function testSocketPathFromEnvironment(): void
    {
        $old = getenv('TENSORBRIDGE_SOCKET');
        putenv('TENSORBRIDGE_SOCKET=/tmp/from-env.sock');
        try {
            self::assertSame('/tmp/from-env.sock', (new Client())->socketPath());
        } finally {
            putenv($old === false ? 'TENSORBRIDGE_SOCKET' : "TENSORBRIDGE_SOCKET=$old");
        }
        self::assertSame('/x.sock', (new Client('/x.sock'))->socketPath());
    }

    public function testBadTimeoutRejected(): void
    {
        $this->expectException(\InvalidArgumentException::class);
        new Client('/x.sock', timeout: 0.0);
    }

    public function testSetUpIsRetriedWhileTheSocketIsMissing(): void
    {
        $path = $this->stateDir . '/missing.sock';
        $client = new Client($path, connectAttempts: 3, connectBackoff: 0.001, breakerStateDir: $this->stateDir);
        try {
            $client->ping();
            self::fail('expected a ConnectionException');
        } catch (ConnectionException $e) {
            $want = "cannot connect to $path: No such file or directory (3 attempts";
            self::assertStringContainsString($want, $e->getMessage());
        }
    }

    public function testErrorsThatRetryingCannotFixAreNotRetried(): void
    {
        $path = '/etc/hostname/tb.sock'; // ENOTDIR: a configuration error, not a restarting server
        $client = new Client($path, connectAttempts: 5, connectBackoff: 0.001, breakerStateDir: $this->stateDir);
        try {
            $client->ping();
            self::fail('expected a ConnectionException');
        } catch (ConnectionException $e) {
            self::assertStringContainsString("cannot connect to $path: Not a directory.", $e->getMessage());
            self::assertStringNotContainsString('attempts', $e->getMessage());
        }
    }

    public function testBreakerOpensAfterConsecutiveConnectionFailures(): void
    {
        $path = $this->stateDir . '/down.sock';
        $options = ['connectAttempts' => 1, 'breakerThreshold' => 2, 'breakerCoolDown' => 60.0];
        $client = new Client($path, ...$options, breakerStateDir: $this->stateDir);
        for ($i = 0; $i < 2; $i++) {
            try {
                $client->ping();
                self::fail('expected a ConnectionException');
            } catch (ConnectionException $e) {
                self::assertNotInstanceOf(CircuitOpenException::class, $e);
            }
        }
        self::assertSame('open', $client->breakerState());
        // Another Client (as in the next web request) sees the same state and fails fast too.
        $next = new Client($path, ...$options, breakerStateDir: $this->stateDir);
        try {
            $next->infer('digits', ['input' => Tensor::fromArray([1.0])]);
            self::fail('expected a CircuitOpenException');
        } catch (CircuitOpenException $e) {
            self::assertGreaterThan(59.0, $e->getRetryAfter());
            self::assertStringContainsString("circuit open for $path after 2 consecutive", $e->getMessage());
            self::assertStringContainsString('then one call will probe the server', $e->getMessage());
        }
        $results = $next->inferBatch('digits', ['a' => ['input' => [1.0]]]);
        self::assertInstanceOf(CircuitOpenException::class, $results['a']->error());
    }

    public function testLocalInputErrorsDoNotCountAsFailures(): void
    {
        $client = new Client('/nonexistent/tb.sock', breakerThreshold: 1, breakerStateDir: $this->stateDir);
        for ($i = 0; $i < 3; $i++) {
            try {
                $client->infer('digits', [[1.0]]);
            } catch (InvalidInputException) {
            }
        }
        self::assertSame('closed', $client->breakerState());
    }

    public function testBreakerOffNeverFailsFast(): void
    {
        $client = new Client('/nonexistent/tb.sock', connectAttempts: 1, breakerThreshold: 0);
        for ($i = 0; $i < 4; $i++) {
            try {
                $client->ping();
            } catch (ConnectionException $e) {
                self::assertNotInstanceOf(CircuitOpenException::class, $e);
            }
        }
        self::assertSame('closed', $client->breakerState());
    }

    /**
     * @return iterable<string, array{array<string, mixed>}>
     */
    public static function badOptionsProvider(): iterable
    {
        yield 'no attempts' => [['connectAttempts' => 0]];
        yield 'negative backoff' => [['connectBackoff' => -1.0]];
        yield 'negative threshold' => [['breakerThreshold' => -1]];
        yield 'zero cool-down' => [['breakerCoolDown' => 0.0]];
    }

    /**
     * @dataProvider badOptionsProvider
     * @param array<string, mixed> $options
     */
    public function testBadResilienceOptionsRejected(array $options): void
    {
        $this->expectException(\InvalidArgumentException::class);
        new Client('/x.sock', ...$options, breakerStateDir: $this->stateDir);
    }

    public function testBatchReportsEveryItemAndKeepsKeysWhenNothingCouldBeSent(): void
    {
        $client = new Client('/nonexistent/tb.sock', connectAttempts: 1, breakerStateDir: $this->stateDir);
        $results = $client->inferBatch('echo', ['first' => ['x' => [1]], 'bad' => 'not an array', 7 => ['x' => [2]]]);
        self::assertSame(['first', 'bad', 7], array_keys($results));
        self::assertContainsOnlyInstancesOf(BatchResult::class, $results);
        self::assertInstanceOf(ConnectionException::class, $results['first']->error());
        self::assertInstanceOf(ConnectionException::class, $results[7]->error());
        self::assertInstanceOf(InvalidInputException::class, $results['bad']->error());
        self::assertStringContainsString("batch item 'bad' is string", $results['bad']->error()->getMessage());
        self::assertSame([], $client->inferBatch('echo', []));
    }

    public function testClassifyChecksTopKBeforeSending(): void
    {
        $client = new Client('/nonexistent/tb.sock', breakerStateDir: $this->stateDir);
        try {
            $client->classify('resnet18', 'jpeg bytes', topK: 0);
            self::fail('expected an InvalidInputException');
        } catch (InvalidInputException $e) {
            self::assertStringContainsString('topK must be at least 1', $e->getMessage());
        }
        $results = $client->classifyBatch('resnet18', ['a' => 'x', 'b' => 'y'], topK: -1);
        self::assertSame(['a', 'b'], array_keys($results));
        self::assertInstanceOf(InvalidInputException::class, $results['b']->error());
        self::assertNull($client->lastNotice());
    }

    public function testClassifyBatchRejectsNonStringItemsOnly(): void
    {
        $client = new Client('/nonexistent/tb.sock', connectAttempts: 1, breakerStateDir: $this->stateDir);
        $results = $client->classifyBatch('resnet18', ['ok' => 'jpeg', 'bad' => 42]);
        self::assertInstanceOf(ConnectionException::class, $results['ok']->error());
        self::assertInstanceOf(InvalidInputException::class, $results['bad']->error());
        $message = $results['bad']->error()?->getMessage();
        self::assertStringContainsString('pass the encoded image file or the text as a string', (string) $message);
    }
}
