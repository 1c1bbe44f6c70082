<?php

declare(strict_types=1);

namespace TensorBridge\Tests;

use PHPUnit\Framework\TestCase;
use TensorBridge\Client;
use TensorBridge\Exception\ConnectionException;
use TensorBridge\Exception\DeadlineExceededException;
use TensorBridge\Exception\InvalidInputException;
use TensorBridge\Exception\ModelException;
use TensorBridge\Exception\ModelNotFoundException;
use TensorBridge\Exception\OverloadedException;
use TensorBridge\Exception\PayloadTooLargeException;
use TensorBridge\Exception\ProtocolException;
use TensorBridge\Exception\UnauthorizedException;
use TensorBridge\Internal\HttpResponse;
use TensorBridge\Internal\OipCodec;
use TensorBridge\Tensor;
use TensorBridge\Transport\HttpOptions;
use TensorBridge\Transport\HttpTransport;

require_once __DIR__ . '/TempDir.php';

/**
 * The HTTP transport's own parts without a server: settings, the OIP REST encoding with the
 * binary extension, and how answers become exceptions. Calls against real servers (KServe and
 * TensorBridge's REST listener) are in python/tests/test_php_http.py.
 */
final class HttpTransportTest extends TestCase
{
    public function testAUrlMakesAnHttpClient(): void
    {
        $client = new Client('http://127.0.0.1:8000/', breakerThreshold: 0);
        self::assertSame('http://127.0.0.1:8000', $client->socketPath());
    }

    /**
     * @return array<string, array{0: \Closure(): mixed, 1: string}>
     */
    public static function refusedSettings(): array
    {
        return [
            'checksums' => [static fn () => new Client('http://h:1', checksums: true), 'local socket only'],
            'spin' => [static fn () => new Client('https://h:1', spinMicros: 50), 'local socket only'],
            'options on a socket' => [static fn () => new Client('/tmp/x.sock', http: new HttpOptions()), 'URL only'],
            'no host' => [static fn () => new HttpTransport('http:///v2'), 'with a host'],
            'query' => [static fn () => new HttpTransport('http://h:1/?a=b'), 'query'],
            'user' => [static fn () => new HttpTransport('http://me:pw@h:1'), 'user'],
            'token with space' => [static fn () => new HttpOptions(token: 'a b'), 'token'],
            'missing CA file' => [static fn () => new HttpOptions(caFile: '/nonexistent/ca.pem'), 'caFile'],
        ];
    }

    /**
     * @dataProvider refusedSettings
     * @param \Closure(): mixed $make
     */
    public function testSettingsThatCannotWorkAreRefused(\Closure $make, string $message): void
    {
        $this->expectException(\InvalidArgumentException::class);
        $this->expectExceptionMessage($message);
        $make();
    }

    public function testNothingListeningIsAConnectionException(): void
    {
        $server = stream_socket_server('tcp://127.0.0.1:0');
        self::assertNotFalse($server);
        $address = (string) stream_socket_get_name($server, false);
        fclose($server); // the port is now closed: connections are refused
        $dir = TempDir::create('tb-http');
        try {
            $client = new Client('http://' . $address, connectAttempts: 1, breakerStateDir: $dir);
            $this->expectException(ConnectionException::class);
            $this->expectExceptionMessage('cannot connect to http://' . $address);
            $client->infer('echo', ['x' => Tensor::fromArray([1.0])]);
        } finally {
            TempDir::remove($dir);
        }
    }

    public function testARequestIsAJsonHeaderFollowedByEveryTensorsBytes(): void
    {
        $a = Tensor::fromArray([[1.5, -2.0]], 'float32');
        $b = Tensor::fromArray(['hi', ''], 'bytes');
        [$body, $headers] = OipCodec::inferRequest(['a' => $a, 'b' => $b], 250_000, 'user-1');
        self::assertSame('Content-Type: application/octet-stream', $headers[0]);
        self::assertMatchesRegularExpression('/^Inference-Header-Content-Length: (\d+)$/', $headers[1]);
        $length = (int) substr($headers[1], strlen('Inference-Header-Content-Length: '));
        $json = json_decode(substr($body, 0, $length), true, 16, JSON_THROW_ON_ERROR);
        self::assertSame([
            ['name' => 'a', 'shape' => [1, 2], 'datatype' => 'FP32', 'parameters' => ['binary_data_size' => 8]],
            ['name' => 'b', 'shape' => [2], 'datatype' => 'BYTES', 'parameters' => ['binary_data_size' => 10]],
        ], $json['inputs']);
        self::assertSame(['binary_data_output' => true, 'timeout' => 250_000, 'routing_key' => 'user-1'], $json['parameters']);
        self::assertSame(pack('g2', 1.5, -2.0) . pack('V', 2) . 'hi' . pack('V', 0), substr($body, $length));
    }

