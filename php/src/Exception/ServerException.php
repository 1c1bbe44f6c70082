<?php

declare(strict_types=1);

namespace TensorBridge\Exception;

/**
 * Thrown when the model raised (MODEL_ERROR) or the server hit an internal error (INTERNAL).
 */
class ServerException extends TensorBridgeException
{
}
