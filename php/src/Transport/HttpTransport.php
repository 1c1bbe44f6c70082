<?php

declare(strict_types=1);

namespace TensorBridge\Transport;

use TensorBridge\Exception\ConnectionException;
use TensorBridge\Exception\ModelNotFoundException;
use TensorBridge\Exception\ProtocolException;
use TensorBridge\Exception\TensorBridgeException;
use TensorBridge\Exception\TimeoutException;
use TensorBridge\Internal\HttpChannel;
use TensorBridge\Internal\HttpResponse;
use TensorBridge\Internal\OipCodec;
use TensorBridge\Tensor;

/**
 * The transport to any Open Inference Protocol (KServe v2) server over HTTP(S): TensorBridge's
 * own REST listener (`tensorbridge serve --http-port`), KServe, Triton, MLServer, ...
 *
 * Requests use REST v2 with the binary tensor extension (every tensor, BYTES included, as raw
 * bytes after the JSON header) over one kept-alive ext-curl connection. There is no shared
 * memory: tensors are copied through the connection, and several requests of one call
 * (inferMany(), inferBatch()) go one after another on it, not pipelined.
 */
final class HttpTransport implements Transport
{
    private readonly HttpChannel $channel;

    /**
     * @param string $url the server's base URL, e.g. http://127.0.0.1:8000 (a path prefix is kept)
     * @param HttpOptions|null $options bearer token and TLS settings; null: none
     * @param bool $persistent share one kept-alive connection per PHP process (see HttpChannel)
     * @param int $connectAttempts connection attempts per request while the server refuses connections
     * @param float $connectBackoff seconds before the second attempt, doubled for each further one
     */
    public function __construct(
        string $url,
        ?HttpOptions $options = null,
        bool $persistent = true,
        int $connectAttempts = 3,
        float $connectBackoff = 0.01,
    ) {
        if (!self::isUrl($url) || !is_string(parse_url($url, PHP_URL_HOST))) {
            throw new \InvalidArgumentException(sprintf('"%s" is not an http:// or https:// URL with a host', $url));
        }
        if (parse_url($url, PHP_URL_QUERY) !== null || parse_url($url, PHP_URL_FRAGMENT) !== null
            || parse_url($url, PHP_URL_USER) !== null) {
            throw new \InvalidArgumentException(
                'the URL must not carry a query, fragment or user (use HttpOptions token)',
            );
        }
        if ($connectAttempts < 1) {
            throw new \InvalidArgumentException('connectAttempts must be >= 1 (1 = no retry)');
        }
        if (!($connectBackoff >= 0.0) || is_infinite($connectBackoff)) {
            throw new \InvalidArgumentException('connectBackoff must be a number of seconds >= 0');
        }
        $this->channel = new HttpChannel(
            rtrim($url, '/'),
            $options ?? new HttpOptions(),
            $persistent,
            $connectAttempts,
            $connectBackoff,
        );
    }

    /**
     * Whether $endpoint names an HTTP(S) server rather than a Unix socket path.
     */
    public static function isUrl(string $endpoint): bool
    {
        return preg_match('#^https?://#i', $endpoint) === 1;
    }

    public function endpoint(): string
    {
        return $this->channel->baseUrl;
    }

    /**
     * The server's metadata (`GET v2`): server (its name), version, protocol ('oip-v2') and extensions.
     */
    public function ping(Deadline $deadline): array
    {
        $meta = $this->getJson('/v2', '', $deadline);
        return [
            'server' => $meta['name'] ?? '',
            'version' => $meta['version'] ?? '',
            'protocol' => 'oip-v2',
            'extensions' => $meta['extensions'] ?? [],
        ];
    }

