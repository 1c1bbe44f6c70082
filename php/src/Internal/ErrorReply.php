<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

/**
 * The ERROR body (spec §7); code is the numeric error code.
 *
 * @internal
 */
final class ErrorReply
{
    /**
     * Plain value object; fields as in the spec section named above.
     */
    public function __construct(
        public readonly int $code,
        public readonly string $message,
    ) {
    }
}
