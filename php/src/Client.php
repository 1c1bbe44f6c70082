<?php

declare(strict_types=1);

namespace TensorBridge;

use TensorBridge\Exception\CircuitOpenException;
use TensorBridge\Exception\ConnectionException;
use TensorBridge\Exception\InvalidInputException;
use TensorBridge\Exception\ProtocolException;
use TensorBridge\Exception\TensorBridgeException;
use TensorBridge\Exception\TimeoutException;
use TensorBridge\Exception\UnauthorizedException;
use TensorBridge\Internal\CircuitBreaker;
use TensorBridge\Internal\Classification;
use TensorBridge\Internal\FileBreakerStore;
use TensorBridge\Internal\Inputs;
use TensorBridge\Internal\MemoryBreakerStore;
use TensorBridge\Internal\ModelIndex;
use TensorBridge\Transport\Deadline;
use TensorBridge\Transport\LocalTransport;
use TensorBridge\Transport\Replies;
use TensorBridge\Transport\Reply;
use TensorBridge\Transport\Transport;

/**
 * Client for a `tensorbridge serve` process on the same host (Unix socket + shared-memory region),
 * or for any other Transport (e.g. TensorBridge\Testing\FakeTransport in an application's tests).
 *
 * Not safe for concurrent use from several fibers; one Client per worker is the intended use.
 */
final class Client
{
    private readonly Transport $transport;
    /** whether this Client made its transport (and so closes it when it goes) */
    private readonly bool $ownsTransport;
    private readonly CircuitBreaker $breaker;
    /** @var array{queue_us: int, compute_us: int, preprocess_us: int, batch_size: int}|null */
    private ?array $lastTiming = null;
    /** the models the server listed last: signature dtypes and classifier k without a round trip */
    private ?ModelIndex $index = null;
    private ?string $lastNotice = null;

