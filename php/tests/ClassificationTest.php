<?php

declare(strict_types=1);

namespace TensorBridge\Tests;

use PHPUnit\Framework\TestCase;
use TensorBridge\Exception\InvalidInputException;
use TensorBridge\Exception\ProtocolException;
use TensorBridge\Internal\Classification;
use TensorBridge\Tensor;

/**
 * Mapping a classifier's decoded outputs to top-k lists (the classify() convention).
 */
final class ClassificationTest extends TestCase
{
    /**
     * Two images, k = 3.
     *
     * @return array<string, Tensor>
     */
    private static function outputs(bool $notice = true): array
    {
        $out = [
            'scores' => Tensor::fromArray([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]], 'float32'),
            'indices' => Tensor::fromArray([[281, 285, 282], [1, 2, 3]], 'int64'),
            'labels' => Tensor::fromArray(
                ['tabby cat', 'Egyptian cat', 'tiger cat', 'goldfish', 'great white shark', 'tiger shark'],
                'bytes',
            ),
        ];
        if ($notice) {
            $out['notice'] = Tensor::fromArray(array_fill(0, 2, 'random weights: labels are meaningless'), 'bytes');
        }
        return $out;
    }

    public function testRowsAreTopKBestFirstPerImage(): void
    {
        $c = Classification::fromOutputs(self::outputs(), 2, 'resnet18');
        self::assertCount(2, $c->rows);
        self::assertSame('tabby cat', $c->rows[0][0]['label']);
        self::assertSame(281, $c->rows[0][0]['index']);
        self::assertEqualsWithDelta(0.7, $c->rows[0][0]['score'], 1e-6);
        self::assertSame(['goldfish', 'great white shark'], array_column($c->rows[1], 'label'));
        self::assertSame([1, 2], array_column($c->rows[1], 'index'));
        self::assertSame(['label', 'score', 'index'], array_keys($c->rows[1][1]));
        self::assertSame('random weights: labels are meaningless', $c->notice);
    }

    public function testNoNoticeForRealWeights(): void
    {
        self::assertNull(Classification::fromOutputs(self::outputs(false), 3, 'm')->notice);
    }

    public function testTopKLargerThanKSaysSo(): void
    {
        $this->expectException(InvalidInputException::class);
        $this->expectExceptionMessage('topK 4 is more than the 3 classes model "resnet18" returns per image');
        Classification::fromOutputs(self::outputs(), 4, 'resnet18');
    }

    public function testTopKCheckedAgainstTheSignatureBeforeSending(): void
    {
        $meta = ['outputs' => [['name' => 'scores', 'datatype' => 'FP32', 'shape' => [-1, 5]]]];
        self::assertSame(5, Classification::kFromMetadata($meta));
        self::assertNull(Classification::kFromMetadata(['outputs' => [['name' => 'scores', 'shape' => [-1, -1]]]]));
        self::assertNull(Classification::kFromMetadata(null));
        Classification::checkTopK(5, 5, 'm');
        Classification::checkTopK(50, null, 'm'); // unknown k: checked on the answer
        $this->expectException(InvalidInputException::class);
        $this->expectExceptionMessage('ask for at most 5');
        Classification::checkTopK(6, 5, 'm');
    }

    public function testNotAClassifier(): void
    {
        $this->expectException(InvalidInputException::class);
        $this->expectExceptionMessage('model "echo" is not an image classifier');
        Classification::fromOutputs(['image' => Tensor::fromArray(['x'], 'bytes')], 1, 'echo');
    }

    public function testLabelCountMustMatchScores(): void
    {
        $out = self::outputs();
        $out['labels'] = Tensor::fromArray(['a', 'b'], 'bytes');
        $this->expectException(ProtocolException::class);
        $this->expectExceptionMessage('returned 2 labels for 2 x 3 scores');
        Classification::fromOutputs($out, 1, 'm');
    }

    public function testImageTensorIsOneBytesItem(): void
    {
        $jpeg = "\xFF\xD8\xFF\xE0" . random_bytes(100);
        $t = Classification::itemTensor($jpeg);
        self::assertSame('BYTES', $t->dtype());
        self::assertSame([1], $t->shape());
        self::assertSame([$jpeg], $t->toArray());
    }
}
