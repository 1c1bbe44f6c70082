<?php

declare(strict_types=1);

namespace TensorBridge\Exception;

use TensorBridge\ErrorCode;

/**
 * Thrown when no model of the requested name is loaded on the server (MODEL_NOT_FOUND).
 */
final class ModelNotFoundException extends TensorBridgeException
{
    /**
     * @param string $modelName the model that was asked for
     */
    public function __construct(
        string $message,
        private readonly string $modelName,
        ErrorCode|string|null $errorCode = ErrorCode::MODEL_NOT_FOUND,
        ?\Throwable $previous = null,
    ) {
        parent::__construct($message, $errorCode, $previous);
    }

    /**
     * The name of the model that was not found.
     */
    public function getModelName(): string
    {
        return $this->modelName;
    }
}
