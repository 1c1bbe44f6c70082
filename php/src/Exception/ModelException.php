<?php

declare(strict_types=1);

namespace TensorBridge\Exception;

use TensorBridge\ErrorCode;

/**
 * Thrown when the model raised an exception on the server (MODEL_ERROR); the message keeps its
 * type and text.
 */
final class ModelException extends ServerException
{
    public function __construct(string $message, ?\Throwable $previous = null)
    {
        parent::__construct($message, ErrorCode::MODEL_ERROR, $previous);
    }
}
