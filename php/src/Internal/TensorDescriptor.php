<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

use TensorBridge\DType;

/**
 * A tensor descriptor (spec §6.3); location 0 = region, 1 = inline.
 *
 * @internal
 */
final class TensorDescriptor
{
    /**
     * Plain value object; fields as in the spec section named above.
     */
    public function __construct(
        public readonly string $name,
        public readonly DType $dtype,
        /** @var list<int> */
        public readonly array $shape,
        public readonly int $location,
        public readonly int $offset,
        public readonly int $nbytes,
        public readonly int $crc32c = 0,
    ) {
    }
}