    public function testABinaryReplyGivesEachOutputItsBytes(): void
    {
        $json = json_encode(['model_name' => 'm', 'model_version' => '3', 'outputs' => [
            ['name' => 'y', 'datatype' => 'INT16', 'shape' => [2], 'parameters' => ['binary_data_size' => 4]],
            ['name' => 's', 'datatype' => 'BYTES', 'shape' => [1], 'parameters' => ['binary_data_size' => 7]],
            ['name' => 'j', 'datatype' => 'BOOL', 'shape' => [2, 1], 'data' => [[true], [false]]],
        ]], JSON_THROW_ON_ERROR);
        $body = $json . pack('v2', 7, 65535) . pack('V', 3) . "\0\xff!";
        $reply = OipCodec::inferReply(new HttpResponse(200, ['inference-header-content-length' => (string) strlen($json)], $body));
        self::assertSame([7, -1], $reply->outputs['y']->toArray());
        self::assertSame(["\0\xff!"], $reply->outputs['s']->toArray());
        self::assertSame([[true], [false]], $reply->outputs['j']->toArray());
        self::assertSame(3, $reply->timing['version']);
    }

    public function testAJsonReplyIsReadWithTheDeclaredShape(): void
    {
        $json = json_encode(['outputs' => [['name' => 'x', 'datatype' => 'FP32', 'shape' => [2, 2], 'data' => [1, 2.5, 3, 4]]]]);
        $reply = OipCodec::inferReply(new HttpResponse(200, [], (string) $json));
        self::assertSame([[1.0, 2.5], [3.0, 4.0]], $reply->outputs['x']->toArray());
    }

    /**
     * @return array<string, array{0: string, 1: array<string, string>}>
     */
    public static function brokenReplies(): array
    {
        $head = '{"outputs":[{"name":"y","datatype":"FP32","shape":[2],"parameters":{"binary_data_size":8}}]}';
        return [
            'cut binary data' => [$head . 'abc', ['inference-header-content-length' => (string) strlen($head)]],
            'bytes left over' => [$head . str_repeat('a', 9), ['inference-header-content-length' => (string) strlen($head)]],
            'header past the body' => [$head, ['inference-header-content-length' => '9999']],
            'unknown datatype' => ['{"outputs":[{"name":"y","datatype":"UINT16","shape":[1],"data":[1]}]}', []],
            'data count' => ['{"outputs":[{"name":"y","datatype":"INT32","shape":[3],"data":[1]}]}', []],
            'no outputs' => ['{"model_name":"m"}', []],
            'not JSON' => ['<html>', []],
        ];
    }

    /**
     * @dataProvider brokenReplies
     * @param array<string, string> $headers
     */
    public function testABrokenReplyIsAProtocolException(string $body, array $headers): void
    {
        $this->expectException(ProtocolException::class);
        OipCodec::inferReply(new HttpResponse(200, $headers, $body));
    }

    /**
     * @return array<string, array{0: int, 1: string, 2: string, 3: class-string}>
     */
    public static function statuses(): array
    {
        return [
            'bad request' => [400, '{"error":"shape [1,2] is wrong"}', 'm', InvalidInputException::class],
            'unknown model' => [404, '{"error":"no model m"}', 'm', ModelNotFoundException::class],
            'unknown path' => [404, '{"detail":"Not Found"}', '', ProtocolException::class],
            'token' => [401, '{"error":"bad token"}', 'm', UnauthorizedException::class],
            'forbidden' => [403, 'nope', 'm', UnauthorizedException::class],
            'too large' => [413, '{"error":"too big"}', 'm', PayloadTooLargeException::class],
            'busy' => [503, '{"error":"queue full"}', 'm', OverloadedException::class],
            'model raised' => [500, '{"error":"ValueError"}', 'm', ModelException::class],
            'deadline' => [504, '{"error":"deadline passed"}', 'm', DeadlineExceededException::class],
        ];
    }

    /**
     * @dataProvider statuses
     * @param class-string $class
     */
    public function testEachStatusBecomesItsTypedException(int $status, string $body, string $model, string $class): void
    {
        $e = OipCodec::error(new HttpResponse($status, [], $body), $model, 'http://h:1', 1.0);
        self::assertInstanceOf($class, $e);
        self::assertStringContainsString(sprintf('(HTTP %d)', $status), $e->getMessage());
        $message = json_decode($body, true)['error'] ?? null;
        if (is_string($message)) {
            self::assertStringContainsString($message, $e->getMessage());
        }
    }
}
