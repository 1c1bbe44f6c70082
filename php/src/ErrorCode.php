<?php

declare(strict_types=1);

namespace TensorBridge;

/**
 * The error codes an ERROR frame carries (spec §7); the one PHP copy of that table.
 *
 * Exceptions built from a server error expose it through TensorBridgeException::errorCode().
 */
enum ErrorCode: int
{
    case MODEL_NOT_FOUND = 1;
    case INVALID_INPUT = 2;
    case PAYLOAD_TOO_LARGE = 3;
    case DEADLINE_EXCEEDED = 4;
    case OVERLOADED = 5;
    case MODEL_ERROR = 6;
    case PROTOCOL_ERROR = 7;
    case UNAUTHORIZED = 8;
    case INTERNAL = 9;

    /**
     * The code of a spec name such as 'MODEL_NOT_FOUND'; null for an unknown name.
     */
    public static function tryFromName(string $name): ?self
    {
        foreach (self::cases() as $case) {
            if ($case->name === $name) {
                return $case;
            }
        }
        return null;
    }

    /**
     * Whether the server closes the connection after sending this error (spec §7).
     */
    public function closesConnection(): bool
    {
        return $this === self::PROTOCOL_ERROR || $this === self::UNAUTHORIZED;
    }
}
