<?php

declare(strict_types=1);

namespace TensorBridge;

use TensorBridge\Exception\CircuitOpenException;
use TensorBridge\Exception\ConnectionException;
use TensorBridge\Exception\InvalidInputException;
use TensorBridge\Exception\ProtocolException;
use TensorBridge\Exception\TensorBridgeException;
use TensorBridge\Exception\TimeoutException;
use TensorBridge\Internal\Calls;
use TensorBridge\Internal\CircuitBreaker;
use TensorBridge\Internal\Classification;
use TensorBridge\Internal\Embedding;
use TensorBridge\Internal\FileBreakerStore;
use TensorBridge\Internal\Inputs;
use TensorBridge\Internal\MemoryBreakerStore;
use TensorBridge\Transport\Deadline;
use TensorBridge\Transport\HttpOptions;
use TensorBridge\Transport\HttpTransport;
use TensorBridge\Transport\LocalTransport;
use TensorBridge\Transport\Transport;

/**
 * Client for a `tensorbridge serve` process on the same host (Unix socket + shared-memory region),
 * for any Open Inference Protocol server over HTTP(S) (`new Client('http://host:8000')`: TensorBridge's
 * REST listener, KServe, Triton, MLServer; see Transport\HttpTransport), or for any other Transport
 * (e.g. TensorBridge\Testing\FakeTransport in an application's tests).
 *
 * Not safe for concurrent use from several fibers; one Client per worker is the intended use.
 */
final class Client
{
    private readonly Transport $transport;
    /** whether this Client made its transport (and so closes it when it goes) */
    private readonly bool $ownsTransport;
    private readonly Calls $calls;
    private ?string $lastNotice = null;
    /** @var array<array-key, bool> */
    private array $lastTruncated = [];

    /**
     * @param string|null $socketPath the server's Unix socket, or an http:// / https:// URL of an Open
     *        Inference Protocol server; null: $TENSORBRIDGE_SOCKET, else the default of spec §1
     * @param float $timeout per-call timeout in seconds
     * @param bool $persistent reuse one connection per PHP worker process (PHP-FPM) across requests
     *        (over HTTP: one kept-alive curl connection per process, see HttpTransport)
     * @param bool $checksums CRC-32C on every frame and tensor (spec §9); local socket only
     * @param int|null $spinMicros how long to poll for a reply before sleeping in select() (spec §8);
     *        local socket only. null (default) = auto: per model, poll up to 50 µs only while that
     *        makes round trips at least 1/8 shorter than sleeping at once (measured as it goes: one
     *        call in 16 sleeps to compare). It saves a wake-up (~30-45 µs on a busy small VM) for up
     *        to 50 µs of CPU per call; with a slow model, or more callers than cores, it stops by
     *        itself. 0 = never poll (least CPU: e.g. many workers on few cores); a positive value =
     *        always poll that long.
     * @param int $connectAttempts connection set-up attempts per call while the server is not
     *        accepting (no socket file, connection refused); 1 = no retry. Never more than the timeout allows.
     * @param float $connectBackoff seconds before the second attempt, doubled for each further one
     *        (at most 0.5 s, with jitter)
     * @param int $breakerThreshold consecutive calls that failed to connect or timed out after which
     *        calls fail fast with CircuitOpenException; 0 turns the circuit breaker off
     * @param float $breakerCoolDown seconds the circuit stays open before one call probes the server
     * @param string|null $breakerStateDir a directory private to this user (mode 0700) for the breaker
     *        state shared by all PHP processes of this user; null: sys_get_temp_dir()/tensorbridge-<euid>
     * @param Transport|null $transport talk through this transport instead of a LocalTransport built
     *        from the arguments above (the socket, connection and breaker-state arguments are then
     *        ignored, and the breaker state lives in this Client only)
     * @param HttpOptions|null $http bearer token and TLS settings for a URL; null: none
     * @throws \InvalidArgumentException for settings the endpoint cannot honour (e.g. checksums over HTTP)
     */
    public function __construct(
        ?string $socketPath = null,
        private readonly float $timeout = 1.0,
        bool $persistent = true,
        bool $checksums = false,
        ?int $spinMicros = null,
        int $connectAttempts = 3,
        float $connectBackoff = 0.01,
        int $breakerThreshold = 5,
        float $breakerCoolDown = 5.0,
        ?string $breakerStateDir = null,
        ?Transport $transport = null,
        ?HttpOptions $http = null,
    ) {
        if (!($timeout > 0.0) || is_infinite($timeout)) {
            throw new \InvalidArgumentException('timeout must be a positive number of seconds');
        }
        $this->ownsTransport = $transport === null;
        $socketPath ??= self::defaultSocketPath();
        $url = HttpTransport::isUrl($socketPath);
        if ($url && ($checksums || ($spinMicros ?? 0) !== 0)) {
            // no shared memory and no frames over HTTP: refuse rather than silently do without
            throw new \InvalidArgumentException('checksums and spinMicros apply to the local socket only, not to a URL');
        }
        if (!$url && $http !== null) {
            throw new \InvalidArgumentException('HttpOptions apply to an http:// or https:// URL only');
        }
        $this->transport = $transport ?? ($url
            ? new HttpTransport($socketPath, $http, $persistent, $connectAttempts, $connectBackoff)
            : new LocalTransport($socketPath, $persistent, $checksums, $spinMicros, $connectAttempts, $connectBackoff));
        $endpoint = $this->transport->endpoint();
        $store = match (true) {
            $breakerThreshold === 0 => new MemoryBreakerStore('off'),
            $transport !== null => new MemoryBreakerStore($endpoint . '#' . bin2hex(random_bytes(8))),
            default => FileBreakerStore::forSocket($endpoint, $breakerStateDir),
        };
        $this->calls = new Calls(
            $this->transport,
            new CircuitBreaker($store, $endpoint, $breakerThreshold, $breakerCoolDown),
            $timeout,
        );
    }

