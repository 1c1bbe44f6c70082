<?php

declare(strict_types=1);

namespace TensorBridge;

use TensorBridge\Exception\CircuitOpenException;
use TensorBridge\Exception\ConnectionException;
use TensorBridge\Exception\InvalidInputException;
use TensorBridge\Exception\PayloadTooLargeException;
use TensorBridge\Exception\ProtocolException;
use TensorBridge\Exception\TensorBridgeException;
use TensorBridge\Exception\TimeoutException;
use TensorBridge\Exception\UnauthorizedException;
use TensorBridge\Internal\AttachOk;
use TensorBridge\Internal\AttachRequest;
use TensorBridge\Internal\CircuitBreaker;
use TensorBridge\Internal\Classification;
use TensorBridge\Internal\Connection;
use TensorBridge\Internal\ErrorMapper;
use TensorBridge\Internal\ErrorReply;
use TensorBridge\Internal\FileBreakerStore;
use TensorBridge\Internal\FrameHeader;
use TensorBridge\Internal\InferRequest;
use TensorBridge\Internal\InferResponse;
use TensorBridge\Internal\MemoryBreakerStore;
use TensorBridge\Internal\Region;
use TensorBridge\Internal\TensorDescriptor;
use TensorBridge\Internal\Wire;

/**
 * Client for a `tensorbridge serve` process on the same host (Unix socket + shared-memory region).
 *
 * Not safe for concurrent use from several fibers; one Client per worker is the intended use.
 */
final class Client
{
    private const MAX_TIMEOUT_US = 4294967295;
    private const UNKNOWN_OUTPUT_SINGLE = 262144;
    private const UNKNOWN_OUTPUT_PIPELINED = 65536;

