<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

use TensorBridge\DType;
use TensorBridge\Exception\CircuitOpenException;
use TensorBridge\Exception\ConnectionException;
use TensorBridge\Exception\InvalidInputException;
use TensorBridge\Exception\TensorBridgeException;
use TensorBridge\Exception\TimeoutException;
use TensorBridge\Exception\UnauthorizedException;
use TensorBridge\Tensor;
use TensorBridge\Transport\Deadline;
use TensorBridge\Transport\Replies;
use TensorBridge\Transport\Reply;
use TensorBridge\Transport\Transport;

/**
 * How the Client's public calls run: each one under the circuit breaker with its own deadline,
 * inputs converted with the model's signature (fetched once), requests sent through the
 * transport, and batches answered item by item.
 *
 * @internal
 */
final class Calls
{
    /** @var array{queue_us: int, compute_us: int, preprocess_us: int, batch_size: int, version: int}|null */
    private ?array $lastTiming = null;
    /** the models the server listed last: signature dtypes, input names and classifier k without a round trip */
    private ?ModelIndex $index = null;

    public function __construct(
        public readonly Transport $transport,
        public readonly CircuitBreaker $breaker,
        private readonly float $timeout,
    ) {
    }

    /**
     * The timing of the last answered inference (see Client::lastTiming()).
     *
     * @return array{queue_us: int, compute_us: int, preprocess_us: int, batch_size: int, version: int}|null
     */
    public function lastTiming(): ?array
    {
        return $this->lastTiming;
    }

    /**
     * The models the server listed last; null before the first listing.
     */
    public function index(): ?ModelIndex
    {
        return $this->index;
    }

    /**
     * Lists the models (one guarded call) and remembers their signatures.
     *
     * @return list<array<string, mixed>>
     */
    public function models(): array
    {
        return $this->guard(fn (Deadline $deadline): array => $this->fetchModels($deadline));
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
    public function guard(\Closure $fn, ?\Closure $verdict = null): mixed
    {
        $probe = $this->breaker->admit($this->timeout + 1.0);
        try {
            $result = $fn(Deadline::in($this->timeout));
        } catch (\Throwable $e) {
            $this->settleThrown($probe, $e);
        }
        [$failure, $answered] = $verdict === null ? [null, true] : $verdict($result);
        $this->settle($probe, $failure, $answered);
        return $result;
    }

    /**
     * Client::infer(): one request, guarded as guard() does, without a closure per call.
     *
     * @param array<mixed> $inputs
     * @return array<string, Tensor>
     */
    public function infer(string $model, array $inputs, ?int $version, ?string $routingKey): array
    {
        $probe = $this->breaker->admit($this->timeout + 1.0);
        try {
            $deadline = Deadline::in($this->timeout);
            if ($version !== null || $routingKey !== null) {
                Inputs::checkRoute($version, $routingKey);
            }
            $tensors = $this->tensors($model, $inputs, $deadline);
            $replies = $this->transport->infer($model, [$tensors], $deadline, $version, $routingKey);
            $answer = $replies->items[0];
            if ($answer instanceof Reply) {
                $this->lastTiming = $answer->timing;
            }
            if ($replies->failure !== null) {
                throw $replies->failure;
            }
            if ($answer instanceof TensorBridgeException) {
                throw $answer;
            }
        } catch (\Throwable $e) {
            $this->settleThrown($probe, $e);
        }
        $this->settle($probe, null, true);
        return $answer->outputs;
    }

    /**
     * Tells the breaker how a call that threw ended (see guard()), then rethrows.
     */
    private function settleThrown(bool $probe, \Throwable $e): never
    {
        if ($e instanceof TensorBridgeException) {
            $this->settle($probe, $e, $e->errorCode() !== null);
        } else {
            $this->breaker->recordNeutral($probe);
        }
        throw $e;
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
    public function send(
        string $model,
        array $requests,
        Deadline $deadline,
        ?int $version,
        ?string $routingKey,
    ): Replies {
        $replies = $this->transport->infer($model, $requests, $deadline, $version, $routingKey);
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
    public function runBatch(string $model, array $listOfInputs, ?int $version, ?string $routingKey): array
    {
        $outcomes = [];
        try {
            $replies = $this->guard(function (Deadline $deadline) use (
                $model,
                $listOfInputs,
                $version,
                $routingKey,
                &$outcomes,
            ): Replies {
                Inputs::checkRoute($version, $routingKey);
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
                return $requests === []
                    ? new Replies([])
                    : $this->send($model, $requests, $deadline, $version, $routingKey);
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
    public function tensors(string $model, array $inputs, Deadline $deadline): array
    {
        if (Inputs::allTensors($inputs)) {
            return $inputs; // nothing to convert: no signature needed
        }
        return Inputs::toTensors($model, $inputs, function (string $input) use ($model, $deadline): ?DType {
            if ($this->index === null) {
                $this->fetchModels($deadline);
            }
            return $this->index?->inputDtype($model, $input);
        });
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
