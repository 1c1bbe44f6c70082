<?php

declare(strict_types=1);

namespace TensorBridge\Exception;

/**
 * Thrown when the model's queue is full (OVERLOADED); retry later.
 */
final class OverloadedException extends ServerException
{
}
