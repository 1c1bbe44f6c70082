<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

/**
 * Where one INFER request lies in the region: its inputs, then the output area offered to the server.
 *
 * @internal
 */
final class PlannedRequest
{
    /**
     * @param int $start first region byte the request uses
     * @param int $end region byte after the last one it uses (its output area included)
     * @param string $descriptors the inputs' descriptors, encoded (spec §6.3)
     * @param int $inputCount how many descriptors $descriptors holds
     */
    public function __construct(
        public readonly int $id,
        public readonly int $start,
        public readonly int $end,
        public readonly int $outOffset,
        public readonly int $outCapacity,
        public readonly string $descriptors,
        public readonly int $inputCount,
    ) {
    }
}
