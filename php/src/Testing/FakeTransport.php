<?php

declare(strict_types=1);

namespace TensorBridge\Testing;

use TensorBridge\ErrorCode;
use TensorBridge\Exception\ConnectionException;
use TensorBridge\Exception\InvalidInputException;
use TensorBridge\Exception\TensorBridgeException;
use TensorBridge\Exception\TimeoutException;
use TensorBridge\Internal\ErrorMapper;
use TensorBridge\Internal\ErrorReply;
use TensorBridge\Internal\Inputs;
use TensorBridge\Tensor;
use TensorBridge\Transport\Deadline;
use TensorBridge\Transport\Replies;
use TensorBridge\Transport\Reply;
use TensorBridge\Transport\Transport;

/**
 * An in-memory transport for an application's own tests: program it with answers and errors,
 * hand it to `new Client(transport: $fake)`, run the code under test, then look at calls().
 *
 * ```php
 * $fake = (new FakeTransport())
 *     ->answer('digits', ['logits' => Tensor::fromArray([[0.1, 0.9]], 'float32')])
 *     ->answer('echo', fn (array $inputs): array => $inputs)
 *     ->fail('broken', FakeTransport::serverError(ErrorCode::MODEL_ERROR, 'ValueError: boom', 'broken'));
 * $client = new Client(transport: $fake);
 * ```
 *
 * Replies name the pinned version, else version 1, as a server without a repository does.
 * Each inference request is answered on its own, in order, like the real server: an error that
 * a handler throws (or fail()/failNext() sets) fails that request only, except a client-side
 * ConnectionException or TimeoutException, which ends the call as a lost connection would (the
 * remaining requests of a batch get it too). A model with neither answer nor fail() is not
 * loaded: ModelNotFoundException, as from the server.
 */
final class FakeTransport implements Transport
{
    /** @var array<string, \Closure(array<string, Tensor>, string): array<string, mixed>> model => handler */
    private array $handlers = [];
    /** @var array<string, array<string, mixed>> model => metadata that models() lists */
    private array $metadata = [];
    /** @var list<TensorBridgeException> errors for the next requests, first in first out */
    private array $nextErrors = [];
    /** @var list<FakeCall> */
    private array $calls = [];

    /**
     * @param string $endpoint what endpoint() reports (messages, circuit-breaker key)
     */
    public function __construct(private readonly string $endpoint = 'fake://tensorbridge')
    {
    }

    /**
     * Serves $model: every request gets these outputs, or what the callable returns for its inputs.
     *
     * Outputs are Tensors or plain PHP values (converted like inputs: ints INT64, floats FP32,
     * strings BYTES, bools BOOL). A callable may throw any TensorBridgeException to fail that request.
     *
     * @param array<string, Tensor|array<mixed>|int|float|bool|string>|\Closure $outputs fixed outputs, or
     *        fn (array<string, Tensor> $inputs, string $model): array (output name => value)
     * @param array<string, mixed> $metadata what models() lists for it beside its name (spec §4.1), e.g.
     *        ['inputs' => [['name' => 'input', 'datatype' => 'FP32', 'shape' => [-1, 64]]], 'outputs' => [...]];
     *        the Client converts plain-array inputs with the dtypes declared here. Missing inputs or
     *        outputs are listed as null: any names, types and shapes; missing versions as
     *        [['version' => 1, 'state' => 'ready']] (a pinned version not listed is not found).
     */
    public function answer(string $model, array|\Closure $outputs, array $metadata = []): self
    {
        $this->handlers[$model] = $outputs instanceof \Closure ? $outputs : static fn (): array => $outputs;
        $this->metadata[$model] = ['name' => $model] + $metadata
            + ['inputs' => null, 'outputs' => null, 'versions' => [['version' => 1, 'state' => 'ready']]];
        return $this;
    }

    /**
     * Every request to $model fails with $error (any TensorBridgeException; see serverError()).
     *
     * @param array<string, mixed> $metadata what models() lists for it, as for answer()
     */
    public function fail(string $model, TensorBridgeException $error, array $metadata = []): self
    {
        return $this->answer($model, static fn (): never => throw $error, $metadata);
    }

    /**
     * The next request of any kind (infer, models, ping) fails with $error, whatever its model;
     * queued errors are used first in, first out, then answering resumes.
     */
    public function failNext(TensorBridgeException $error): self
    {
        $this->nextErrors[] = $error;
        return $this;
    }

