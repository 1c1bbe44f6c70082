<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

use TensorBridge\Exception\ProtocolException;
use TensorBridge\Tensor;

/**
 * The answer of a text-embedding model (a tokenizer preprocess and pooling postprocess on the
 * server): outputs "embedding" FP32 [n, d], "norm" FP32 [n] (each row's L2 norm before the
 * server normalised it) and "truncated" BOOL [n] (the text was cut to the tokenizer's max_length).
 *
 * @internal
 */
final class Embedding
{
    /** the model's input when its signature is not known: one UTF-8 text per item, BYTES [n] */
    public const INPUT = 'text';
    /** a row whose L2 norm is this close to 1 was normalised by the server */
    private const UNIT_TOLERANCE = 1e-3;

    /**
     * @param list<list<float>> $vectors one per text, in order
     * @param list<bool> $truncated one per text, in order
     */
    private function __construct(
        public readonly array $vectors,
        public readonly array $truncated,
    ) {
    }

    /**
     * Texts as the model's BYTES [n] input.
     *
     * @param list<string> $texts
     */
    public static function textTensor(array $texts): Tensor
    {
        return Tensor::fromArray($texts, 'bytes');
    }

    /**
     * The vectors of $count texts, unit length when $normalize, else as long as the model made
     * them, whichever of the two the server sent (a normalised row is scaled back by its norm,
     * a raw one is divided by its own length).
     *
     * @param array<string, Tensor> $outputs
     * @throws ProtocolException when the model's outputs are not those of an embedding model
     */
    public static function fromOutputs(array $outputs, int $count, bool $normalize, string $model): self
    {
        $embedding = $outputs['embedding'] ?? null;
        $shape = $embedding?->shape() ?? [];
        if ($embedding === null || $embedding->dtype() !== 'FP32' || count($shape) !== 2 || $shape[0] !== $count) {
            throw new ProtocolException(sprintf(
                'model "%s" is not a text-embedding model: it answered %s instead of "embedding" FP32 [%d, d];'
                . ' use infer() for it',
                $model,
                self::describe($outputs),
                $count,
            ));
        }
        $norms = self::column($outputs['norm'] ?? null, $count);
        $truncated = self::column($outputs['truncated'] ?? null, $count);
        $vectors = [];
        foreach ($embedding->toArray() as $i => $row) {
            $vectors[] = self::scale($row, $normalize, $norms[$i] ?? null);
        }
        $flags = array_map(static fn (mixed $t): bool => $t === true, $truncated ?? array_fill(0, $count, false));
        return new self($vectors, $flags);
    }

    /**
     * @param list<float> $row
     * @return list<float>
     */
    private static function scale(array $row, bool $normalize, mixed $norm): array
    {
        $length = 0.0;
        foreach ($row as $v) {
            $length += $v * $v;
        }
        $length = sqrt($length);
        $isUnit = abs($length - 1.0) <= self::UNIT_TOLERANCE;
        if ($normalize && !$isUnit && $length > 0.0) {
            $factor = 1.0 / $length;
        } elseif (!$normalize && $isUnit && is_float($norm) && $norm > 0.0) {
            $factor = $norm;
        } else {
            return $row;
        }
        return array_map(static fn (float $v): float => $v * $factor, $row);
    }

    /**
     * A per-text output [n] as a list, or null when the model did not send it.
     *
     * @return list<mixed>|null
     */
    private static function column(?Tensor $tensor, int $count): ?array
    {
        if ($tensor === null || $tensor->shape() !== [$count]) {
            return null;
        }
        return $tensor->toArray();
    }

    /**
     * @param array<string, Tensor> $outputs
     */
    private static function describe(array $outputs): string
    {
        $parts = [];
        foreach ($outputs as $name => $t) {
            $parts[] = sprintf('"%s" %s %s', $name, $t->dtype(), json_encode($t->shape()));
        }
        return $parts === [] ? 'no outputs' : implode(', ', $parts);
    }
}