    /**
     * The socket path used when none is given: $TENSORBRIDGE_SOCKET, else /run/tensorbridge/tensorbridge.sock
     * when that socket exists or /run/tensorbridge is writable, else $XDG_RUNTIME_DIR/tensorbridge.sock, else
     * /tmp/tensorbridge.sock. (A PHP-FPM user usually may connect to the socket without being able to write
     * its directory, as with the systemd unit in deploy/.)
     */
    public static function defaultSocketPath(): string
    {
        $env = getenv('TENSORBRIDGE_SOCKET');
        if (is_string($env) && $env !== '') {
            return $env;
        }
        if (file_exists('/run/tensorbridge/tensorbridge.sock')
            || (is_dir('/run/tensorbridge') && is_writable('/run/tensorbridge'))) {
            return '/run/tensorbridge/tensorbridge.sock';
        }
        $xdg = getenv('XDG_RUNTIME_DIR');
        if (is_string($xdg) && $xdg !== '') {
            return rtrim($xdg, '/') . '/tensorbridge.sock';
        }
        return '/tmp/tensorbridge.sock';
    }

    /**
     * The socket path (or URL) this client connects to (its transport's endpoint).
     */
    public function socketPath(): string
    {
        return $this->transport->endpoint();
    }

    /**
     * Checks that the server answers; returns its PONG JSON (server, version, protocol; over HTTP the
     * server's v2 metadata: server, version, protocol 'oip-v2', extensions).
     *
     * @return array<string, mixed>
     */
    public function ping(): array
    {
        return $this->calls->guard(fn (Deadline $deadline): array => $this->transport->ping($deadline));
    }

    /**
     * Lists the loaded models with their signatures (spec §4.1); refreshes the cached signatures.
     *
     * @return list<array<string, mixed>>
     */
    public function models(): array
    {
        return $this->calls->models();
    }

    /**
     * Runs one inference.
     *
     * @param array<string, Tensor|array<mixed>|int|float|bool|string> $inputs input name => Tensor or plain
     *        PHP (nested) array / scalar, converted with the dtype of the model's signature
     * @param int|null $version run this version of the model (ModelNotFoundException names the
     *        versions there are); null: the version the server routes to
     * @param string|null $routingKey with an A/B split, the same key always reaches the same
     *        version (e.g. a user id); null: the server's weighted random choice
     * @return array<string, Tensor> output name => tensor
     */
    public function infer(string $model, array $inputs, ?int $version = null, ?string $routingKey = null): array
    {
        return $this->calls->infer($model, $inputs, $version, $routingKey);
    }

