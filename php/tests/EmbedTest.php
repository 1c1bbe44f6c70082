<?php

declare(strict_types=1);

namespace TensorBridge\Tests;

use PHPUnit\Framework\TestCase;
use TensorBridge\Client;
use TensorBridge\ErrorCode;
use TensorBridge\Exception\InvalidInputException;
use TensorBridge\Exception\ProtocolException;
use TensorBridge\Tensor;
use TensorBridge\Testing\FakeTransport;

/**
 * embed()/embedBatch() over a FakeTransport that answers as the server's text pipeline does:
 * "text" BYTES [n] in; "embedding" FP32 [n, d], "norm" FP32 [n], "truncated" BOOL [n] out.
 */
final class EmbedTest extends TestCase
{
    private const SIGNATURE = [
        'inputs' => [['name' => 'text', 'datatype' => 'BYTES', 'shape' => [-1]]],
        'outputs' => [
            ['name' => 'embedding', 'datatype' => 'FP32', 'shape' => [-1, 2]],
            ['name' => 'norm', 'datatype' => 'FP32', 'shape' => [-1]],
            ['name' => 'truncated', 'datatype' => 'BOOL', 'shape' => [-1]],
        ],
    ];

    /**
     * A fake embedding model: text "ab..." of length L becomes the raw vector [3L, 4L] (norm 5L),
     * sent unit length when $serverNormalises; texts longer than 8 bytes are "truncated".
     */
    private static function fake(bool $serverNormalises): FakeTransport
    {
        $model = static function (array $inputs) use ($serverNormalises): array {
            $rows = $norms = $cut = [];
            foreach ($inputs['text']->toArray() as $text) {
                $len = max(strlen($text), 1);
                $norms[] = 5.0 * $len;
                $rows[] = $serverNormalises ? [0.6, 0.8] : [3.0 * $len, 4.0 * $len];
                $cut[] = strlen($text) > 8;
            }
            return [
                'embedding' => Tensor::fromArray($rows, 'float32'),
                'norm' => Tensor::fromArray($norms, 'float32'),
                'truncated' => Tensor::fromArray($cut, 'bool'),
            ];
        };
        return (new FakeTransport())->answer('minilm', $model, self::SIGNATURE);
    }

    /**
     * @return iterable<string, array{bool}>
     */
    public static function serverModes(): iterable
    {
        yield 'server normalises' => [true];
        yield 'server sends raw vectors' => [false];
    }

    /**
     * @dataProvider serverModes
     */
    public function testNormalizedOrRawWhateverTheServerSends(bool $serverNormalises): void
    {
        $client = new Client(transport: self::fake($serverNormalises));
        $unit = $client->embed('minilm', ['a', 'bb']);
        self::assertEqualsWithDelta([[0.6, 0.8], [0.6, 0.8]], $unit, 1e-6);
        $raw = $client->embed('minilm', ['a', 'bb'], normalize: false);
        self::assertEqualsWithDelta([[3.0, 4.0], [6.0, 8.0]], $raw, 1e-5);
    }

    public function testKeysOrderAndTruncationFlags(): void
    {
        $fake = self::fake(true);
        $client = new Client(transport: $fake);
        $vectors = $client->embed('minilm', ['title' => 'short', 'body' => 'a much longer text']);
        self::assertSame(['title', 'body'], array_keys($vectors));
        self::assertSame(['title' => false, 'body' => true], $client->lastTruncated());
        $sent = $fake->requests('minilm')[0]['text'];
        self::assertSame('BYTES', $sent->dtype());
        self::assertSame(['short', 'a much longer text'], $sent->toArray()); // one request, in order
    }

    public function testBadTextsAreRefusedBeforeSending(): void
    {
        $fake = self::fake(true);
        $client = new Client(transport: $fake);
        foreach ([[], ['ok', 42]] as $texts) {
            try {
                $client->embed('minilm', $texts);
                self::fail('expected an InvalidInputException');
            } catch (InvalidInputException $e) {
                self::assertNull($e->errorCode());
            }
        }
        self::assertSame([], $fake->calls());
    }

