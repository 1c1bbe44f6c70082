<?php

declare(strict_types=1);

namespace TensorBridge\Exception;

/**
 * Thrown when the server refuses this process's uid (UNAUTHORIZED, see --allow-uid).
 */
final class UnauthorizedException extends ConnectionException
{
}
