<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

/**
 * A decoded 24-byte frame header (spec §3).
 *
 * @internal
 */
final class FrameHeader
{
    /**
     * Plain value object; fields as in the spec section named above.
     */
    public function __construct(
        public readonly int $type,
        public readonly int $flags,
        public readonly int $requestId,
        public readonly int $bodyLen,
        public readonly int $crc,
    ) {
    }
}
