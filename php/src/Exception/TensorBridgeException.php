<?php

declare(strict_types=1);

namespace TensorBridge\Exception;

use TensorBridge\ErrorCode;

/**
 * Base class of every exception thrown by the TensorBridge client.
 */
class TensorBridgeException extends \RuntimeException
{
    private readonly ?ErrorCode $protocolCode;

    /**
     * @param ErrorCode|string|null $errorCode the server's error code (spec §7), as the enum or its
     *        name ('MODEL_NOT_FOUND'), when the server sent an ERROR frame; null for client-side conditions
     */
    public function __construct(
        string $message = '',
        ErrorCode|string|null $errorCode = null,
        ?\Throwable $previous = null,
    ) {
        $this->protocolCode = is_string($errorCode) ? ErrorCode::tryFromName($errorCode) : $errorCode;
        parent::__construct($message, $this->protocolCode->value ?? 0, $previous);
    }

    /**
     * The protocol error name (spec §7, e.g. 'MODEL_NOT_FOUND'), or null for client-side conditions.
     */
    public function getErrorCode(): ?string
    {
        return $this->protocolCode?->name;
    }

    /**
     * The protocol error code as the enum, or null for client-side conditions.
     */
    public function errorCode(): ?ErrorCode
    {
        return $this->protocolCode;
    }
}