    /**
     * The exception the real transport raises when the server answers with this error code,
     * with the same class, code and message shape.
     *
     * @param string $model the model the request was for
     * @param float $timeout the call's timeout (DEADLINE_EXCEEDED messages show it)
     */
    public static function serverError(
        ErrorCode $code,
        string $message,
        string $model = '',
        float $timeout = 1.0,
    ): TensorBridgeException {
        return ErrorMapper::toException(new ErrorReply($code->value, $message), $model, $timeout);
    }

    /**
     * Every request received so far, oldest first.
     *
     * @return list<FakeCall>
     */
    public function calls(): array
    {
        return $this->calls;
    }

    /**
     * The inputs of every inference request to $model so far, oldest first.
     *
     * @return list<array<string, Tensor>>
     */
    public function requests(string $model): array
    {
        $out = [];
        foreach ($this->calls as $call) {
            if ($call->op === 'infer' && $call->model === $model) {
                $out[] = $call->inputs;
            }
        }
        return $out;
    }

    public function endpoint(): string
    {
        return $this->endpoint;
    }

    public function ping(Deadline $deadline): array
    {
        $this->record('ping', $deadline);
        $this->throwQueued();
        return ['server' => 'tensorbridge', 'version' => 'fake', 'protocol' => 1];
    }

    public function models(Deadline $deadline): array
    {
        $this->record('models', $deadline);
        $this->throwQueued();
        return array_values($this->metadata);
    }

    public function infer(
        string $model,
        array $requests,
        Deadline $deadline,
        ?int $version = null,
        ?string $routingKey = null,
    ): Replies {
        $items = [];
        $failure = null;
        foreach ($requests as $key => $inputs) {
            if ($failure !== null) {
                $items[$key] = $failure;
                continue;
            }
            $this->calls[] = new FakeCall('infer', $model, $inputs, $deadline->timeout, $version, $routingKey);
            try {
                $this->throwQueued();
                $items[$key] = new Reply($this->run($model, $inputs, $version), [
                    'queue_us' => 0,
                    'compute_us' => 0,
                    'preprocess_us' => 0,
                    'batch_size' => self::rows($inputs),
                    'version' => $version ?? 1,
                ]);
            } catch (TensorBridgeException $e) {
                $items[$key] = $e;
                $lost = $e->errorCode() === null
                    && ($e instanceof ConnectionException || $e instanceof TimeoutException);
                if ($lost) {
                    if (count($items) === 1) {
                        throw $e; // as when the real transport cannot send at all
                    }
                    $failure = $e;
                }
            }
        }
        return new Replies($items, $failure);
    }

    public function close(): void
    {
    }

    /**
     * @param array<string, Tensor> $inputs
     * @return array<string, Tensor>
     */
    private function run(string $model, array $inputs, ?int $version): array
    {
        $handler = $this->handlers[$model] ?? null;
        if ($handler === null) {
            $names = array_map(static fn (string $n): string => "'$n'", array_keys($this->handlers));
            throw self::serverError(ErrorCode::MODEL_NOT_FOUND, sprintf(
                "model '%s' is not loaded; loaded models: [%s]",
                $model,
                implode(', ', $names),
            ), $model);
        }
        $versions = array_column((array) ($this->metadata[$model]['versions'] ?? []), 'version');
        if ($version !== null && !in_array($version, $versions, true)) {
            throw self::serverError(ErrorCode::MODEL_NOT_FOUND, sprintf(
                "model '%s' has no version %d; versions: [%s]",
                $model,
                $version,
                implode(', ', $versions),
            ), $model);
        }
        $outputs = [];
        foreach ($handler($inputs, $model) as $name => $value) {
            if (!is_string($name) || $name === '') {
                throw new \UnexpectedValueException(sprintf(
                    'the FakeTransport answer for "%s" must be keyed by output name; got key %s',
                    $model,
                    var_export($name, true),
                ));
            }
            try {
                $outputs[$name] = $value instanceof Tensor
                    ? $value
                    : Tensor::fromArray($value, Inputs::guessDtype($value));
            } catch (InvalidInputException $e) {
                throw new \UnexpectedValueException(sprintf(
                    'the FakeTransport answer for "%s" has a bad output "%s": %s',
                    $model,
                    $name,
                    $e->getMessage(),
                ), 0, $e);
            }
        }
        return $outputs;
    }

    private function record(string $op, Deadline $deadline): void
    {
        $this->calls[] = new FakeCall($op, '', [], $deadline->timeout);
    }

    private function throwQueued(): void
    {
        $error = array_shift($this->nextErrors);
        if ($error !== null) {
            throw $error;
        }
    }

    /**
     * @param array<string, Tensor> $inputs
     */
    private static function rows(array $inputs): int
    {
        foreach ($inputs as $tensor) {
            return $tensor->shape()[0] ?? 1;
        }
        return 1;
    }
}
