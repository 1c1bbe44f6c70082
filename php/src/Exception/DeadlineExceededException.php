<?php

declare(strict_types=1);

namespace TensorBridge\Exception;

use TensorBridge\ErrorCode;

/**
 * Thrown when the server dropped a request because its deadline passed before the model ran
 * (DEADLINE_EXCEEDED): it was not computed, so retrying cannot run it twice. A remote model
 * (one the server forwards to an OIP cluster) is the exception: the remote may have computed it.
 */
final class DeadlineExceededException extends TimeoutException
{
    /**
     * @param float $timeout the per-call timeout in seconds that the request carried
     */
    public function __construct(string $message, float $timeout, ?\Throwable $previous = null)
    {
        parent::__construct($message, $timeout, ErrorCode::DEADLINE_EXCEEDED, $previous);
    }
}
