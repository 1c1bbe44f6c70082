<?php

declare(strict_types=1);

namespace TensorBridge\Transport;

use TensorBridge\Exception\TensorBridgeException;

/**
 * The outcome of a group of inference requests sent together: one entry per request, and the
 * failure that ended the group early, if any.
 *
 * @template K of array-key
 */
final class Replies
{
    /**
     * @param array<K, Reply|TensorBridgeException> $items request key => its reply, or its own error
     *        (the server's answer for that request, or why it got none); same keys and order as sent
     * @param TensorBridgeException|null $failure the connection-level failure (connection lost,
     *        deadline passed) that left later requests unanswered; null when every request was answered
     */
    public function __construct(public readonly array $items, public readonly ?TensorBridgeException $failure = null)
    {
    }
}
