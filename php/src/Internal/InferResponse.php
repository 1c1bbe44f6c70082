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
     *
     * @param list<TensorDescriptor> $outputs
     * @param int $preprocessUs time spent decoding inputs and postprocessing outputs
     * @param int $batchSize rows in the model forward this request was part of (0 = not known)
     * @param int $version the model version that computed the request (0 = not known)
     */
    public function __construct(
        public readonly int $queueUs,
        public readonly int $computeUs,
        public readonly array $outputs,
        public readonly string $inline = '',
        public readonly int $preprocessUs = 0,
        public readonly int $batchSize = 0,
        public readonly int $version = 0,
    ) {
    }
}
