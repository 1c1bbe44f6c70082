<?php

declare(strict_types=1);

namespace TensorBridge\Transport;

use TensorBridge\Exception\TensorBridgeException;
use TensorBridge\Tensor;

/**
 * How a Client reaches a server: requests in, replies out. LocalTransport speaks the Unix-socket
 * + shared-memory protocol of spec/protocol.md; TensorBridge\Testing\FakeTransport answers from
 * memory for an application's own tests.
 *
 * A transport turns every failure into a TensorBridgeException; it never retries a request that may
 * have reached the server. Inputs arrive already converted to tensors.
 */
interface Transport
{
    /**
     * Where this transport sends requests (a socket path, a URL), for messages and circuit-breaker keys.
     */
    public function endpoint(): string;

    /**
     * Checks that the server answers; returns its PONG JSON (server, version, protocol).
     *
     * @return array<string, mixed>
     * @throws TensorBridgeException
     */
    public function ping(Deadline $deadline): array;

    /**
     * The loaded models with their signatures (spec §4.1).
     *
     * @return list<array<string, mixed>>
     * @throws TensorBridgeException
     */
    public function models(Deadline $deadline): array;

    /**
     * Runs inference requests on one model, pipelined where the transport can.
     *
     * Each request gets its own entry in the result: a Reply, or the exception for that request
     * (the server's error, or why it got no answer). A request that may have run is never re-sent.
     *
     * @template K of array-key
     * @param array<K, array<string, Tensor>> $requests request key => input name => tensor; not empty
     * @param int|null $version the model version to run; null: the one the server routes to
     * @param string|null $routingKey A/B routing key (the same key, the same version); null: random
     * @return Replies<K>
     * @throws TensorBridgeException when nothing could be sent (server unreachable, ...)
     */
    public function infer(
        string $model,
        array $requests,
        Deadline $deadline,
        ?int $version = null,
        ?string $routingKey = null,
    ): Replies;

    /**
     * Releases what the transport holds (a persistent connection may stay open for reuse).
     */
    public function close(): void;
}