    /**
     * Runs several inferences on one model, pipelined: all inputs are written to the region and all
     * requests sent before the replies are read (spec §8). The timeout applies to the whole call.
     *
     * If some requests fail on the server, all replies are still read, then the first error is thrown.
     * inferBatch() reports each item's error separately instead.
     *
     * @param list<array<string, Tensor|array<mixed>|int|float|bool|string>> $listOfInputs
     * @param int|null $version as for infer()
     * @param string|null $routingKey as for infer()
     * @return list<array<string, Tensor>> one result per input set, in order
     */
    public function inferMany(
        string $model,
        array $listOfInputs,
        ?int $version = null,
        ?string $routingKey = null,
    ): array {
        $run = function (Deadline $deadline) use ($model, $listOfInputs, $version, $routingKey): array {
            if ($listOfInputs === []) {
                return [];
            }
            Inputs::checkRoute($version, $routingKey);
            if (!array_is_list($listOfInputs)) {
                throw new InvalidInputException('inferMany() takes a list of input arrays');
            }
            $requests = [];
            foreach ($listOfInputs as $inputs) {
                if (!is_array($inputs)) {
                    throw new InvalidInputException('inferMany() takes a list of input arrays (input name => tensor)');
                }
                $requests[] = $this->calls->tensors($model, $inputs, $deadline);
            }
            $replies = $this->calls->send($model, $requests, $deadline, $version, $routingKey);
            if ($replies->failure !== null) {
                throw $replies->failure;
            }
            $results = [];
            foreach ($replies->items as $answer) {
                if ($answer instanceof TensorBridgeException) {
                    throw $answer;
                }
                $results[] = $answer->outputs;
            }
            return $results;
        };
        return $this->calls->guard($run);
    }

    /**
     * Runs several inferences on one model and reports each one's outcome separately.
     *
     * Every item is its own INFER request; all are pipelined on this client's connection (the
     * server's dynamic batcher may merge them, and other clients' requests, into one forward pass).
     * An error in one item (bad input, model error, ...) fails that item only. When the connection
     * fails or the deadline passes mid-batch, the items already answered keep their results and
     * every unanswered item gets that ConnectionException / TimeoutException: an item that was
     * sent may have run on the server, and nothing is ever re-sent. This method does not throw
     * TensorBridgeException: even when nothing could be sent (server down, circuit open) every
     * item carries the error.
     *
     * @template K of array-key
     * @param array<K, array<string, Tensor|array<mixed>|int|float|bool|string>> $listOfInputs
     * @param int|null $version as for infer()
     * @param string|null $routingKey as for infer()
     * @return array<K, BatchResult> one result per item, same keys and order; value(): array<string, Tensor>
     */
    public function inferBatch(
        string $model,
        array $listOfInputs,
        ?int $version = null,
        ?string $routingKey = null,
    ): array {
        return array_map(
            static fn (array|TensorBridgeException $o): BatchResult => $o instanceof TensorBridgeException
                ? BatchResult::failure($o)
                : BatchResult::success($o),
            $this->calls->runBatch($model, $listOfInputs, $version, $routingKey),
        );
    }

    /**
     * Classifies one item with a classifier model: an encoded image (JPEG, PNG, ... as the model
     * accepts) for an image classifier, or a text for a model whose preprocess is a tokenizer.
     * The model takes one BYTES [N] input ("image", "text": the first input of its signature) and
     * answers "scores" [N, k], "indices" [N, k], "labels" [N*k] and optionally "notice" [N].
     *
     * @param string $item the encoded image file's bytes, or the UTF-8 text
     * @param int $topK how many classes to return, best first; at most the model's k (its top_k)
     * @param int|null $version as for infer()
     * @param string|null $routingKey as for infer()
     * @return list<array{label: string, score: float, index: int}> best first
     * @throws InvalidInputException when the item cannot be decoded, or topK is out of range
     */
    public function classify(
        string $model,
        string $item,
        int $topK = 5,
        ?int $version = null,
        ?string $routingKey = null,
    ): array {
        $this->lastNotice = null;
        Classification::checkTopK($topK, $this->knownTopK($model), $model);
        $tensor = Classification::itemTensor($item);
        $outputs = $this->inferNamed($model, Classification::INPUT, $tensor, $version, $routingKey);
        $result = Classification::fromOutputs($outputs, $topK, $model);
        $this->lastNotice = $result->notice;
        return $result->rows[0] ?? throw new ProtocolException(sprintf(
            'model "%s" returned no rows for one item',
            $model,
        ));
    }

