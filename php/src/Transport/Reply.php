<?php

declare(strict_types=1);

namespace TensorBridge\Transport;

use TensorBridge\Tensor;

/**
 * The server's answer to one inference request.
 */
final class Reply
{
    /**
     * @param array<string, Tensor> $outputs output name => tensor
     * @param array{queue_us: int, compute_us: int, preprocess_us: int, batch_size: int, version: int} $timing
     *        where the server spent the request's time, and the model version that answered
     *        (see Client::lastTiming())
     */
    public function __construct(public readonly array $outputs, public readonly array $timing)
    {
    }
}
