<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

/**
 * The INFER body (spec §6.1).
 *
 * @internal
 */
final class InferRequest
{
    /**
     * Plain value object; fields as in the spec section named above.
     */
    public function __construct(
        public readonly int $timeoutUs,
        public readonly string $model,
        public readonly int $outOffset,
        public readonly int $outCapacity,
        /** @var list<TensorDescriptor> */
        public readonly array $inputs,
        public readonly string $inline = '',
        /** the version to run (spec §6.1 INFER_OPT_VERSION); null = routed by the server */
        public readonly ?int $version = null,
        /** key for sticky A/B routing (INFER_OPT_ROUTING_KEY); null = weighted random */
        public readonly ?string $routingKey = null,
    ) {
    }
}
