<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

/**
 * One HTTP response as HttpChannel read it.
 *
 * @internal
 */
final class HttpResponse
{
    /**
     * @param int $status the HTTP status code
     * @param array<string, string> $headers lower-case header name => value (the last one of a name)
     * @param string $body the response body
     */
    public function __construct(
        public readonly int $status,
        public readonly array $headers,
        public readonly string $body,
    ) {
    }
}
