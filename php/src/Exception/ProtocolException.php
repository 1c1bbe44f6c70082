<?php

declare(strict_types=1);

namespace TensorBridge\Exception;

/**
 * Thrown when a frame violates the wire protocol (PROTOCOL_ERROR); the connection is dropped.
 */
final class ProtocolException extends TensorBridgeException
{
}
