<?php

declare(strict_types=1);

namespace TensorBridge\Tests;

use PHPUnit\Framework\TestCase;
use TensorBridge\Client;
use TensorBridge\Exception\ConnectionException;
use TensorBridge\Exception\InvalidInputException;
use TensorBridge\Exception\ModelNotFoundException;
use TensorBridge\Exception\OverloadedException;
use TensorBridge\Exception\PayloadTooLargeException;
use TensorBridge\Exception\ProtocolException;
use TensorBridge\Exception\ServerException;
use TensorBridge\Exception\TensorBridgeException;
use TensorBridge\Exception\TimeoutException;
use TensorBridge\Exception\UnauthorizedException;
use TensorBridge\Internal\ErrorMapper;
use TensorBridge\Internal\ErrorReply;

/**
 * Client behaviour that needs no server: error mapping, connection failures, input checks.
 */
final class ClientTest extends TestCase
{
    /**
     * @return iterable<string, array{int, class-string, string}>
     */
    public static function errorProvider(): iterable
    {
        yield 'MODEL_NOT_FOUND' => [1, ModelNotFoundException::class, 'MODEL_NOT_FOUND'];
        yield 'INVALID_INPUT' => [2, InvalidInputException::class, 'INVALID_INPUT'];
        yield 'PAYLOAD_TOO_LARGE' => [3, PayloadTooLargeException::class, 'PAYLOAD_TOO_LARGE'];
        yield 'DEADLINE_EXCEEDED' => [4, TimeoutException::class, 'DEADLINE_EXCEEDED'];
        yield 'OVERLOADED' => [5, OverloadedException::class, 'OVERLOADED'];
        yield 'MODEL_ERROR' => [6, ServerException::class, 'MODEL_ERROR'];
        yield 'PROTOCOL_ERROR' => [7, ProtocolException::class, 'PROTOCOL_ERROR'];
        yield 'UNAUTHORIZED' => [8, UnauthorizedException::class, 'UNAUTHORIZED'];
        yield 'INTERNAL' => [9, ServerException::class, 'INTERNAL'];
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
        self::assertStringContainsString('details here', $e->getMessage());
        if ($e instanceof ModelNotFoundException) {
            self::assertSame('digits', $e->getModelName());
        }
        if ($e instanceof TimeoutException) {
            self::assertSame(1.5, $e->getTimeout());
        }
    }

    public function testSubclassRelations(): void
    {
        self::assertInstanceOf(InvalidInputException::class, new PayloadTooLargeException('x'));
        self::assertInstanceOf(ServerException::class, new OverloadedException('x'));
        self::assertInstanceOf(ConnectionException::class, new UnauthorizedException('x'));
        self::assertInstanceOf(\RuntimeException::class, new ProtocolException('x'));
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
        $client = new Client($path, timeout: 0.5, persistent: $persistent);
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
}
