<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

/**
 * The ATTACH body (spec §5.1).
 *
 * @internal
 */
final class AttachRequest
{
    /**
     * Plain value object; fields as in the spec section named above.
     */
    public function __construct(
        public readonly int $options,
        public readonly int $minRegion,
    ) {
    }
}
