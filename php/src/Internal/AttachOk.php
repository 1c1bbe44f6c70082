<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

/**
 * The ATTACH_OK body (spec §5.1).
 *
 * @internal
 */
final class AttachOk
{
    /**
     * Plain value object; fields as in the spec section named above.
     */
    public function __construct(
        public readonly int $regionSize,
        public readonly int $regionCap,
        public readonly int $maxBody,
    ) {
    }
}
