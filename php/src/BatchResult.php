<?php

declare(strict_types=1);

namespace TensorBridge;

use TensorBridge\Exception\TensorBridgeException;

/**
 * The outcome of one item of inferBatch() / classifyBatch(): its value, or the exception that
 * failed this item only.
 *
 * ```php
 * foreach ($client->classifyBatch('resnet18', $images) as $key => $result) {
 *     if ($result->ok()) { $top = $result->value(); } else { log($key, $result->error()); }
 * }
 * ```
 *
 * @template T
 */
final class BatchResult
{
    /**
     * @param T|null $value
     */
    private function __construct(
        private readonly mixed $value,
        private readonly ?TensorBridgeException $error,
    ) {
    }

    /**
     * A successful item.
     *
     * @template V
     * @param V $value
     * @return self<V>
     */
    public static function success(mixed $value): self
    {
        return new self($value, null);
    }

    /**
     * A failed item.
     *
     * @return self<never>
     */
    public static function failure(TensorBridgeException $error): self
    {
        return new self(null, $error);
    }

    /**
     * Whether this item succeeded.
     */
    public function ok(): bool
    {
        return $this->error === null;
    }

    /**
     * The item's value (inferBatch: output name => Tensor; classifyBatch: the top-k list).
     *
     * @return T
     * @throws TensorBridgeException this item's error, as it would have been thrown by infer()/classify()
     */
    public function value(): mixed
    {
        if ($this->error !== null) {
            throw $this->error;
        }
        return $this->value;
    }

    /**
     * This item's error, or null when it succeeded.
     */
    public function error(): ?TensorBridgeException
    {
        return $this->error;
    }
}