    private readonly string $socketPath;
    private ?Connection $conn = null;
    private ?Region $region = null;
    private int $regionCap = 0;
    /** true once this Client got a reply on the connection: stale frames of earlier users are behind us */
    private bool $synced = false;
    /** true until the first round trip on a (possibly reused) persistent connection succeeded */
    private bool $untested = false;
    private int $nextId;
    /** @var array<int, array{0: int, 1: int}> request id => region byte range [start, end) of requests we gave up on */
    private array $abandoned = [];
    /** @var array{queue_us: int, compute_us: int, preprocess_us: int, batch_size: int}|null */
    private ?array $lastTiming = null;
    /** @var array<string, array<string, mixed>>|null model metadata by name */
    private ?array $modelIndex = null;
    private ?string $lastNotice = null;
    private readonly CircuitBreaker $breaker;
    /** the deadline (hrtime ns) of the public call under way; bounds connection set-up retries */
    private int $callDeadline = 0;
    /** true once the call under way read a frame from the server (it is up) */
    private bool $answered = false;
    /** a connection-level failure that a batch call reported per item instead of throwing */
    private ?TensorBridgeException $callFailure = null;

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
     */
    public function __construct(
        ?string $socketPath = null,
        private readonly float $timeout = 1.0,
        private readonly bool $persistent = true,
        private readonly bool $checksums = false,
        private readonly int $spinMicros = 0,
        private readonly int $connectAttempts = 3,
        private readonly float $connectBackoff = 0.01,
        int $breakerThreshold = 5,
        float $breakerCoolDown = 5.0,
        ?string $breakerStateDir = null,
    ) {
        if (!($timeout > 0.0) || is_infinite($timeout)) {
            throw new \InvalidArgumentException('timeout must be a positive number of seconds');
        }
        if ($spinMicros < 0) {
            throw new \InvalidArgumentException('spinMicros must be >= 0');
        }
        if ($connectAttempts < 1) {
            throw new \InvalidArgumentException('connectAttempts must be >= 1 (1 = no retry)');
        }
        if (!($connectBackoff >= 0.0) || is_infinite($connectBackoff)) {
            throw new \InvalidArgumentException('connectBackoff must be a number of seconds >= 0');
        }
        $this->socketPath = $socketPath ?? self::defaultSocketPath();
        $this->nextId = random_int(1, 2 ** 40);
        $this->breaker = new CircuitBreaker(
            $breakerThreshold === 0
                ? new MemoryBreakerStore('off')
                : FileBreakerStore::forSocket($this->socketPath, $breakerStateDir),
            $this->socketPath,
            $breakerThreshold,
            $breakerCoolDown,
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
     * The socket path this client connects to.
     */
    public function socketPath(): string
    {
        return $this->socketPath;
    }

    /**
     * Checks that the server answers; returns its PONG JSON (server, version, protocol).
     *
     * @return array<string, mixed>
     */
    public function ping(): array
    {
        return $this->guard(function (): array {
            $body = $this->exchange(Wire::PING, null, $this->deadline(), '');
            return $this->decodeJson((string) $body, 'PONG');
        });
    }

    /**
     * Lists the loaded models with their signatures (spec §4.1); refreshes the cached signatures.
     *
     * @return list<array<string, mixed>>
     */
    public function models(): array
    {
        return $this->guard(fn (): array => $this->fetchModels($this->deadline()));
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
        return $this->guard(function () use ($model, $inputs): array {
            $deadline = $this->deadline();
            $tensors = $this->prepareInputs($model, $inputs, $deadline);
            [$answers, $failure] = $this->pipeline($model, [$tensors], $deadline, true);
            if ($failure !== null) {
                throw $failure;
            }
            if ($answers[0] instanceof TensorBridgeException) {
                throw $answers[0];
            }
            return $answers[0];
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
        return $this->guard(function () use ($model, $listOfInputs): array {
            if ($listOfInputs === []) {
                return [];
            }
            if (!array_is_list($listOfInputs)) {
                throw new InvalidInputException('inferMany() takes a list of input arrays');
            }
            $deadline = $this->deadline();
            $requests = [];
            foreach ($listOfInputs as $inputs) {
                if (!is_array($inputs)) {
                    throw new InvalidInputException('inferMany() takes a list of input arrays (input name => tensor)');
                }
                $requests[] = $this->prepareInputs($model, $inputs, $deadline);
            }
            $results = [];
            $firstError = null;
            foreach ($this->chunks($model, $requests, $deadline) as $chunk) {
                [$answers, $failure] = $this->pipeline($model, array_values($chunk), $deadline, false);
                if ($failure !== null) {
                    throw $failure;
                }
                foreach ($answers as $answer) {
                    if ($answer instanceof TensorBridgeException) {
                        $firstError ??= $answer;
                    } else {
                        $results[] = $answer;
                    }
                }
            }
            if ($firstError !== null) {
                throw $firstError;
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
        $this->region?->close();
        $this->region = null;
        $this->conn?->close();
        $this->conn = null;
        $this->abandoned = [];
        $this->synced = false;
    }

    public function __destruct()
    {
        $this->close();
    }

    /**
     * Runs one public call: consults the circuit breaker, translates failures at the one
     * boundary (lost connections/framing drop the connection) and tells the breaker the outcome.
     *
     * @template T
     * @param callable(): T $fn
     * @return T
     * @throws CircuitOpenException while the breaker is open (nothing is sent)
     */
    private function guard(callable $fn): mixed
    {
        $probe = $this->breaker->admit($this->timeout + 1.0);
        $this->answered = false;
        $this->callFailure = null;
        $this->callDeadline = $this->deadline();
        try {
            $result = $fn();
        } catch (ConnectionException | ProtocolException $e) {
            $this->settle($probe, $e);
            $this->dropConnection();
            throw $e;
        } catch (TensorBridgeException $e) {
            $this->settle($probe, $e);
            if ($this->conn !== null && !$this->conn->isOpen()) {
                $this->dropConnection();
            }
            throw $e;
        } catch (\Throwable $e) {
            $this->breaker->recordNeutral($probe);
            $this->dropConnection();
            throw $e;
        }
        $failure = $this->callFailure;
        $this->callFailure = null;
        $this->settle($probe, $failure);
        if ($failure instanceof ConnectionException || $failure instanceof ProtocolException) {
            $this->dropConnection();
        }
        return $result;
    }

    /**
     * Tells the breaker how the call ended: connection failures and timeouts count against the
     * server; any frame from it proves it is up; anything else (a local input error) says nothing.
     */
    private function settle(bool $probe, ?TensorBridgeException $e): void
    {
        $down = $e instanceof TimeoutException
            || ($e instanceof ConnectionException && !$e instanceof UnauthorizedException);
        if ($down) {
            // the first sentence: the CircuitOpenException message adds its own advice
            $this->breaker->recordFailure($probe, preg_split('/\.\s/', $e->getMessage(), 2)[0]);
        } elseif ($this->answered) {
            $this->breaker->recordSuccess($probe);
        } else {
            $this->breaker->recordNeutral($probe);
        }
    }

    private function deadline(): int
    {
        return hrtime(true) + (int) round($this->timeout * 1e9);
    }

    private function connection(): Connection
    {
        if ($this->conn === null || !$this->conn->isOpen()) {
            $this->dropConnection();
            $this->conn = Connection::open(
                $this->socketPath,
                $this->timeout,
                $this->persistent,
                $this->connectAttempts,
                $this->connectBackoff,
                $this->callDeadline > 0 ? $this->callDeadline : $this->deadline(),
            );
            $this->untested = $this->persistent;
            $this->synced = false;
        }
        return $this->conn;
    }

    private function dropConnection(): void
    {
        $this->region?->close();
        $this->region = null;
        $this->conn?->drop();
        $this->conn = null;
        $this->abandoned = [];
        $this->synced = false;
    }

    /**
     * One request/reply round trip for PING, MODELS or ATTACH.
     *
     * On a reused persistent connection the server may have restarted since: if the first round trip
     * fails because the peer is gone, reconnect once (these requests are idempotent; INFER never is retried).
     */
    private function exchange(int $type, ?AttachRequest $message, int $deadline, string $model): mixed
    {
        $retried = false;
        while (true) {
            $conn = $this->connection();
            $retryable = $this->untested && !$retried;
            $id = $this->nextId++;
            try {
                $frame = Wire::encodeFrame($type, $id, Wire::encodeBody($type, $message), $this->checksums);
                $conn->send($frame, $deadline);
                $reply = $this->awaitReply($id, $deadline, $model);
                $this->untested = false;
                return $reply;
            } catch (ConnectionException $e) {
                $this->dropConnection();
                if (!$retryable || $e instanceof UnauthorizedException) {
                    throw $e;
                }
                $retried = true;
            } catch (TimeoutException $e) {
                if ($type === Wire::ATTACH) {
                    // a late ATTACH_OK would be followed by a descriptor: do not keep such a connection
                    $this->dropConnection();
                } elseif ($conn->isOpen()) {
                    $this->abandoned[$id] = [0, 0];
                }
                throw $e;
            }
        }
    }

    /**
     * Reads frames until the reply to $id; returns its decoded body (ERROR replies are thrown).
     */
    private function awaitReply(int $id, int $deadline, string $model): mixed
    {
        while (true) {
            $frame = $this->nextFrame($deadline);
            if ($frame === null) {
                continue;
            }
            [$header, $body] = $frame;
            if ($header->requestId === $id) {
                $regionSize = $header->type === Wire::INFER_OK ? $this->region?->size : null;
                $decoded = Wire::decodeBody($header, $body, $regionSize);
                $this->synced = true;
                foreach ($this->abandoned as $old => $_) {
                    if ($old < $id) {
                        unset($this->abandoned[$old]); // replies come in order: earlier requests are finished
                    }
                }
                if ($decoded instanceof ErrorReply) {
                    if (ErrorMapper::closesConnection($decoded)) {
                        $this->dropConnection();
                    }
                    throw ErrorMapper::toException($decoded, $model, $this->timeout);
                }
                if ($decoded instanceof AttachOk) {
                    $this->installRegion($decoded, $deadline);
                }
                return $decoded;
            }
            if (!$this->synced) {
                $this->skipStale($header, $deadline); // a late reply meant for an earlier user of this connection
                continue;
            }
            $this->conn?->drop();
            throw new ProtocolException(sprintf(
                'unexpected %s reply for request id %d while waiting for %d',
                Wire::TYPE_NAMES[$header->type],
                $header->requestId,
                $id,
            ));
        }
    }

    /**
     * Reads the next frame; returns null when it was a late reply to an abandoned request (now dropped).
     *
     * @return array{0: FrameHeader, 1: string}|null
     */
    private function nextFrame(int $deadline): ?array
    {
        [$header, $body] = $this->connection()->readFrame($deadline, $this->spinMicros);
        $this->answered = true;
        $rid = $header->requestId;
        if (isset($this->abandoned[$rid])) {
            unset($this->abandoned[$rid]);
            $this->skipStale($header, $deadline);
            return null;
        }
        if ($header->type === Wire::ERROR && $rid === 0) {
            $error = Wire::decodeBody($header, $body);
            $this->dropConnection();
            $error = $error instanceof ErrorReply ? $error : new ErrorReply(7, 'connection error');
            throw ErrorMapper::toException($error, '', $this->timeout);
        }
        return [$header, $body];
    }

    private function skipStale(FrameHeader $header, int $deadline): void
    {
        if ($header->type === Wire::ATTACH_OK) {
            $fd = $this->connection()->receiveDescriptor($deadline);
            @fclose($fd);
        }
    }

    private function installRegion(AttachOk $ok, int $deadline): void
    {
        $fd = $this->connection()->receiveDescriptor($deadline);
        $old = $this->region;
        $this->region = Region::fromStream($fd, $ok->regionSize);
        $this->regionCap = $ok->regionCap;
        $old?->close();
    }

    /**
     * Waits (within the deadline) until every abandoned request has been answered.
     */
    private function drain(int $deadline): void
    {
        while ($this->abandoned !== []) {
            $frame = $this->nextFrame($deadline);
            if ($frame === null) {
                continue;
            }
            [$header] = $frame;
            if (!$this->synced) {
                $this->skipStale($header, $deadline);
                continue;
            }
            $this->conn?->drop();
            throw new ProtocolException(sprintf('unexpected reply for request id %d', $header->requestId));
        }
    }

    /**
     * (Re-)attaches the region with at least $minRegion bytes (spec §5.1); no request may be in flight.
     */
    private function attach(int $minRegion, int $deadline): void
    {
        $this->connection();
        $this->drain($deadline);
        $request = new AttachRequest($this->checksums ? Wire::OPT_CRC : 0, $minRegion);
        $this->exchange(Wire::ATTACH, $request, $deadline, '');
        if ($this->region === null || $this->region->size < $minRegion) {
            throw new ProtocolException(sprintf(
                'the server attached a %d-byte region, smaller than the %d bytes asked for',
                $this->region?->size ?? 0,
                $minRegion,
            ));
        }
    }

    /**
     * Returns the region offset where $need bytes may be used, attaching or draining as needed.
     */
    private function allocate(int $need, int $deadline): int
    {
        if ($this->region === null) {
            $this->attach($need, $deadline);
        }
        $busyEnd = 0;
        foreach ($this->abandoned as [, $end]) {
            $busyEnd = max($busyEnd, self::align($end));
        }
        if ($busyEnd + $need <= $this->region->size) {
            return $busyEnd;
        }
        if ($this->abandoned !== []) {
            $this->drain($deadline);
        }
        if ($need <= $this->region->size) {
            return 0;
        }
        if ($this->regionCap > 0 && $need > $this->regionCap) {
            throw new PayloadTooLargeException(sprintf(
                'the request needs %d bytes of shared region but the server caps regions at %d bytes'
                . ' (raise the server\'s region cap or send smaller batches)',
                $need,
                $this->regionCap,
            ), 'PAYLOAD_TOO_LARGE');
        }
        $this->attach($need, $deadline);
        return 0;
    }

    /**
     * Splits requests into groups whose region footprint fits the region (each group is one pipeline).
     *
     * @template K of array-key
     * @param array<K, array<string, Tensor>> $requests
     * @return list<array<K, array<string, Tensor>>>
     */
    private function chunks(string $model, array $requests, int $deadline): array
    {
        if ($requests === []) {
            return [];
        }
        if ($this->region === null) {
            $this->attach(0, $deadline);
        }
        $limit = max($this->region?->size ?? 0, $this->regionCap);
        $chunks = [];
        $chunk = [];
        $chunkBytes = 0;
        foreach ($requests as $key => $tensors) {
            $bytes = $this->footprint($model, $tensors, false);
            if ($chunk !== [] && $chunkBytes + $bytes > $limit) {
                $chunks[] = $chunk;
                $chunk = [];
                $chunkBytes = 0;
            }
            $chunk[$key] = $tensors;
            $chunkBytes += $bytes;
        }
        $chunks[] = $chunk;
        return $chunks;
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
            $this->guard(function () use ($model, $listOfInputs, &$outcomes): void {
                $deadline = $this->deadline();
                $requests = [];
                foreach ($listOfInputs as $key => $inputs) {
                    if (!is_array($inputs)) {
                        $outcomes[$key] = new InvalidInputException(sprintf(
                            'batch item %s is %s; pass an array of inputs (input name => tensor)',
                            var_export($key, true),
                            get_debug_type($inputs),
                        ));
                    }
                }
                foreach ($listOfInputs as $key => $inputs) {
                    if (!is_array($inputs)) {
                        continue;
                    }
                    try {
                        $requests[$key] = $this->prepareInputs($model, $inputs, $deadline);
                    } catch (InvalidInputException $e) {
                        $outcomes[$key] = $e; // this item's own mistake: the others still run
                    }
                }
                $failure = null;
                foreach ($this->chunks($model, $requests, $deadline) as $chunk) {
                    $keys = array_keys($chunk);
                    if ($failure !== null) {
                        foreach ($keys as $key) {
                            $outcomes[$key] = self::notSent($failure, $key);
                        }
                        continue;
                    }
                    try {
                        [$answers, $failure] = $this->pipeline($model, array_values($chunk), $deadline, false);
                    } catch (PayloadTooLargeException $e) {
                        // Raised before anything of this chunk was sent (a chunk this large holds one
                        // item): that item's own problem, so the later chunks still run.
                        foreach ($keys as $key) {
                            $outcomes[$key] = $e;
                        }
                        continue;
                    }
                    foreach ($keys as $i => $key) {
                        $outcomes[$key] = $answers[$i] ?? self::unanswered($failure, $key, $model);
                    }
                }
                $this->callFailure = $failure;
            });
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
     * The error of a batch item that was sent but not answered (the connection failed or the deadline passed).
     */
    private static function unanswered(
        ?TensorBridgeException $failure,
        int|string $key,
        string $model,
    ): TensorBridgeException {
        $failure ??= new ProtocolException(sprintf('model "%s" did not answer batch item %s', $model, $key));
        $message = sprintf(
            'batch item %s was sent but not answered: %s',
            var_export($key, true),
            $failure->getMessage(),
        );
        return match (true) {
            $failure instanceof TimeoutException
                => new TimeoutException($message, $failure->getTimeout(), null, $failure),
            $failure instanceof ConnectionException => new ConnectionException($message, null, $failure),
            default => new ProtocolException($message, null, $failure),
        };
    }

    /**
     * The error of a batch item that was never sent because the batch failed earlier.
     */
    private static function notSent(TensorBridgeException $failure, int|string $key): TensorBridgeException
    {
        $message = sprintf(
            'batch item %s was not sent (safe to retry): an earlier part of the batch failed: %s',
            var_export($key, true),
            $failure->getMessage(),
        );
        return $failure instanceof TimeoutException
            ? new TimeoutException($message, $failure->getTimeout(), null, $failure)
            : new ConnectionException($message, null, $failure);
    }

    /**
     * Lays out, sends and collects a pipeline of INFER requests.
     *
     * Returns every answer read (outputs, or the server's error for that request) by request index,
     * and the failure that ended the pipeline early (connection lost, framing lost, deadline passed),
     * after which the remaining requests have no answer. Such requests were sent and may have run;
     * they are never re-sent. Throws only when nothing was sent.
     *
     * @param list<array<string, Tensor>> $requests
     * @return array{0: array<int, array<string, Tensor>|TensorBridgeException>, 1: TensorBridgeException|null}
     */
    private function pipeline(string $model, array $requests, int $deadline, bool $single): array
    {
        $need = 0;
        $outAreas = [];
        foreach ($requests as $i => $tensors) {
            $outAreas[$i] = $this->outputArea($model, $tensors, $single);
            $need += $this->inputBytes($tensors) + $outAreas[$i];
        }
        $base = $this->allocate($need, $deadline);
        $region = $this->region;
        $cursor = $base;
        $plans = [];
        foreach ($requests as $i => $tensors) {
            $start = $cursor;
            $descriptors = [];
            foreach ($tensors as $name => $tensor) {
                $bytes = $tensor->bytes();
                $region->write($cursor, $bytes);
                $descriptors[] = new TensorDescriptor(
                    (string) $name,
                    $tensor->dtypeEnum(),
                    $tensor->shape(),
                    0,
                    $cursor,
                    strlen($bytes),
                    $this->checksums ? Wire::crc32c($bytes) : 0,
                );
                $cursor = self::align($cursor + strlen($bytes));
            }
            $outOffset = $cursor;
            $capacity = min($outAreas[$i], $region->size - $outOffset);
            $cursor = self::align($outOffset + $capacity);
            $plans[] = [$this->nextId++, $start, min($cursor, $region->size), $outOffset, $capacity, $descriptors];
        }

        $timeoutUs = (int) max(1, min(self::MAX_TIMEOUT_US, intdiv($deadline - hrtime(true), 1000)));
        $frames = '';
        foreach ($plans as [$id, , , $outOffset, $capacity, $descriptors]) {
            $request = new InferRequest($timeoutUs, $model, $outOffset, $capacity, $descriptors);
            $body = Wire::encodeBody(Wire::INFER, $request);
            $frames .= Wire::encodeFrame(Wire::INFER, $id, $body, $this->checksums);
        }
        $conn = $this->connection();
        try {
            $conn->send($frames, $deadline);
        } catch (TimeoutException $e) {
            if ($conn->isOpen()) {
                throw $e; // not a byte was sent: the connection is intact and nothing is in flight
            }
            return [[], $this->inFlight($e, $model, count($plans))];
        } catch (ConnectionException $e) {
            return [[], $this->inFlight($e, $model, count($plans))];
        }

        $answers = [];
        foreach ($plans as $k => [$id, , , $outOffset, $capacity]) {
            try {
                $reply = $this->awaitReply($id, $deadline, $model);
                if (!$reply instanceof InferResponse) {
                    throw new ProtocolException('the server answered INFER with a ' . get_debug_type($reply));
                }
                $this->lastTiming = [
                    'queue_us' => $reply->queueUs,
                    'compute_us' => $reply->computeUs,
                    'preprocess_us' => $reply->preprocessUs,
                    'batch_size' => $reply->batchSize,
                ];
                $answers[$k] = $this->readOutputs($reply, $outOffset, $capacity);
            } catch (TensorBridgeException $e) {
                if ($e->getErrorCode() !== null && $conn->isOpen()) {
                    $answers[$k] = $e; // the server's answer to this request; the others carry on
                    continue;
                }
                if ($e instanceof TimeoutException && $conn->isOpen()) {
                    foreach (array_slice($plans, $k) as [$lateId, $start, $end]) {
                        $this->abandoned[$lateId] = [$start, $end];
                    }
                    return [$answers, new TimeoutException(sprintf(
                        'inference on model "%s" timed out after %.3f s; the server may still finish it'
                        . ' (its late reply will be discarded). Raise the timeout or check the server load.',
                        $model,
                        $this->timeout,
                    ), $this->timeout, null, $e)];
                }
                if ($e instanceof ConnectionException && !$e instanceof UnauthorizedException) {
                    return [$answers, $this->inFlight($e, $model, count($plans) - $k)];
                }
                return [$answers, $e];
            }
        }
        return [$answers, null];
    }

    /**
     * A connection failure while requests were in flight: says that they were not re-sent.
     */
    private function inFlight(TensorBridgeException $e, string $model, int $count): ConnectionException
    {
        return new ConnectionException(sprintf(
            '%s while %s to model "%s" %s in flight. %s not re-sent (%s may have run);'
            . ' retry only if running it twice is harmless.',
            rtrim($e->getMessage(), '.'),
            $count === 1 ? 'a request' : $count . ' requests',
            $model,
            $count === 1 ? 'was' : 'were',
            $count === 1 ? 'It was' : 'They were',
            $count === 1 ? 'it' : 'they',
        ), $e->getErrorCode(), $e);
    }

    /**
     * @return array<string, Tensor>
     */
    private function readOutputs(InferResponse $reply, int $outOffset, int $capacity): array
    {
        $outputs = [];
        foreach ($reply->outputs as $d) {
            if ($d->location === 0) {
                $areaEnd = $outOffset + $capacity;
                if ($d->offset < $outOffset || $d->offset > $areaEnd || $d->nbytes > $areaEnd - $d->offset) {
                    throw new ProtocolException(sprintf(
                        'output "%s" at region bytes [%d, +%d) lies outside the output area [%d, +%d)',
                        $d->name,
                        $d->offset,
                        $d->nbytes,
                        $outOffset,
                        $capacity,
                    ));
                }
                $bytes = $this->region->read($d->offset, $d->nbytes);
            } else {
                $bytes = substr($reply->inline, $d->offset, $d->nbytes);
            }
            if ($this->checksums && Wire::crc32c($bytes) !== $d->crc32c) {
                throw new ProtocolException(sprintf('checksum mismatch on output "%s"', $d->name));
            }
            try {
                $outputs[$d->name] = Tensor::fromBytes($bytes, $d->dtype, $d->shape);
            } catch (InvalidInputException $e) {
                $message = sprintf('output "%s" is malformed: %s', $d->name, $e->getMessage());
                throw new ProtocolException($message, null, $e);
            }
        }
        return $outputs;
    }

    /**
     * Region bytes one request needs: its inputs (64-byte aligned) plus its output area.
     *
     * @param array<string, Tensor> $tensors
     */
    private function footprint(string $model, array $tensors, bool $single): int
    {
        return $this->inputBytes($tensors) + $this->outputArea($model, $tensors, $single);
    }

    /**
     * @param array<string, Tensor> $tensors
     */
    private function inputBytes(array $tensors): int
    {
        $in = 0;
        foreach ($tensors as $t) {
            $in += self::align($t->nbytes());
        }
        return $in;
    }

    /**
     * The output area to offer: exact when the cached signature tells, else a bounded guess
     * (outputs that do not fit come back inline). It is bounded rather than "the rest of the
     * region" so that a timed-out request does not keep the whole region busy.
     *
     * @param array<string, Tensor> $tensors
     */
    private function outputArea(string $model, array $tensors, bool $single): int
    {
        $out = $this->estimateOutputs($model, $tensors);
        if ($out !== null) {
            return $out;
        }
        $in = $this->inputBytes($tensors);
        $out = max($in, $single ? self::UNKNOWN_OUTPUT_SINGLE : self::UNKNOWN_OUTPUT_PIPELINED);
        if ($this->regionCap > 0 && $in + $out > $this->regionCap) {
            $out = max($this->regionCap - $in, Wire::ALIGN);
        }
        return $out;
    }

    /**
     * Output bytes from the cached signature when every output shape is known once the batch
     * dimension is substituted; null when unknown.
     *
     * @param array<string, Tensor> $tensors
     */
    private function estimateOutputs(string $model, array $tensors): ?int
    {
        $meta = $this->modelIndex[$model] ?? null;
        if (!is_array($meta) || !is_array($meta['outputs'] ?? null) || $meta['outputs'] === []) {
            return null;
        }
        $batch = null;
        foreach ((array) ($meta['inputs'] ?? []) as $sig) {
            $shape = $sig['shape'] ?? null;
            $name = $sig['name'] ?? null;
            if (is_array($shape) && ($shape[0] ?? null) === -1 && is_string($name) && isset($tensors[$name])) {
                $batch = $tensors[$name]->shape()[0] ?? null;
                break;
            }
        }
        $total = 0;
        foreach ($meta['outputs'] as $sig) {
            $dtype = is_string($sig['datatype'] ?? null) ? DType::tryFromName($sig['datatype']) : null;
            $shape = $sig['shape'] ?? null;
            if ($dtype === null || $dtype === DType::BYTES || !is_array($shape)) {
                return null;
            }
            $count = 1;
            foreach ($shape as $i => $dim) {
                if ($dim === -1 && $i === 0 && $batch !== null) {
                    $dim = $batch;
                }
                if (!is_int($dim) || $dim < 0) {
                    return null;
                }
                $count *= $dim;
            }
            $total += self::align($count * $dtype->itemSize());
        }
        return max($total, Wire::ALIGN);
    }

    /**
     * Converts plain PHP inputs to tensors using the model's signature dtypes.
     *
     * @param array<mixed> $inputs
     * @return array<string, Tensor>
     */
    private function prepareInputs(string $model, array $inputs, int $deadline): array
    {
        if ($inputs === []) {
            throw new InvalidInputException(sprintf('infer("%s") needs at least one input', $model));
        }
        $out = [];
        foreach ($inputs as $name => $value) {
            if (!is_string($name) || $name === '') {
                throw new InvalidInputException(sprintf(
                    'inputs must be keyed by input name (e.g. ["input" => $rows]); got key %s',
                    var_export($name, true),
                ));
            }
            if ($value instanceof Tensor) {
                $out[$name] = $value;
                continue;
            }
            if (!is_array($value) && !is_int($value) && !is_float($value) && !is_bool($value) && !is_string($value)) {
                throw new InvalidInputException(sprintf(
                    'input "%s" is %s; pass a Tensor, a (nested) array or a scalar',
                    $name,
                    get_debug_type($value),
                ));
            }
            $dtype = $this->signatureDtype($model, $name, $deadline) ?? self::guessDtype($value);
            try {
                $out[$name] = Tensor::fromArray($value, $dtype);
            } catch (InvalidInputException $e) {
                throw new InvalidInputException(sprintf('input "%s": %s', $name, $e->getMessage()), null, $e);
            }
        }
        return $out;
    }

    /**
     * The classifier's k from the cached signature, when known (no round trip to learn it).
     */
    private function knownTopK(string $model): ?int
    {
        $meta = $this->modelIndex[$model] ?? null;
        return Classification::kFromMetadata(is_array($meta) ? $meta : null);
    }

    private function signatureDtype(string $model, string $input, int $deadline): ?DType
    {
        if ($this->modelIndex === null) {
            $this->fetchModels($deadline);
        }
        foreach ((array) ($this->modelIndex[$model]['inputs'] ?? []) as $sig) {
            if (is_array($sig) && ($sig['name'] ?? null) === $input && is_string($sig['datatype'] ?? null)) {
                return DType::tryFromName($sig['datatype']);
            }
        }
        return null;
    }

    private static function guessDtype(mixed $value): DType
    {
        while (is_array($value) && $value !== []) {
            $value = $value[array_key_first($value)];
        }
        return match (true) {
            is_int($value) => DType::INT64,
            is_bool($value) => DType::BOOL,
            is_string($value) => DType::BYTES,
            default => DType::FP32,
        };
    }

    /**
     * @return list<array<string, mixed>>
     */
    private function fetchModels(int $deadline): array
    {
        $json = $this->decodeJson((string) $this->exchange(Wire::MODELS, null, $deadline, ''), 'MODELS_OK');
        $models = $json['models'] ?? null;
        if (!is_array($models) || !array_is_list($models)) {
            throw new ProtocolException('MODELS_OK JSON has no "models" list');
        }
        $index = [];
        foreach ($models as $m) {
            if (is_array($m) && is_string($m['name'] ?? null)) {
                $index[$m['name']] = $m;
            }
        }
        $this->modelIndex = $index;
        return $models;
    }

    /**
     * @return array<string, mixed>
     */
    private function decodeJson(string $body, string $what): array
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

    private static function align(int $n): int
    {
        return ($n + Wire::ALIGN - 1) & ~(Wire::ALIGN - 1);
    }
}
