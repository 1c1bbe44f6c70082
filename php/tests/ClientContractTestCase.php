<?php

declare(strict_types=1);

namespace TensorBridge\Tests;

use PHPUnit\Framework\TestCase;
use TensorBridge\BatchResult;
use TensorBridge\Client;
use TensorBridge\ErrorCode;
use TensorBridge\Exception\InvalidInputException;
use TensorBridge\Exception\ModelException;
use TensorBridge\Exception\ModelNotFoundException;
use TensorBridge\Exception\ServerException;
use TensorBridge\Tensor;

/**
 * What a Client does the same whatever its transport: each concrete subclass runs these cases
 * against one transport, serving the models `echo` (returns its inputs) and `fail` (always raises),
 * as `tensorbridge.models.testing` defines them.
 */
abstract class ClientContractTestCase extends TestCase
{
    /**
     * A Client whose transport serves `echo` and `fail`.
     */
    abstract protected function client(): Client;

    /**
     * Clients for each way this transport can wait for replies (see Client's spinMicros), by label.
     *
     * @return array<string, Client>
     */
    protected function clientsForEachWait(): array
    {
        return ['default' => $this->client()];
    }

    public function testCallsInARowEachGetTheirOwnAnswer(): void
    {
        foreach ($this->clientsForEachWait() as $label => $client) {
            for ($i = 0; $i < 150; $i++) {
                // now and then a larger tensor: a slower reply (auto spin then sleeps instead)
                $row = $i % 25 === 0 ? array_fill(0, 50000, $i + 0.5) : [$i + 0.5, -$i - 0.25];
                $out = $client->infer('echo', ['x' => Tensor::fromArray($row, 'float32'), 'n' => [$i]]);
                self::assertSame([$i], $out['n']->toArray(), "$label, call $i");
                self::assertSame($row, $out['x']->toArray(), "$label, call $i");
            }
        }
    }

    public function testEchoReturnsTensorsUnchanged(): void
    {
        $out = $this->client()->infer('echo', [
            'a' => Tensor::fromArray([[1.5, -2.0]], 'float32'),
            'b' => Tensor::fromArray(['x', 'yz'], 'bytes'),
        ]);
        self::assertSame(['a', 'b'], array_keys($out));
        self::assertSame('FP32', $out['a']->dtype());
        self::assertSame([1, 2], $out['a']->shape());
        self::assertSame([[1.5, -2.0]], $out['a']->toArray());
        self::assertSame(['x', 'yz'], $out['b']->toArray());
    }

    public function testPlainArraysGetAGuessedDtypeWhereTheSignatureSaysAny(): void
    {
        $out = $this->client()->infer('echo', ['i' => [[1, 2], [3, 4]], 'f' => [0.5], 'flag' => [true, false]]);
        self::assertSame('INT64', $out['i']->dtype());
        self::assertSame([[1, 2], [3, 4]], $out['i']->toArray());
        self::assertSame('FP32', $out['f']->dtype());
        self::assertSame('BOOL', $out['flag']->dtype());
    }

    public function testUnknownModelIsModelNotFound(): void
    {
        try {
            $this->client()->infer('no-such-model', ['x' => [1]]);
            self::fail('expected a ModelNotFoundException');
        } catch (ModelNotFoundException $e) {
            self::assertSame('no-such-model', $e->getModelName());
            self::assertSame(ErrorCode::MODEL_NOT_FOUND, $e->errorCode());
            self::assertSame(ErrorCode::MODEL_NOT_FOUND->value, $e->getCode());
            self::assertStringContainsString('model "no-such-model" is not loaded on the server', $e->getMessage());
        }
    }

    public function testModelFailureIsAModelException(): void
    {
        try {
            $this->client()->infer('fail', ['x' => [1.0]]);
            self::fail('expected a ModelException');
        } catch (ModelException $e) {
            self::assertInstanceOf(ServerException::class, $e);
            self::assertSame('MODEL_ERROR', $e->getErrorCode());
            self::assertStringContainsString('model "fail" raised', $e->getMessage());
        }
    }

    public function testInferManyKeepsTheOrder(): void
    {
        $many = $this->client()->inferMany('echo', [['v' => [1]], ['v' => [2, 3]], ['v' => [4, 5, 6]]]);
        self::assertSame([[1], [2, 3], [4, 5, 6]], array_map(static fn (array $o): array => $o['v']->toArray(), $many));
    }

    public function testInferManyThrowsTheServersError(): void
    {
        $this->expectException(ModelException::class);
        $this->client()->inferMany('fail', [['v' => [1.0]], ['v' => [2.0]]]);
    }

    public function testBatchGivesEveryItemItsOwnOutcomeUnderItsKey(): void
    {
        $client = $this->client();
        $results = $client->inferBatch('echo', ['first' => ['v' => [1]], 'bad' => 'not inputs', 7 => ['v' => [2]]]);
        self::assertSame(['first', 'bad', 7], array_keys($results));
        self::assertContainsOnlyInstancesOf(BatchResult::class, $results);
        self::assertSame([1], $results['first']->value()['v']->toArray());
        self::assertSame([2], $results[7]->value()['v']->toArray());
        self::assertInstanceOf(InvalidInputException::class, $results['bad']->error());
        $failed = $client->inferBatch('fail', ['a' => ['v' => [1.0]]]);
        self::assertInstanceOf(ModelException::class, $failed['a']->error());
        self::assertSame('closed', $client->breakerState());
    }

    public function testModelsListsTheLoadedModelsWithSignatures(): void
    {
        $models = $this->client()->models();
        $names = array_column($models, 'name');
        self::assertContains('echo', $names);
        self::assertContains('fail', $names);
        foreach ($models as $model) {
            // a list of {name, datatype, shape}, or null for a model that takes any inputs (spec §4.1)
            self::assertTrue($model['inputs'] === null || array_is_list($model['inputs']));
            self::assertTrue($model['outputs'] === null || array_is_list($model['outputs']));
        }
    }

    public function testAPinnedVersionThatDoesNotExistIsModelNotFound(): void
    {
        $client = $this->client();
        self::assertSame([1], $client->infer('echo', ['v' => [1]], version: 1)['v']->toArray());
        self::assertSame(1, $client->lastTiming()['version'] ?? null);
        $this->expectException(ModelNotFoundException::class);
        $client->infer('echo', ['v' => [1]], version: 9);
    }

    public function testARoutingKeyReachesTheModel(): void
    {
        $client = $this->client();
        self::assertSame([5], $client->infer('echo', ['v' => [5]], routingKey: 'user-42')['v']->toArray());
        $this->expectException(InvalidInputException::class);
        $client->infer('echo', ['v' => [5]], routingKey: '');
    }

    public function testPingAnswersProtocolOne(): void
    {
        $pong = $this->client()->ping();
        self::assertSame('tensorbridge', $pong['server']);
        self::assertSame(1, $pong['protocol']);
    }

    public function testLastTimingDescribesTheLastInference(): void
    {
        $client = $this->client();
        self::assertNull($client->lastTiming());
        $client->infer('echo', ['v' => Tensor::fromArray([[1.0], [2.0]], 'float32')]);
        $timing = $client->lastTiming();
        self::assertNotNull($timing);
        self::assertSame(['queue_us', 'compute_us', 'preprocess_us', 'batch_size', 'version'], array_keys($timing));
        self::assertContainsOnly('int', $timing);
        self::assertSame(1, $timing['version']); // a model given without a repository has version 1
    }
}
