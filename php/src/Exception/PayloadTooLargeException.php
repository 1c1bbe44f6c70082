<?php

declare(strict_types=1);

namespace TensorBridge\Exception;

/**
 * Thrown when a request or reply exceeds the region cap or MAX_BODY (PAYLOAD_TOO_LARGE).
 */
final class PayloadTooLargeException extends InvalidInputException
{
}