    /**
     * The models from the repository index (`POST v2/repository/index`; where a server has none,
     * KServe's `GET v2/models`), each with its metadata (`GET v2/models/<m>`).
     */
    public function models(Deadline $deadline): array
    {
        $json = ['Content-Type: application/json'];
        $response = $this->channel->request('/v2/repository/index', '{}', $json, $deadline);
        $versions = [];
        if ($response->status === 200) {
            foreach (OipCodec::json($response->body, 'repository index', true) as $entry) {
                $name = is_array($entry) ? ($entry['name'] ?? null) : null;
                $state = is_array($entry) && is_string($entry['state'] ?? null) ? strtolower($entry['state']) : 'ready';
                if (is_string($name) && $state === 'ready') {
                    $versions[$name] ??= [];
                    $v = $entry['version'] ?? null;
                    if ((is_string($v) && ctype_digit($v)) || is_int($v)) {
                        $versions[$name][] = ['version' => (int) $v, 'state' => $state];
                    }
                }
            }
        } elseif (in_array($response->status, [404, 405, 501], true)) {
            $names = $this->getJson('/v2/models', '', $deadline)['models'] ?? null;
            if (!is_array($names)) {
                throw new ProtocolException(sprintf(
                    '%s lists no models (no repository index, no v2/models)',
                    $this->endpoint(),
                ));
            }
            $versions = array_fill_keys(array_filter($names, 'is_string'), []);
        } else {
            throw OipCodec::error($response, '', $this->endpoint(), $deadline->timeout);
        }
        $models = [];
        foreach ($versions as $name => $known) {
            try {
                $meta = $this->getJson('/v2/models/' . rawurlencode((string) $name), (string) $name, $deadline);
            } catch (ModelNotFoundException) {
                continue; // unloaded since the index was read
            }
            $models[] = OipCodec::modelEntry((string) $name, $meta, $known);
        }
        return $models;
    }

    /**
     * Runs the requests one after another on the kept-alive connection. A failure that leaves
     * the connection unusable (cannot connect, dropped, timed out) ends the group: the requests
     * not yet sent get that error too. When the first request could not be sent at all, throws.
     */
    public function infer(
        string $model,
        array $requests,
        Deadline $deadline,
        ?int $version = null,
        ?string $routingKey = null,
    ): Replies {
        $path = '/v2/models/' . rawurlencode($model)
            . ($version === null ? '' : '/versions/' . $version) . '/infer';
        $items = [];
        $failure = null;
        $first = true;
        foreach ($requests as $key => $inputs) {
            if ($failure !== null) {
                $items[$key] = $failure;
                continue;
            }
            try {
                $items[$key] = $this->inferOne($path, $model, $inputs, $deadline, $routingKey);
            } catch (ConnectionException | TimeoutException $e) {
                if ($e->errorCode() !== null) {
                    $items[$key] = $e; // the server's own answer (DEADLINE_EXCEEDED, UNAUTHORIZED): this request's
                    continue;
                }
                if ($first && !$this->channel->lastSent()) {
                    throw $e; // nothing was sent: safe to retry
                }
                $items[$key] = $failure = $e;
            } catch (TensorBridgeException $e) {
                $items[$key] = $e;
            }
            $first = false;
        }
        return new Replies($items, $failure);
    }

    /**
     * TCP connections this transport opened so far: 1 while one kept-alive connection served every call.
     */
    public function connects(): int
    {
        return $this->channel->connects();
    }

    public function close(): void
    {
        $this->channel->close();
    }

    /**
     * @param array<string, Tensor> $inputs
     */
    private function inferOne(
        string $path,
        string $model,
        array $inputs,
        Deadline $deadline,
        ?string $routingKey,
    ): Reply {
        $timeoutUs = intdiv(max(0, $deadline->remainingNs()), 1000);
        [$body, $headers] = OipCodec::inferRequest($inputs, $timeoutUs, $routingKey);
        $response = $this->channel->request($path, $body, $headers, $deadline);
        if ($response->status !== 200) {
            throw OipCodec::error($response, $model, $this->endpoint(), $deadline->timeout);
        }
        return OipCodec::inferReply($response);
    }

    /**
     * @return array<string, mixed>
     */
    private function getJson(string $path, string $model, Deadline $deadline): array
    {
        $response = $this->channel->request($path, null, [], $deadline);
        if ($response->status !== 200) {
            throw OipCodec::error($response, $model, $this->endpoint(), $deadline->timeout);
        }
        return OipCodec::json($response->body, 'GET ' . $path);
    }
}
