<?php

declare(strict_types=1);

namespace TensorBridge\Tests;

use PHPUnit\Framework\TestCase;
use TensorBridge\Client;
use TensorBridge\DType;
use TensorBridge\Exception\ConnectionException;
use TensorBridge\Exception\InvalidInputException;
use TensorBridge\Exception\ProtocolException;
use TensorBridge\Exception\TimeoutException;
use TensorBridge\Internal\AttachOk;
use TensorBridge\Internal\ErrorReply;
use TensorBridge\Internal\FrameType;
use TensorBridge\Internal\InferRequest;
use TensorBridge\Internal\InferResponse;
use TensorBridge\Internal\Spec;
use TensorBridge\Internal\TensorDescriptor;
use TensorBridge\Internal\Wire;
use TensorBridge\Tensor;

require_once __DIR__ . '/TempDir.php';

/**
 * Drives the real Connection/Region/Client code against a scripted fake server in a forked process
 * (the region is a temporary file passed with SCM_RIGHTS, as the real server passes its memfd).
 *
 * @requires extension pcntl
 * @requires extension posix
 */
final class TransportTest extends TestCase
{
    private string $path = '';
    private int $pid = 0;
    private string $stateDir = '';

    protected function setUp(): void
    {
        $this->stateDir = TempDir::create('tb-breaker');
    }

    protected function tearDown(): void
    {
        TempDir::remove($this->stateDir);
        if ($this->pid > 0) {
            posix_kill($this->pid, SIGKILL);
            pcntl_waitpid($this->pid, $status);
        }
        if ($this->path !== '' && file_exists($this->path)) {
            unlink($this->path);
        }
    }

    public function testEchoThroughTheRegionAndInline(): void
    {
        $this->serve(['echo']);
        $client = new Client($this->path, timeout: 2.0, persistent: false, breakerStateDir: $this->stateDir);
        $out = $client->infer('echo', ['a' => Tensor::fromArray([[1.5, -2.0]], 'float32'), 'b' => ['x', 'yz']]);
        self::assertSame([[1.5, -2.0]], $out['a']->toArray());
        self::assertSame(['x', 'yz'], $out['b']->toArray());
        $many = $client->inferMany('echo', [['v' => [1, 2]], ['v' => [3]]]);
        self::assertSame([1, 2], $many[0]['v']->toArray());
        self::assertSame([3], $many[1]['v']->toArray());
        $client->close();
    }

    public function testStaleRepliesBeforeAttachOkAreDropped(): void
    {
        $this->serve(['stale', 'echo']);
        $client = new Client($this->path, timeout: 2.0, persistent: false, breakerStateDir: $this->stateDir);
        self::assertSame([7], $client->infer('echo', ['v' => [7]])['v']->toArray());
    }

    public function testChecksummedConnection(): void
    {
        $this->serve(['echo']);
        $client = new Client($this->path, timeout: 2.0, persistent: false, checksums: true, breakerStateDir: $this->stateDir);
        self::assertSame([true, false], $client->infer('echo', ['v' => [true, false]])['v']->toArray());
    }

    public function testTimeoutKeepsTheConnectionAndDropsTheLateReply(): void
    {
        $this->serve(['slow']);
        $client = new Client($this->path, timeout: 0.2, persistent: false, breakerStateDir: $this->stateDir);
        try {
            $client->infer('echo', ['v' => [1]]);
            self::fail('expected a timeout');
        } catch (TimeoutException $e) {
            self::assertSame(0.2, $e->getTimeout());
            self::assertTrue($e->isClientDeadline());
            self::assertStringContainsString("the client's own deadline", $e->getMessage());
        }
        usleep(400000); // the fake server answers the first request after 0.3 s
        self::assertSame([2], $client->infer('echo', ['v' => [2]])['v']->toArray());
    }

    public function testServerErrorKeepsTheConnection(): void
    {
        $this->serve(['error', 'echo']);
        $client = new Client($this->path, timeout: 2.0, persistent: false, breakerStateDir: $this->stateDir);
        try {
            $client->infer('nope', ['v' => [1]]);
            self::fail('expected ModelNotFoundException');
        } catch (\TensorBridge\Exception\ModelNotFoundException $e) {
            self::assertSame('nope', $e->getModelName());
        }
        self::assertSame([3], $client->infer('echo', ['v' => [3]])['v']->toArray());
    }

