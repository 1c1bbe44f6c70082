<?php

declare(strict_types=1);

namespace TensorBridge\Transport;

use TensorBridge\Exception\ConnectionException;
use TensorBridge\Exception\ProtocolException;
use TensorBridge\Exception\TensorBridgeException;
use TensorBridge\Internal\FrameType;
use TensorBridge\Internal\ModelIndex;
use TensorBridge\Internal\Pipeline;
use TensorBridge\Internal\Session;
use TensorBridge\Internal\SpinPolicy;
use TensorBridge\Internal\Target;

/**
 * The transport to a `tensorbridge serve` process on this host: frames over a Unix socket,
 * tensor bytes through a shared-memory region attached to the connection (spec/protocol.md).
 *
 * A connection whose framing is lost (connection error, protocol error, a frame cut by a timeout)
 * is dropped here, so the next call starts on a fresh one.
 */
final class LocalTransport implements Transport
{
    private readonly Session $session;
    private readonly Pipeline $pipeline;
    /** the models the server listed last, for output-area sizes */
    private ?ModelIndex $index = null;

    /**
     * @param string $socketPath the server's Unix socket
     * @param bool $persistent reuse one connection per PHP worker process (PHP-FPM) across requests
     * @param bool $checksums CRC-32C on every frame and tensor (spec §9)
     * @param int|null $spinMicros poll this long for a reply before sleeping (spec §8); 0 = never;
     *        null = auto (see Client::__construct())
     * @param int $connectAttempts connection set-up attempts per call while the server is not accepting
     * @param float $connectBackoff seconds before the second attempt, doubled for each further one
     */
    public function __construct(
        string $socketPath,
        bool $persistent = true,
        bool $checksums = false,
        ?int $spinMicros = null,
        int $connectAttempts = 3,
        float $connectBackoff = 0.01,
    ) {
        if ($connectAttempts < 1) {
            throw new \InvalidArgumentException('connectAttempts must be >= 1 (1 = no retry)');
        }
        if (!($connectBackoff >= 0.0) || is_infinite($connectBackoff)) {
            throw new \InvalidArgumentException('connectBackoff must be a number of seconds >= 0');
        }
        $this->session = new Session(
            $socketPath,
            $persistent,
            $checksums,
            SpinPolicy::of($spinMicros),
            $connectAttempts,
            $connectBackoff,
        );
        $this->pipeline = new Pipeline($this->session);
    }

    public function endpoint(): string
    {
        return $this->session->socketPath;
    }

    public function ping(Deadline $deadline): array
    {
        return $this->tidy(fn (): array => self::decodeJson(
            (string) $this->session->exchange(FrameType::PING, null, $deadline),
            'PONG',
        ));
    }

    public function models(Deadline $deadline): array
    {
        return $this->tidy(function () use ($deadline): array {
            $body = (string) $this->session->exchange(FrameType::MODELS, null, $deadline);
            $json = self::decodeJson($body, 'MODELS_OK');
            $models = $json['models'] ?? null;
            if (!is_array($models) || !array_is_list($models)) {
                throw new ProtocolException('MODELS_OK JSON has no "models" list');
            }
            $this->index = ModelIndex::fromList($models);
            return $models;
        });
    }

    public function infer(
        string $model,
        array $requests,
        Deadline $deadline,
        ?int $version = null,
        ?string $routingKey = null,
    ): Replies {
        try {
            $replies = $this->pipeline->run(new Target($model, $version, $routingKey), $requests, $deadline, $this->index);
        } catch (\Throwable $e) {
            $this->tidyAfter($e); // inline rather than through tidy(): no closure per call
        }
        if ($replies->failure instanceof ConnectionException || $replies->failure instanceof ProtocolException) {
            $this->session->drop();
        }
        return $replies;
    }

    public function close(): void
    {
        $this->session->close();
    }

    public function __destruct()
    {
        $this->close();
    }

    /**
     * Runs one call; drops the connection when the call failed in a way that loses its framing.
     *
     * @template T
     * @param callable(): T $fn
     * @return T
     */
    private function tidy(callable $fn): mixed
    {
        try {
            return $fn();
        } catch (\Throwable $e) {
            $this->tidyAfter($e);
        }
    }

    /**
     * Drops the connection when the call's failure lost its framing (see tidy()), then rethrows it.
     */
    private function tidyAfter(\Throwable $e): never
    {
        if (
            !$e instanceof TensorBridgeException
            || $e instanceof ConnectionException
            || $e instanceof ProtocolException
            || $this->session->isBroken()
        ) {
            $this->session->drop();
        }
        throw $e;
    }

    /**
     * @return array<string, mixed>
     */
    private static function decodeJson(string $body, string $what): array
    {
        try {
            $data = json_decode($body, true, 64, JSON_THROW_ON_ERROR);
        } catch (\JsonException $e) {
            throw new ProtocolException(sprintf('%s body is not valid JSON: %s', $what, $e->getMessage()), null, $e);
        }
        if (!is_array($data)) {
            throw new ProtocolException(sprintf('%s body is not a JSON object', $what));
        }
        return $data;
    }
}