    /**
     * @param string|null $socketPath null: $TENSORBRIDGE_SOCKET, else the default of spec §1
     * @param float $timeout per-call timeout in seconds
     * @param bool $persistent reuse one connection per PHP worker process (PHP-FPM) across requests
     * @param bool $checksums CRC-32C on every frame and tensor (spec §9)
     * @param int $spinMicros poll without sleeping for this long before blocking on a reply (spec §8)
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
     */
    public function __construct(
        ?string $socketPath = null,
        private readonly float $timeout = 1.0,
        bool $persistent = true,
        bool $checksums = false,
        int $spinMicros = 0,
        int $connectAttempts = 3,
        float $connectBackoff = 0.01,
        int $breakerThreshold = 5,
        float $breakerCoolDown = 5.0,
        ?string $breakerStateDir = null,
        ?Transport $transport = null,
    ) {
        if (!($timeout > 0.0) || is_infinite($timeout)) {
            throw new \InvalidArgumentException('timeout must be a positive number of seconds');
        }
        $this->ownsTransport = $transport === null;
        $this->transport = $transport ?? new LocalTransport(
            $socketPath ?? self::defaultSocketPath(),
            $persistent,
            $checksums,
            $spinMicros,
            $connectAttempts,
            $connectBackoff,
        );
        $endpoint = $this->transport->endpoint();
        $store = match (true) {
            $breakerThreshold === 0 => new MemoryBreakerStore('off'),
            $transport !== null => new MemoryBreakerStore($endpoint . '#' . bin2hex(random_bytes(8))),
            default => FileBreakerStore::forSocket($endpoint, $breakerStateDir),
        };
        $this->breaker = new CircuitBreaker($store, $endpoint, $breakerThreshold, $breakerCoolDown);
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
     * The socket path this client connects to (its transport's endpoint).
     */
    public function socketPath(): string
    {
        return $this->transport->endpoint();
    }

    /**
     * Checks that the server answers; returns its PONG JSON (server, version, protocol).
     *
     * @return array<string, mixed>
     */
    public function ping(): array
    {
        return $this->guard(fn (Deadline $deadline): array => $this->transport->ping($deadline));
    }

    /**
     * Lists the loaded models with their signatures (spec §4.1); refreshes the cached signatures.
     *
     * @return list<array<string, mixed>>
     */
    public function models(): array
    {
        return $this->guard(fn (Deadline $deadline): array => $this->fetchModels($deadline));
    }

    /**
     * Runs one inference.
     *
     * @param array<string, Tensor|array<mixed>|int|float|bool|string> $inputs input name => Tensor or plain
     *        PHP (nested) array / scalar, converted with the dtype of the model's signature
     * @return array<string, Tensor> output name => tensor
     */
    public function infer(string $model, array $inputs): array
    {
        return $this->guard(function (Deadline $deadline) use ($model, $inputs): array {
            $replies = $this->send($model, [$this->tensors($model, $inputs, $deadline)], $deadline);
            $answer = $replies->items[0];
            if ($replies->failure !== null) {
                throw $replies->failure;
            }
            if ($answer instanceof TensorBridgeException) {
                throw $answer;
            }
            return $answer->outputs;
        });
    }

    /**
     * Runs several inferences on one model, pipelined: all inputs are written to the region and all
     * requests sent before the replies are read (spec §8). The timeout applies to the whole call.
     *
     * If some requests fail on the server, all replies are still read, then the first error is thrown.
     * inferBatch() reports each item's error separately instead.
     *
     * @param list<array<string, Tensor|array<mixed>|int|float|bool|string>> $listOfInputs
     * @return list<array<string, Tensor>> one result per input set, in order
     */
    public function inferMany(string $model, array $listOfInputs): array
    {
        return $this->guard(function (Deadline $deadline) use ($model, $listOfInputs): array {
            if ($listOfInputs === []) {
                return [];
            }
            if (!array_is_list($listOfInputs)) {
                throw new InvalidInputException('inferMany() takes a list of input arrays');
            }
            $requests = [];
            foreach ($listOfInputs as $inputs) {
                if (!is_array($inputs)) {
                    throw new InvalidInputException('inferMany() takes a list of input arrays (input name => tensor)');
                }
                $requests[] = $this->tensors($model, $inputs, $deadline);
            }
            $replies = $this->send($model, $requests, $deadline);
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
        });
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
     * @return array<K, BatchResult> one result per item, same keys and order; value(): array<string, Tensor>
     */
    public function inferBatch(string $model, array $listOfInputs): array
    {
        return array_map(
            static fn (array|TensorBridgeException $o): BatchResult => $o instanceof TensorBridgeException
                ? BatchResult::failure($o)
                : BatchResult::success($o),
            $this->runBatch($model, $listOfInputs),
        );
    }

    /**
     * Classifies one encoded image (JPEG, PNG, ... as the model accepts) with an image-classifier
     * model (input "image" BYTES [N]; outputs "scores" [N, k], "indices" [N, k], "labels" [N*k],
     * optional "notice" [N]).
     *
     * @param string $image the encoded image file's bytes
     * @param int $topK how many classes to return, best first; at most the model's k (its top_k)
     * @return list<array{label: string, score: float, index: int}> best first
     * @throws InvalidInputException when the image cannot be decoded, or topK is out of range
     */
    public function classify(string $model, string $image, int $topK = 5): array
    {
        $this->lastNotice = null;
        Classification::checkTopK($topK, $this->knownTopK($model), $model);
        $outputs = $this->infer($model, [Classification::INPUT => Classification::imageTensor($image)]);
        $result = Classification::fromOutputs($outputs, $topK, $model);
        $this->lastNotice = $result->notice;
        return $result->rows[0] ?? throw new ProtocolException(sprintf(
            'model "%s" returned no rows for one image',
            $model,
        ));
    }

    /**
     * classify() for several images, as one pipelined batch (see inferBatch() for how errors are
     * reported: per item, never mixed up between items).
     *
     * @template K of array-key
     * @param array<K, string> $images encoded image files
     * @return array<K, BatchResult> same keys and order; value(): list<array{label: string, score: float, index: int}>
     */
    public function classifyBatch(string $model, array $images, int $topK = 5): array
    {
        $this->lastNotice = null;
        try {
            Classification::checkTopK($topK, $this->knownTopK($model), $model);
        } catch (InvalidInputException $e) {
            return array_map(static fn (): BatchResult => BatchResult::failure($e), $images);
        }
        $inputs = [];
        $results = [];
        foreach ($images as $key => $image) {
            if (!is_string($image)) {
                $results[$key] = BatchResult::failure(new InvalidInputException(sprintf(
                    'classifyBatch() item %s is %s; pass the encoded image file as a string',
                    var_export($key, true),
                    get_debug_type($image),
                )));
                continue;
            }
            $inputs[$key] = [Classification::INPUT => Classification::imageTensor($image)];
        }
        $notice = null;
        foreach ($this->runBatch($model, $inputs) as $key => $outcome) {
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
        foreach ($images as $key => $_) {
            $ordered[$key] = $results[$key];
        }
        return $ordered;
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
        return $this->breaker->state();
    }

    /**
     * Where the server spent the last successful inference, in microseconds: waiting for the model
     * (queue_us), in the model, outputs included (compute_us), decoding inputs and postprocessing
     * outputs (preprocess_us, e.g. JPEG decoding); batch_size is the number of rows in the model
     * forward the request was part of (several requests merged by the server's batcher; 0 = not
     * known). The rest of the round trip is transport and PHP. Null before the first inference.
     *
     * @return array{queue_us: int, compute_us: int, preprocess_us: int, batch_size: int}|null
     */
    public function lastTiming(): ?array
    {
        return $this->lastTiming;
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
     * Runs one public call under the circuit breaker and tells it the outcome: connection
     * failures and timeouts count against the server; any answer from it (an error reply too)
     * proves it is up; anything else (a local input error) says nothing.
     *
     * @template T
     * @param \Closure(Deadline): T $fn
     * @param (\Closure(T): array{0: TensorBridgeException|null, 1: bool})|null $verdict for a result
     *        that carries failures instead of throwing them: [the call's failure, whether the server answered]
     * @return T
     * @throws CircuitOpenException while the breaker is open (nothing is sent)
     */
    private function guard(\Closure $fn, ?\Closure $verdict = null): mixed
    {
        $probe = $this->breaker->admit($this->timeout + 1.0);
        try {
            $result = $fn(Deadline::in($this->timeout));
        } catch (TensorBridgeException $e) {
            $this->settle($probe, $e, $e->errorCode() !== null);
            throw $e;
        } catch (\Throwable $e) {
            $this->breaker->recordNeutral($probe);
            throw $e;
        }
        [$failure, $answered] = $verdict === null ? [null, true] : $verdict($result);
        $this->settle($probe, $failure, $answered);
        return $result;
    }

    private function settle(bool $probe, ?TensorBridgeException $e, bool $answered): void
    {
        $down = $e instanceof TimeoutException
            || ($e instanceof ConnectionException && !$e instanceof UnauthorizedException);
        if ($down) {
            // the first sentence: the CircuitOpenException message adds its own advice
            $this->breaker->recordFailure($probe, preg_split('/\.\s/', $e->getMessage(), 2)[0]);
        } elseif ($answered) {
            $this->breaker->recordSuccess($probe);
        } else {
            $this->breaker->recordNeutral($probe);
        }
    }

    /**
     * Sends requests through the transport and remembers the timing of the last reply.
     *
     * @template K of array-key
     * @param array<K, array<string, Tensor>> $requests
     * @return Replies<K>
     */
    private function send(string $model, array $requests, Deadline $deadline): Replies
    {
        $replies = $this->transport->infer($model, $requests, $deadline);
        foreach ($replies->items as $item) {
            if ($item instanceof Reply) {
                $this->lastTiming = $item->timing;
            }
        }
        return $replies;
    }

    /**
     * The engine of inferBatch()/classifyBatch(): every item's outputs or its own exception.
     *
     * @template K of array-key
     * @param array<K, mixed> $listOfInputs
     * @return array<K, array<string, Tensor>|TensorBridgeException> same keys and order
     */
    private function runBatch(string $model, array $listOfInputs): array
    {
        $outcomes = [];
        try {
            $replies = $this->guard(function (Deadline $deadline) use ($model, $listOfInputs, &$outcomes): Replies {
                foreach ($listOfInputs as $key => $inputs) {
                    if (!is_array($inputs)) {
                        $outcomes[$key] = new InvalidInputException(sprintf(
                            'batch item %s is %s; pass an array of inputs (input name => tensor)',
                            var_export($key, true),
                            get_debug_type($inputs),
                        ));
                    }
                }
                $requests = [];
                foreach ($listOfInputs as $key => $inputs) {
                    if (!is_array($inputs)) {
                        continue;
                    }
                    try {
                        $requests[$key] = $this->tensors($model, $inputs, $deadline);
                    } catch (InvalidInputException $e) {
                        $outcomes[$key] = $e; // this item's own mistake: the others still run
                    }
                }
                return $requests === [] ? new Replies([]) : $this->send($model, $requests, $deadline);
            }, static function (Replies $replies): array {
                $answered = false;
                foreach ($replies->items as $item) {
                    $answered = $answered || $item instanceof Reply || $item->errorCode() !== null;
                }
                return [$replies->failure, $answered];
            });
            foreach ($replies->items as $key => $item) {
                $outcomes[$key] = $item instanceof Reply ? $item->outputs : $item;
            }
        } catch (TensorBridgeException $e) {
            // failed before these items were sent (circuit open, cannot connect or attach): safe to retry
            foreach ($listOfInputs as $key => $_) {
                $outcomes[$key] ??= $e;
            }
        }
        $ordered = [];
        foreach ($listOfInputs as $key => $_) {
            $ordered[$key] = $outcomes[$key];
        }
        return $ordered;
    }

    /**
     * Converts plain PHP inputs to tensors using the model's signature dtypes (fetched once).
     *
     * @param array<mixed> $inputs
     * @return array<string, Tensor>
     */
    private function tensors(string $model, array $inputs, Deadline $deadline): array
    {
        return Inputs::toTensors($model, $inputs, function (string $input) use ($model, $deadline): ?DType {
            if ($this->index === null) {
                $this->fetchModels($deadline);
            }
            return $this->index?->inputDtype($model, $input);
        });
    }

    /**
     * The classifier's k from the cached signature, when known (no round trip to learn it).
     */
    private function knownTopK(string $model): ?int
    {
        return Classification::kFromMetadata($this->index?->get($model));
    }

    /**
     * @return list<array<string, mixed>>
     */
    private function fetchModels(Deadline $deadline): array
    {
        $models = $this->transport->models($deadline);
        $this->index = ModelIndex::fromList($models);
        return $models;
    }
}