    /**
     * classify() for several images or texts, as one pipelined batch (see inferBatch() for how
     * errors are reported: per item, never mixed up between items).
     *
     * @template K of array-key
     * @param array<K, string> $items encoded image files, or texts
     * @param int|null $version as for infer()
     * @param string|null $routingKey as for infer()
     * @return array<K, BatchResult> same keys and order; value(): list<array{label: string, score: float, index: int}>
     */
    public function classifyBatch(
        string $model,
        array $items,
        int $topK = 5,
        ?int $version = null,
        ?string $routingKey = null,
    ): array {
        $this->lastNotice = null;
        $results = [];
        try {
            Inputs::checkRoute($version, $routingKey);
            Classification::checkTopK($topK, $this->knownTopK($model), $model);
            foreach ($items as $key => $item) {
                if (!is_string($item)) {
                    $results[$key] = BatchResult::failure(new InvalidInputException(sprintf(
                        'classifyBatch() item %s is %s; pass the encoded image file or the text as a string',
                        var_export($key, true),
                        get_debug_type($item),
                    )));
                }
            }
            if ($this->calls->index() === null && count($results) < count($items)) {
                $this->models(); // the model's input name ("image", or "text") and its k
                Classification::checkTopK($topK, $this->knownTopK($model), $model);
            }
        } catch (TensorBridgeException $e) {
            $failed = [];
            foreach ($items as $key => $_) {
                $failed[$key] = $results[$key] ?? BatchResult::failure($e);
            }
            return $failed;
        }
        $input = $this->calls->index()?->firstInputName($model) ?? Classification::INPUT;
        $inputs = [];
        foreach ($items as $key => $item) {
            if (is_string($item)) {
                $inputs[$key] = [$input => Classification::itemTensor($item)];
            }
        }
        $notice = null;
        foreach ($this->calls->runBatch($model, $inputs, $version, $routingKey) as $key => $outcome) {
            if ($outcome instanceof TensorBridgeException) {
                $results[$key] = BatchResult::failure($outcome);
                continue;
            }
            try {
                $result = Classification::fromOutputs($outcome, $topK, $model);
                $notice ??= $result->notice;
                $results[$key] = BatchResult::success($result->rows[0] ?? []);
            } catch (TensorBridgeException $e) {
                $results[$key] = BatchResult::failure($e);
            }
        }
        $this->lastNotice = $notice;
        $ordered = [];
        foreach ($items as $key => $_) {
            $ordered[$key] = $results[$key];
        }
        return $ordered;
    }

    /**
     * Embeds texts with a text-embedding model (a tokenizer preprocess and pooling on the server,
     * e.g. the bundled `minilm`): one vector per text, under the text's key, in order. All texts
     * go in one request (the server may merge it with other clients' requests); lastTruncated()
     * says which texts were cut to the model's max_length tokens.
     *
     * @template K of array-key
     * @param array<K, string> $texts UTF-8 texts
     * @param bool $normalize unit-length vectors (cosine similarity = dot product); false: the
     *        pooled vectors as the model made them, whether or not the server normalises
     * @param int|null $version as for infer()
     * @param string|null $routingKey as for infer()
     * @return array<K, list<float>>
     * @throws InvalidInputException for no texts, a text that is not a string, invalid UTF-8 or a
     *         text over the server's max_bytes (the server names the item)
     */
    public function embed(
        string $model,
        array $texts,
        bool $normalize = true,
        ?int $version = null,
        ?string $routingKey = null,
    ): array {
        $this->lastTruncated = [];
        if ($texts === []) {
            throw new InvalidInputException(sprintf('embed("%s") needs at least one text', $model));
        }
        foreach ($texts as $key => $text) {
            if (!is_string($text)) {
                throw new InvalidInputException(sprintf(
                    'embed() text %s is %s; pass UTF-8 strings',
                    var_export($key, true),
                    get_debug_type($text),
                ));
            }
        }
        $tensor = Embedding::textTensor(array_values($texts));
        $outputs = $this->inferNamed($model, Embedding::INPUT, $tensor, $version, $routingKey);
        $result = Embedding::fromOutputs($outputs, count($texts), $normalize, $model);
        $keys = array_keys($texts);
        $this->lastTruncated = array_combine($keys, $result->truncated);
        return array_combine($keys, $result->vectors);
    }

