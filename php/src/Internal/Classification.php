<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

use TensorBridge\DType;
use TensorBridge\Exception\InvalidInputException;
use TensorBridge\Exception\ProtocolException;
use TensorBridge\Tensor;

/**
 * The image-classifier model convention used by Client::classify():
 * input "image" BYTES [N] (encoded image files); outputs "scores" FP32 [N, k] best first,
 * "indices" INT64 [N, k], "labels" BYTES [N*k] row-major, and optionally "notice" BYTES [N]
 * (set e.g. when the model runs with random weights).
 *
 * @internal
 */
final class Classification
{
    public const INPUT = 'image';

    /**
     * @param list<list<array{label: string, score: float, index: int}>> $rows one top-k list per image
     */
    private function __construct(
        public readonly array $rows,
        public readonly ?string $notice,
    ) {
    }

    /**
     * One encoded image (or text) as the model's BYTES [1] input.
     */
    public static function itemTensor(string $item): Tensor
    {
        return Tensor::fromBytes(pack('V', strlen($item)) . $item, DType::BYTES, [1]);
    }

    /**
     * Checks topK against the model's k when it is known (from a cached signature).
     *
     * @throws InvalidInputException
     */
    public static function checkTopK(int $topK, ?int $k, string $model): void
    {
        if ($topK < 1) {
            throw new InvalidInputException(sprintf('topK must be at least 1, got %d', $topK));
        }
        if ($k !== null && $topK > $k) {
            throw self::tooMany($topK, $k, $model);
        }
    }

    /**
     * The model's k from its signature (outputs.scores shape [-1, k]), or null when not fixed there.
     *
     * @param array<string, mixed>|null $metadata the model's entry of MODELS_OK (spec §4.1)
     */
    public static function kFromMetadata(?array $metadata): ?int
    {
        foreach ((array) ($metadata['outputs'] ?? []) as $sig) {
            if (is_array($sig) && ($sig['name'] ?? null) === 'scores' && is_array($sig['shape'] ?? null)) {
                $k = $sig['shape'][1] ?? null;
                return is_int($k) && $k > 0 ? $k : null;
            }
        }
        return null;
    }

    /**
     * Maps a classifier's decoded outputs to top-$topK lists, one per image.
     *
     * @param array<string, Tensor> $outputs
     * @throws InvalidInputException when topK is larger than the model's k, or the model is no classifier
     * @throws ProtocolException when the outputs contradict each other
     */
    public static function fromOutputs(array $outputs, int $topK, string $model): self
    {
        $scores = $outputs['scores'] ?? null;
        $labels = $outputs['labels'] ?? null;
        if ($scores === null || $labels === null) {
            throw new InvalidInputException(sprintf(
                'model "%s" is not an image classifier: classify() needs outputs "scores" [N, k] and "labels"'
                . ' [N*k], it returned %s. Use infer() for this model.',
                $model,
                $outputs === [] ? 'none' : '"' . implode('", "', array_keys($outputs)) . '"',
            ));
        }
        $shape = $scores->shape();
        if (count($shape) !== 2 || $labels->dtypeEnum() !== DType::BYTES) {
            throw new ProtocolException(sprintf(
                'model "%s": "scores" must be [N, k] and "labels" BYTES, got %s %s and %s %s',
                $model,
                $scores->dtype(),
                json_encode($shape),
                $labels->dtype(),
                json_encode($labels->shape()),
            ));
        }
        [$n, $k] = $shape;
        if ($topK > $k) {
            throw self::tooMany($topK, $k, $model);
        }
        $labelList = [];
        $raw = $labels->toArray(); // [N*k] by the convention; [N, k] is accepted too
        array_walk_recursive($raw, static function (mixed $label) use (&$labelList): void {
            $labelList[] = $label;
        });
        if (count($labelList) !== $n * $k) {
            throw new ProtocolException(sprintf(
                'model "%s" returned %d labels for %d x %d scores',
                $model,
                count($labelList),
                $n,
                $k,
            ));
        }
        $indices = isset($outputs['indices']) ? $outputs['indices']->toArray() : null;
        if ($indices !== null && $outputs['indices']->shape() !== $shape) {
            throw new ProtocolException(sprintf(
                'model "%s": "indices" has shape %s, "scores" %s',
                $model,
                json_encode($outputs['indices']->shape()),
                json_encode($shape),
            ));
        }
        $scoreRows = $scores->toArray();
        $rows = [];
        for ($i = 0; $i < $n; $i++) {
            $row = [];
            for ($j = 0; $j < $topK; $j++) {
                $row[] = [
                    'label' => (string) $labelList[$i * $k + $j],
                    'score' => (float) $scoreRows[$i][$j],
                    'index' => $indices === null ? -1 : (int) $indices[$i][$j],
                ];
            }
            $rows[] = $row;
        }
        $notice = null;
        if (isset($outputs['notice'])) {
            $notices = (array) $outputs['notice']->toArray();
            $first = $notices[0] ?? null;
            $notice = is_string($first) && $first !== '' ? $first : null;
        }
        return new self($rows, $notice);
    }

    private static function tooMany(int $topK, int $k, string $model): InvalidInputException
    {
        return new InvalidInputException(sprintf(
            'topK %d is more than the %d classes model "%s" returns per image (its top_k setting);'
            . ' ask for at most %d, or raise top_k in the model\'s configuration',
            $topK,
            $k,
            $model,
            $k,
        ));
    }
}