    public function testAModelThatIsNoEmbedderIsNamed(): void
    {
        $fake = (new FakeTransport())->answer('digits', ['logits' => [[0.1, 0.2]]]);
        $this->expectException(ProtocolException::class);
        $this->expectExceptionMessage('model "digits" is not a text-embedding model');
        (new Client(transport: $fake))->embed('digits', ['x']);
    }

    public function testBatchGivesEachTextItsOwnResult(): void
    {
        $fake = (new FakeTransport())->answer('minilm', static function (array $inputs): array {
            $text = $inputs['text']->toArray()[0];
            if ($text === "\xff") {
                throw FakeTransport::serverError(ErrorCode::INVALID_INPUT, 'text 0 is not valid UTF-8', 'minilm');
            }
            return [
                'embedding' => Tensor::fromArray([[3.0, 4.0]], 'float32'),
                'norm' => Tensor::fromArray([5.0], 'float32'),
                'truncated' => Tensor::fromArray([strlen($text) > 8], 'bool'),
            ];
        }, self::SIGNATURE);
        $client = new Client(transport: $fake);
        $texts = ['a' => 'fine', 'b' => "\xff", 'c' => 123, 'd' => 'long enough text'];
        $results = $client->embedBatch('minilm', $texts);
        self::assertSame(['a', 'b', 'c', 'd'], array_keys($results));
        self::assertEqualsWithDelta([0.6, 0.8], $results['a']->value(), 1e-6);
        self::assertInstanceOf(InvalidInputException::class, $results['b']->error());
        self::assertSame(ErrorCode::INVALID_INPUT, $results['b']->error()?->errorCode());
        self::assertStringContainsString("text 'c' is int", $results['c']->error()?->getMessage() ?? '');
        self::assertSame(['a' => false, 'd' => true], $client->lastTruncated());
        self::assertCount(3, $fake->requests('minilm')); // one request per string text
    }

    public function testVersionAndRoutingKeyTravelWithTheRequest(): void
    {
        $fake = self::fake(true);
        $client = new Client(transport: $fake);
        $client->embed('minilm', ['x'], version: 1, routingKey: 'user-42');
        $call = $fake->calls()[0];
        self::assertSame([1, 'user-42'], [$call->version, $call->routingKey]);
        self::assertSame(1, $client->lastTiming()['version'] ?? null);
    }

    public function testClassifyLearnsATextModelsInputNameOnce(): void
    {
        $topic = static function (array $inputs): array {
            if (!isset($inputs['text'])) {
                throw FakeTransport::serverError(ErrorCode::INVALID_INPUT, 'missing input "text"', 'topic');
            }
            return [
                'scores' => Tensor::fromArray([[0.9, 0.1]], 'float32'),
                'indices' => Tensor::fromArray([[0, 1]], 'int64'),
                'labels' => Tensor::fromArray(['sports', 'food'], 'bytes'),
                'truncated' => Tensor::fromArray([false], 'bool'),
            ];
        };
        $fake = (new FakeTransport())->answer('topic', $topic, [
            'inputs' => [['name' => 'text', 'datatype' => 'BYTES', 'shape' => [-1]]],
        ]);
        $client = new Client(transport: $fake);
        $top = $client->classify('topic', 'the match ended 2-1', topK: 2);
        self::assertSame(['sports', 'food'], array_column($top, 'label'));
        $client->classify('topic', 'again', topK: 1);
        $ops = array_map(static fn ($c): string => $c->op, $fake->calls());
        self::assertSame(['infer', 'models', 'infer', 'infer'], $ops); // the name is learnt once
        self::assertSame(['text'], array_keys($fake->requests('topic')[2]));
    }
}
