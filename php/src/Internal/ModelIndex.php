<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

use TensorBridge\DType;
use TensorBridge\Tensor;

/**
 * The models a server listed (MODELS_OK, spec §4.1), by name: signature look-ups without a round trip.
 *
 * @internal
 */
final class ModelIndex
{
    /**
     * @param array<string, array<string, mixed>> $byName model name => its metadata
     */
    private function __construct(private readonly array $byName)
    {
    }

    /**
     * Indexes a MODELS_OK "models" list; entries without a string name are skipped.
     *
     * @param list<mixed> $models
     */
    public static function fromList(array $models): self
    {
        $byName = [];
        foreach ($models as $m) {
            if (is_array($m) && is_string($m['name'] ?? null)) {
                $byName[$m['name']] = $m;
            }
        }
        return new self($byName);
    }

    /**
     * The model's metadata, or null when the server did not list it.
     *
     * @return array<string, mixed>|null
     */
    public function get(string $model): ?array
    {
        return $this->byName[$model] ?? null;
    }

    /**
     * The dtype the model's signature declares for an input; null when not declared (or 'ANY').
     */
    public function inputDtype(string $model, string $input): ?DType
    {
        foreach ($this->signature($model, 'inputs') as $sig) {
            if (($sig['name'] ?? null) === $input && is_string($sig['datatype'] ?? null)) {
                return DType::tryFromName($sig['datatype']);
            }
        }
        return null;
    }

    /**
     * The name of the model's first declared input, or null when it declares none.
     */
    public function firstInputName(string $model): ?string
    {
        $name = $this->signature($model, 'inputs')[0]['name'] ?? null;
        return is_string($name) ? $name : null;
    }

    /**
     * Output bytes (each output 64-byte aligned) from the signature when every output shape is
     * known once the batch dimension is substituted; null when unknown.
     *
     * @param array<string, Tensor> $tensors the request's inputs (they give the batch size)
     */
    public function outputBytes(string $model, array $tensors): ?int
    {
        $outputs = $this->signature($model, 'outputs');
        if ($outputs === []) {
            return null;
        }
        $batch = null;
        foreach ($this->signature($model, 'inputs') as $sig) {
            $shape = $sig['shape'] ?? null;
            $name = $sig['name'] ?? null;
            if (is_array($shape) && ($shape[0] ?? null) === -1 && is_string($name) && isset($tensors[$name])) {
                $batch = $tensors[$name]->shape()[0] ?? null;
                break;
            }
        }
        $total = 0;
        foreach ($outputs as $sig) {
            $dtype = is_string($sig['datatype'] ?? null) ? DType::tryFromName($sig['datatype']) : null;
            $shape = $sig['shape'] ?? null;
            if ($dtype === null || $dtype === DType::BYTES || !is_array($shape)) {
                return null;
            }
            $count = 1;
            foreach ($shape as $i => $dim) {
                if ($dim === -1 && $i === 0 && $batch !== null) {
                    $dim = $batch;
                }
                if (!is_int($dim) || $dim < 0) {
                    return null;
                }
                $count *= $dim;
            }
            $total += RequestLayout::align($count * $dtype->itemSize());
        }
        return max($total, Spec::ALIGN);
    }

    /**
     * The model's declared inputs or outputs, each an array; [] when not declared.
     *
     * @return list<array<string, mixed>>
     */
    private function signature(string $model, string $side): array
    {
        $list = $this->byName[$model][$side] ?? null;
        if (!is_array($list)) {
            return [];
        }
        return array_values(array_filter($list, 'is_array'));
    }
}
