<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

use TensorBridge\DType;
use TensorBridge\Exception\InvalidInputException;
use TensorBridge\Tensor;

/**
 * Turns the inputs a caller passes (Tensors, nested PHP arrays, scalars) into tensors: with the
 * dtype the model's signature declares, else a dtype guessed from the first value.
 *
 * @internal
 */
final class Inputs
{
    /**
     * @param array<mixed> $inputs input name => Tensor, (nested) array or scalar
     * @param \Closure(string $input): ?DType $declared the signature's dtype of an input, if any
     * @return array<string, Tensor>
     * @throws InvalidInputException naming the input at fault
     */
    public static function toTensors(string $model, array $inputs, \Closure $declared): array
    {
        if ($inputs === []) {
            throw new InvalidInputException(sprintf('infer("%s") needs at least one input', $model));
        }
        $out = [];
        foreach ($inputs as $name => $value) {
            if (!is_string($name) || $name === '') {
                throw new InvalidInputException(sprintf(
                    'inputs must be keyed by input name (e.g. ["input" => $rows]); got key %s',
                    var_export($name, true),
                ));
            }
            if ($value instanceof Tensor) {
                $out[$name] = $value;
                continue;
            }
            if (!is_array($value) && !is_int($value) && !is_float($value) && !is_bool($value) && !is_string($value)) {
                throw new InvalidInputException(sprintf(
                    'input "%s" is %s; pass a Tensor, a (nested) array or a scalar',
                    $name,
                    get_debug_type($value),
                ));
            }
            $dtype = $declared($name) ?? self::guessDtype($value);
            try {
                $out[$name] = Tensor::fromArray($value, $dtype);
            } catch (InvalidInputException $e) {
                throw new InvalidInputException(sprintf('input "%s": %s', $name, $e->getMessage()), null, $e);
            }
        }
        return $out;
    }

    /**
     * Whether the inputs are already tensors under non-empty string names (toTensors() would
     * return them as they are).
     *
     * @param array<mixed> $inputs
     * @phpstan-assert-if-true array<string, Tensor> $inputs
     */
    public static function allTensors(array $inputs): bool
    {
        if ($inputs === []) {
            return false;
        }
        foreach ($inputs as $name => $value) {
            if (!$value instanceof Tensor || !is_string($name) || $name === '') {
                return false;
            }
        }
        return true;
    }

    /**
     * Checks a pinned version and a routing key before anything is sent (spec §6.1).
     *
     * @throws InvalidInputException
     */
    public static function checkRoute(?int $version, ?string $routingKey): void
    {
        if ($version !== null && ($version < 1 || $version > 0xFFFFFFFF)) {
            throw new InvalidInputException(sprintf(
                'version must be a model version number of 1 or more (or null for the routed one), got %d',
                $version,
            ));
        }
        if ($routingKey !== null && ($routingKey === '' || strlen($routingKey) > 255)) {
            throw new InvalidInputException(sprintf(
                'routingKey must be 1 to 255 bytes (or null for a random A/B choice), got %d bytes',
                strlen($routingKey),
            ));
        }
    }

    /**
     * The dtype a plain value most likely means: ints INT64, bools BOOL, strings BYTES, else FP32.
     */
    public static function guessDtype(mixed $value): DType
    {
        while (is_array($value) && $value !== []) {
            $value = $value[array_key_first($value)];
        }
        return match (true) {
            is_int($value) => DType::INT64,
            is_bool($value) => DType::BOOL,
            is_string($value) => DType::BYTES,
            default => DType::FP32,
        };
    }
}
