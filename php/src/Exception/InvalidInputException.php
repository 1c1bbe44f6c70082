<?php

declare(strict_types=1);

namespace TensorBridge\Exception;

/**
 * Thrown when inputs are malformed (client-side checks) or do not match the model's signature (INVALID_INPUT).
 */
class InvalidInputException extends TensorBridgeException
{
}
