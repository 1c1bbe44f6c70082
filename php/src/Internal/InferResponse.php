<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

/**
 * The INFER_OK body (spec §6.2).
 *
 * @internal
 */
final class InferResponse
{
    /**
     * Plain value object; fields as in the spec section named above.
     */
    public function __construct(
        public readonly int $queueUs,
        public readonly int $computeUs,
        /** @var list<TensorDescriptor> */
        public readonly array $outputs,
        public readonly string $inline = '',
    ) {
    }
}