    /**
     * embed() for many texts as one pipelined batch, each text its own request with its own
     * BatchResult (see inferBatch() for how errors are reported: per item, never mixed up).
     *
     * @template K of array-key
     * @param array<K, string> $texts UTF-8 texts
     * @param bool $normalize as for embed()
     * @param int|null $version as for infer()
     * @param string|null $routingKey as for infer()
     * @return array<K, BatchResult> same keys and order; value(): list<float>
     */
    public function embedBatch(
        string $model,
        array $texts,
        bool $normalize = true,
        ?int $version = null,
        ?string $routingKey = null,
    ): array {
        $this->lastTruncated = [];
        $results = [];
        $inputs = [];
        try {
            Inputs::checkRoute($version, $routingKey);
            if ($this->calls->index() === null && $texts !== []) {
                $this->models(); // the model's input name, normally "text"
            }
        } catch (TensorBridgeException $e) {
            return array_map(static fn (): BatchResult => BatchResult::failure($e), $texts);
        }
        $input = $this->calls->index()?->firstInputName($model) ?? Embedding::INPUT;
        foreach ($texts as $key => $text) {
            if (is_string($text)) {
                $inputs[$key] = [$input => Embedding::textTensor([$text])];
            }
        }
        $outcomes = $this->calls->runBatch($model, $inputs, $version, $routingKey);
        foreach ($texts as $key => $text) {
            $outcome = $outcomes[$key] ?? new InvalidInputException(sprintf(
                'embedBatch() text %s is %s; pass UTF-8 strings',
                var_export($key, true),
                get_debug_type($text),
            ));
            try {
                if ($outcome instanceof TensorBridgeException) {
                    throw $outcome;
                }
                $result = Embedding::fromOutputs($outcome, 1, $normalize, $model);
                $this->lastTruncated[$key] = $result->truncated[0];
                $results[$key] = BatchResult::success($result->vectors[0]);
            } catch (TensorBridgeException $e) {
                $results[$key] = BatchResult::failure($e);
            }
        }
        return $results;
    }

    /**
     * For each text of the last embed()/embedBatch(), under its key: whether the server cut it to
     * the model's max_length tokens (its vector then stands for the beginning of the text only).
     * Texts whose embedding failed are left out.
     *
     * @return array<array-key, bool>
     */
    public function lastTruncated(): array
    {
        return $this->lastTruncated;
    }

    /**
     * The notice the model attached to the last classify()/classifyBatch() answer, e.g. that it
     * runs with random weights so its labels mean nothing; null when it attached none.
     */
    public function lastNotice(): ?string
    {
        return $this->lastNotice;
    }

    /**
     * The circuit breaker's state for this socket: 'closed' (calls go through), 'open' (calls
     * fail fast with CircuitOpenException) or 'half-open' (the next call probes the server).
     * Shared by all Clients of this user for the same socket path (see the constructor).
     */
    public function breakerState(): string
    {
        return $this->calls->breaker->state();
    }

    /**
     * Where the server spent the last successful inference, in microseconds: waiting for the model
     * (queue_us), in the model, outputs included (compute_us), decoding inputs and postprocessing
     * outputs (preprocess_us, e.g. JPEG decoding); batch_size is the number of rows in the model
     * forward the request was part of (several requests merged by the server's batcher; 0 = not
     * known); version is the model version that computed it (0 = not known). The rest of the
     * round trip is transport and PHP. Null before the first inference.
     *
     * @return array{queue_us: int, compute_us: int, preprocess_us: int, batch_size: int, version: int}|null
     */
    public function lastTiming(): ?array
    {
        return $this->calls->lastTiming();
    }

    /**
     * Releases the region and the connection (a persistent connection stays open for reuse).
     */
    public function close(): void
    {
        $this->transport->close();
    }

    public function __destruct()
    {
        if ($this->ownsTransport) {
            $this->transport->close();
        }
    }

    /**
     * infer() of one BYTES input named as the model's signature says (the cached one, else
     * $fallback). When the name was a guess and the server refused the request as invalid, the
     * model's signature is fetched once and the request sent again under the right name (a
     * refused request did not run).
     *
     * @return array<string, Tensor>
     */
    private function inferNamed(
        string $model,
        string $fallback,
        Tensor $tensor,
        ?int $version,
        ?string $routingKey,
    ): array {
        $guessed = $this->calls->index() === null;
        $input = $this->calls->index()?->firstInputName($model) ?? $fallback;
        try {
            return $this->infer($model, [$input => $tensor], $version, $routingKey);
        } catch (InvalidInputException $e) {
            if (!$guessed || $e->errorCode() === null) {
                throw $e;
            }
            $this->models();
            $named = $this->calls->index()?->firstInputName($model);
            if ($named === null || $named === $input) {
                throw $e;
            }
            return $this->infer($model, [$named => $tensor], $version, $routingKey);
        }
    }

    /**
     * The classifier's k from the cached signature, when known (no round trip to learn it).
     */
    private function knownTopK(string $model): ?int
    {
        return Classification::kFromMetadata($this->calls->index()?->get($model));
    }
}
