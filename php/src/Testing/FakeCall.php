<?php

declare(strict_types=1);

namespace TensorBridge\Testing;

use TensorBridge\Tensor;

/**
 * One request a FakeTransport received, as recorded for assertions in tests.
 */
final class FakeCall
{
    /**
     * @param string $op 'infer', 'models' or 'ping'
     * @param string $model the model an inference was for ('' for models/ping)
     * @param array<string, Tensor> $inputs the inference's inputs, as the Client converted them
     * @param float $timeout the call's timeout in seconds
     * @param int|null $version the version an inference pinned
     * @param string|null $routingKey the A/B routing key an inference carried
     */
    public function __construct(
        public readonly string $op,
        public readonly string $model,
        public readonly array $inputs,
        public readonly float $timeout,
        public readonly ?int $version = null,
        public readonly ?string $routingKey = null,
    ) {
    }
}
