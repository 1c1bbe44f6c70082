<?php

declare(strict_types=1);

namespace TensorBridge\Exception;

use TensorBridge\ErrorCode;

/**
 * Thrown when the server hit a bug of its own (INTERNAL); it carried on.
 */
final class InternalException extends ServerException
{
    public function __construct(string $message, ?\Throwable $previous = null)
    {
        parent::__construct($message, ErrorCode::INTERNAL, $previous);
    }
}