    public function testGarbageIsAProtocolError(): void
    {
        $this->serve(['garbage']);
        $client = new Client($this->path, timeout: 2.0, persistent: false, breakerStateDir: $this->stateDir);
        $this->expectException(ProtocolException::class);
        $client->infer('echo', ['v' => [1]]);
    }

    public function testServerDeathIsAConnectionError(): void
    {
        $this->serve(['die']);
        $client = new Client($this->path, timeout: 2.0, persistent: false, breakerStateDir: $this->stateDir);
        $this->expectException(ConnectionException::class);
        $this->expectExceptionMessage('closed the connection');
        $client->infer('echo', ['v' => [1]]);
    }

    public function testBatchItemErrorsStayWithTheirItems(): void
    {
        $this->serve(['reject_negative']);
        $client = new Client($this->path, timeout: 2.0, persistent: false, breakerStateDir: $this->stateDir);
        $results = $client->inferBatch('echo', ['a' => ['v' => [1]], 'b' => ['v' => [-2]], 'c' => ['v' => [3, 4]]]);
        self::assertSame(['a', 'b', 'c'], array_keys($results));
        self::assertSame([1], $results['a']->value()['v']->toArray());
        self::assertInstanceOf(InvalidInputException::class, $results['b']->error());
        self::assertStringContainsString('must be >= 0', $results['b']->error()->getMessage());
        self::assertSame([3, 4], $results['c']->value()['v']->toArray());
        // the connection carries on after an item's error
        self::assertSame([5], $client->infer('echo', ['v' => [5]])['v']->toArray());
    }

    public function testServerDeathMidBatchFailsTheUnansweredItemsOnly(): void
    {
        $this->serve(['die_second']);
        $client = new Client($this->path, timeout: 2.0, persistent: false, breakerStateDir: $this->stateDir);
        $results = $client->inferBatch('echo', [['v' => [1]], ['v' => [2]], ['v' => [3]]]);
        self::assertSame([1], $results[0]->value()['v']->toArray());
        foreach ([1, 2] as $i) {
            $e = $results[$i]->error();
            self::assertInstanceOf(ConnectionException::class, $e);
            self::assertStringContainsString("batch item $i was sent but not answered", $e->getMessage());
            self::assertStringContainsString('not re-sent', $e->getMessage());
        }
    }

    /**
     * Forks a fake server that runs the given steps for one connection.
     *
     * @param list<string> $steps
     */
    private function serve(array $steps): void
    {
        $this->path = sys_get_temp_dir() . '/tb-fake-' . getmypid() . '-' . bin2hex(random_bytes(4)) . '.sock';
        $listener = socket_create(AF_UNIX, SOCK_STREAM, 0);
        self::assertNotFalse($listener);
        self::assertTrue(socket_bind($listener, $this->path));
        self::assertTrue(socket_listen($listener, 4));
        $pid = pcntl_fork();
        self::assertNotSame(-1, $pid);
        if ($pid === 0) {
            try {
                $conn = socket_accept($listener);
                if ($conn !== false) {
                    self::runFake($conn, $steps);
                }
            } finally {
                posix_kill(posix_getpid(), SIGKILL); // leave without running PHPUnit's shutdown code
            }
        }
        socket_close($listener);
        $this->pid = $pid;
    }

