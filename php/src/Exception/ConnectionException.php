<?php

declare(strict_types=1);

namespace TensorBridge\Exception;

/**
 * Thrown when the server cannot be reached, closes the connection, or dies mid-request.
 */
class ConnectionException extends TensorBridgeException
{
}
