<?php

declare(strict_types=1);

namespace TensorBridge\Tests;

use PHPUnit\Framework\TestCase;
use TensorBridge\Client;
use TensorBridge\ErrorCode;
use TensorBridge\Exception\CircuitOpenException;
use TensorBridge\Exception\ConnectionException;
use TensorBridge\Exception\DeadlineExceededException;
use TensorBridge\Exception\InvalidInputException;
use TensorBridge\Exception\OverloadedException;
use TensorBridge\Internal\ErrorMapper;
use TensorBridge\Internal\ErrorReply;
use TensorBridge\Tensor;
use TensorBridge\Testing\FakeCall;
use TensorBridge\Testing\FakeTransport;

/**
 * What FakeTransport offers an application's tests beyond the shared contract: programming,
 * recording, and errors that behave as the real transport's do.
 */
final class FakeTransportTest extends TestCase
{
    public function testFixedAnswersAndPlainValuesBecomeTensors(): void
    {
        $fake = (new FakeTransport())->answer('digits', ['logits' => [[0.1, 0.9]], 'label' => [1], 'name' => ['one']]);
        $out = (new Client(transport: $fake))->infer('digits', ['input' => Tensor::fromArray([[0.0]], 'float32')]);
        self::assertSame('FP32', $out['logits']->dtype());
        self::assertEqualsWithDelta([[0.1, 0.9]], $out['logits']->toArray(), 1e-6);
        self::assertSame('INT64', $out['label']->dtype());
        self::assertSame(['one'], $out['name']->toArray());
    }

    public function testCallsAreRecordedWithConvertedInputsAndTheTimeout(): void
    {
        $fake = (new FakeTransport())->answer('rows', static fn (array $in): array => ['y' => $in['x']], [
            'inputs' => [['name' => 'x', 'datatype' => 'FP64', 'shape' => [-1]]],
        ]);
        $client = new Client(timeout: 0.75, transport: $fake);
        $client->inferMany('rows', [['x' => [1, 2]], ['x' => [3]]]);
        $calls = $fake->calls();
        self::assertContainsOnlyInstancesOf(FakeCall::class, $calls);
        self::assertSame(['models', 'infer', 'infer'], array_map(static fn (FakeCall $c): string => $c->op, $calls));
        self::assertSame(0.75, $calls[1]->timeout);
        $requests = $fake->requests('rows');
        self::assertCount(2, $requests);
        self::assertSame('FP64', $requests[0]['x']->dtype()); // converted with the declared dtype
        self::assertSame([3.0], $requests[1]['x']->toArray());
        self::assertSame([], $fake->requests('other'));
    }

    public function testServerErrorsAreTheRealTransportsExceptions(): void
    {
        foreach (ErrorCode::cases() as $code) {
            $fake = FakeTransport::serverError($code, 'why', 'm', 0.5);
            $real = ErrorMapper::toException(new ErrorReply($code->value, 'why'), 'm', 0.5);
            self::assertSame(get_class($real), get_class($fake));
            self::assertSame($real->getMessage(), $fake->getMessage());
            self::assertSame($code, $fake->errorCode());
        }
    }

    public function testFailNextFailsOneCallThenAnswersResume(): void
    {
        $fake = (new FakeTransport())
            ->answer('m', ['y' => [1]])
            ->failNext(FakeTransport::serverError(ErrorCode::OVERLOADED, 'queue full', 'm'));
        $client = new Client(transport: $fake);
        try {
            $client->infer('m', ['x' => Tensor::fromArray([1], 'int64')]);
            self::fail('expected an OverloadedException');
        } catch (OverloadedException $e) {
            self::assertStringContainsString('queue full', $e->getMessage());
        }
        self::assertSame([1], $client->infer('m', ['x' => Tensor::fromArray([1], 'int64')])['y']->toArray());
    }

    public function testALostConnectionMidBatchFailsTheRestOfTheBatch(): void
    {
        $calls = 0;
        $fake = (new FakeTransport())->answer('m', static function (array $in) use (&$calls): array {
            if (++$calls === 2) {
                throw new ConnectionException('the server closed the connection');
            }
            return ['y' => $in['x']];
        });
        $results = (new Client(transport: $fake))->inferBatch('m', [
            'a' => ['x' => Tensor::fromArray([1], 'int64')],
            'b' => ['x' => Tensor::fromArray([2], 'int64')],
            'c' => ['x' => Tensor::fromArray([3], 'int64')],
        ]);
        self::assertSame([1], $results['a']->value()['y']->toArray());
        self::assertInstanceOf(ConnectionException::class, $results['b']->error());
        self::assertInstanceOf(ConnectionException::class, $results['c']->error());
        self::assertSame(2, $calls); // c was never sent
    }

    public function testItemErrorsStayWithTheirItems(): void
    {
        $fake = (new FakeTransport())->answer('m', static function (array $in): array {
            if ($in['x']->toArray() === [-1]) {
                throw FakeTransport::serverError(ErrorCode::INVALID_INPUT, 'x must be >= 0', 'm');
            }
            return ['y' => $in['x']];
        });
        $results = (new Client(transport: $fake))->inferBatch('m', [['x' => [5]], ['x' => [-1]], ['x' => [7]]]);
        self::assertSame([5], $results[0]->value()['y']->toArray());
        self::assertInstanceOf(InvalidInputException::class, $results[1]->error());
        self::assertSame([7], $results[2]->value()['y']->toArray());
    }

    public function testRepeatedConnectionFailuresOpenThisClientsCircuit(): void
    {
        $fake = new FakeTransport('fake://down');
        for ($i = 0; $i < 2; $i++) {
            $fake->failNext(new ConnectionException('cannot connect to fake://down'));
        }
        $client = new Client(breakerThreshold: 2, transport: $fake);
        for ($i = 0; $i < 2; $i++) {
            try {
                $client->ping();
                self::fail('expected a ConnectionException');
            } catch (ConnectionException $e) {
                self::assertNotInstanceOf(CircuitOpenException::class, $e);
            }
        }
        self::assertSame('open', $client->breakerState());
        $this->expectException(CircuitOpenException::class);
        $client->ping();
    }

    public function testAFreshClientOnAFakeStartsWithAClosedCircuit(): void
    {
        $fake = (new FakeTransport('fake://down'))->failNext(new ConnectionException('down'));
        $first = new Client(breakerThreshold: 1, transport: $fake);
        try {
            $first->ping();
        } catch (ConnectionException) {
        }
        self::assertSame('open', $first->breakerState());
        self::assertSame('closed', (new Client(breakerThreshold: 1, transport: $fake))->breakerState());
    }

    public function testUnknownModelListsTheLoadedOnes(): void
    {
        $fake = (new FakeTransport())->answer('a', ['y' => [1]])->answer('b', ['y' => [2]]);
        $result = (new Client(transport: $fake))->inferBatch('c', [['x' => [1]]]);
        $message = $result[0]->error()?->getMessage() ?? '';
        self::assertStringContainsString("model 'c' is not loaded; loaded models: ['a', 'b']", $message);
    }

    public function testDeadlineExceededCanBeProgrammed(): void
    {
        $late = FakeTransport::serverError(ErrorCode::DEADLINE_EXCEEDED, 'late', 'slow');
        $fake = (new FakeTransport())->fail('slow', $late);
        try {
            (new Client(transport: $fake))->infer('slow', ['x' => [1]]);
            self::fail('expected a DeadlineExceededException');
        } catch (DeadlineExceededException $e) {
            self::assertTrue($e->isServerDeadline());
        }
    }
}
