<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

/**
 * What an INFER is addressed to: a model, optionally a pinned version or an A/B routing key (spec §6.1).
 *
 * @internal
 */
final class Target
{
    public function __construct(
        public readonly string $model,
        public readonly ?int $version = null,
        public readonly ?string $routingKey = null,
    ) {
    }
}