    /**
     * @param list<string> $steps
     */
    private static function runFake(\Socket $conn, array $steps): void
    {
        $file = tmpfile();
        ftruncate($file, 1 << 20);
        stream_set_read_buffer($file, 0);
        stream_set_write_buffer($file, 0);
        $crc = false;
        $pending = [];
        $first = true;
        $inferCount = 0;
        while (true) {
            $raw = self::recvExact($conn, 24);
            if ($raw === null) {
                return;
            }
            $h = Wire::decodeHeader($raw);
            $body = $h->bodyLen > 0 ? (string) self::recvExact($conn, $h->bodyLen) : '';
            $msg = Wire::decodeBody($h, $body);
            if ($first && in_array('stale', $steps, true)) {
                // late replies meant for an earlier user of the connection, one with a descriptor
                $late = new InferResponse(0, 0, []);
                self::send($conn, FrameType::INFER_OK, $h->requestId - 5, Wire::encodeBody(FrameType::INFER_OK, $late), false);
                self::send($conn, FrameType::ATTACH_OK, $h->requestId - 4, self::attachOk(), false);
                self::sendFd($conn, $file);
            }
            $first = false;
            if ($h->type === FrameType::MODELS) {
                self::send($conn, FrameType::MODELS_OK, $h->requestId, '{"models":[]}', $crc);
                continue;
            }
            if ($h->type === FrameType::ATTACH) {
                $crc = ($msg->options & Spec::OPT_CRC) !== 0;
                self::send($conn, FrameType::ATTACH_OK, $h->requestId, self::attachOk(), $crc);
                self::sendFd($conn, $file);
                continue;
            }
            if ($h->type !== FrameType::INFER || !$msg instanceof InferRequest) {
                return;
            }
            $inferCount++;
            if (in_array('die', $steps, true) || (in_array('die_second', $steps, true) && $inferCount === 2)) {
                return;
            }
            if (in_array('reject_negative', $steps, true)) {
                fseek($file, $msg->inputs[0]->offset);
                if (unpack('q', (string) fread($file, 8))[1] < 0) {
                    $err = new ErrorReply(2, 'input "v" must be >= 0');
                    self::send($conn, FrameType::ERROR, $h->requestId, Wire::encodeBody(FrameType::ERROR, $err), $crc);
                    continue;
                }
            }
            if (in_array('garbage', $steps, true)) {
                socket_send($conn, str_repeat('x', 24), 24, 0);
                usleep(200000);
                return;
            }
            if (in_array('error', $steps, true) && $msg->model === 'nope') {
                $err = new ErrorReply(1, "model 'nope' is not loaded");
                self::send($conn, FrameType::ERROR, $h->requestId, Wire::encodeBody(FrameType::ERROR, $err), $crc);
                continue;
            }
            if (in_array('slow', $steps, true) && $pending === []) {
                $pending[] = $h->requestId;
                usleep(300000);
            }
            $cursor = $msg->outOffset;
            $outputs = [];
            $inline = '';
            foreach ($msg->inputs as $i => $d) {
                fseek($file, $d->offset);
                $bytes = $d->nbytes > 0 ? (string) fread($file, $d->nbytes) : '';
                if ($i === 0) {
                    fseek($file, $cursor);
                    fwrite($file, $bytes);
                    $sum = $crc ? Wire::crc32c($bytes) : 0;
                    $outputs[] = new TensorDescriptor($d->name, $d->dtype, $d->shape, 0, $cursor, $d->nbytes, $sum);
                    $cursor += ($d->nbytes + 63) & ~63;
                } else { // later outputs come back inline, to exercise that path too
                    $sum = $crc ? Wire::crc32c($bytes) : 0;
                    $outputs[] = new TensorDescriptor($d->name, $d->dtype, $d->shape, 1, strlen($inline), $d->nbytes, $sum);
                    $inline .= $bytes;
                }
            }
            $reply = new InferResponse(1, 2, $outputs, $inline);
            self::send($conn, FrameType::INFER_OK, $h->requestId, Wire::encodeBody(FrameType::INFER_OK, $reply), $crc);
        }
    }

    /**
     * @param resource $file
     */
    private static function sendFd(\Socket $conn, mixed $file): void
    {
        $control = [['level' => SOL_SOCKET, 'type' => SCM_RIGHTS, 'data' => [$file]]];
        socket_sendmsg($conn, ['iov' => [chr(Spec::FD_CARRIER)], 'control' => $control], 0);
    }

    private static function attachOk(): string
    {
        return Wire::encodeBody(FrameType::ATTACH_OK, new AttachOk(1 << 20, 1 << 30, Spec::MAX_BODY));
    }

    private static function send(\Socket $conn, int $type, int $id, string $body, bool $crc): void
    {
        $frame = Wire::encodeFrame($type, $id, $body, $crc);
        socket_send($conn, $frame, strlen($frame), 0);
    }

    private static function recvExact(\Socket $conn, int $len): ?string
    {
        $buf = '';
        while (strlen($buf) < $len) {
            $chunk = '';
            $n = socket_recv($conn, $chunk, $len - strlen($buf), 0);
            if ($n === false || $n === 0) {
                return null;
            }
            $buf .= $chunk;
        }
        return $buf;
    }

    /**
     * Keeps the DType import meaningful for static analysis of the descriptors above.
     */
    public function testDescriptorTypesAreEnums(): void
    {
        self::assertSame(DType::INT64, (new TensorDescriptor('v', DType::INT64, [1], 0, 0, 8))->dtype);
    }
}
