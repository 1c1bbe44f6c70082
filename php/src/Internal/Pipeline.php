<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

use TensorBridge\Exception\ConnectionException;
use TensorBridge\Exception\PayloadTooLargeException;
use TensorBridge\Exception\ProtocolException;
use TensorBridge\Exception\TensorBridgeException;
use TensorBridge\Exception\TimeoutException;
use TensorBridge\Exception\UnauthorizedException;
use TensorBridge\Tensor;
use TensorBridge\Transport\Deadline;
use TensorBridge\Transport\Replies;
use TensorBridge\Transport\Reply;

/**
 * Sends groups of INFER requests on one session, pipelined (spec §8): all inputs are written and
 * all requests sent before the replies are read. Requests that do not fit in the region together
 * go in several rounds. A request that was sent is never re-sent; each one gets its own answer
 * or the reason it has none.
 *
 * @internal
 */
final class Pipeline
{
    /** the largest timeout_us an INFER carries (u32, spec §6.1) */
    private const MAX_TIMEOUT_US = 4294967295;

    public function __construct(private readonly Session $session)
    {
    }

    /**
     * Runs the requests in as few pipelined rounds as the region allows.
     *
     * @template K of array-key
     * @param array<K, array<string, Tensor>> $requests not empty
     * @return Replies<K>
     * @throws TensorBridgeException when nothing could be sent
     */
    public function run(Target $target, array $requests, Deadline $deadline, ?ModelIndex $index): Replies
    {
        $model = $target->model;
        $single = count($requests) === 1;
        if ($single) {
            // one request: one round, nothing to split, order or mark as not sent
            $key = array_key_first($requests);
            try {
                [$answers, $failure] = $this->one($target, $requests[$key], $deadline, $index)
                    ?? $this->pipeline($target, [$requests[$key]], $deadline, $index, true);
            } catch (PayloadTooLargeException $e) {
                return new Replies([$key => $e]); // nothing was sent: the item's own problem
            }
            return new Replies([$key => $answers[0] ?? self::unanswered($failure, $key, $model)], $failure);
        }
        $items = [];
        $failure = null;
        try {
            foreach ($this->chunks($model, $requests, $deadline, $index, $single) as $chunk) {
                $keys = array_keys($chunk);
                if ($failure !== null) {
                    foreach ($keys as $key) {
                        $items[$key] = self::notSent($failure, $key);
                    }
                    continue;
                }
                try {
                    [$answers, $failure] = $this->pipeline($target, array_values($chunk), $deadline, $index, $single);
                } catch (PayloadTooLargeException $e) {
                    // Raised before anything of this chunk was sent (a chunk this large holds one
                    // item): that item's own problem, so the later chunks still run.
                    foreach ($keys as $key) {
                        $items[$key] = $e;
                    }
                    continue;
                }
                foreach ($keys as $i => $key) {
                    $items[$key] = $answers[$i] ?? self::unanswered($failure, $key, $model);
                }
            }
        } catch (TensorBridgeException $e) {
            if ($items === []) {
                throw $e; // nothing was sent: the caller may retry it all
            }
            // a later round could not even start (cannot reconnect or attach): those items were not sent
            foreach ($requests as $key => $_) {
                $items[$key] ??= $e;
            }
            $failure = $e;
        }
        $ordered = [];
        foreach ($requests as $key => $_) {
            $ordered[$key] = $items[$key];
        }
        return new Replies($ordered, $failure);
    }

    /**
     * Splits requests into groups whose region footprint fits the region (each group is one pipeline).
     *
     * @template K of array-key
     * @param array<K, array<string, Tensor>> $requests
     * @return list<array<K, array<string, Tensor>>>
     */
    private function chunks(
        string $model,
        array $requests,
        Deadline $deadline,
        ?ModelIndex $index,
        bool $single,
    ): array {
        if ($single) {
            return [$requests];
        }
        $limit = max($this->session->region($deadline)->size, $this->session->regionCap());
        $chunks = [];
        $chunk = [];
        $chunkBytes = 0;
        foreach ($requests as $key => $tensors) {
            $bytes = RequestLayout::inputBytes($tensors) + $this->outputArea($model, $tensors, $index, false);
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
     * @param array<string, Tensor> $tensors
     */
    private function outputArea(string $model, array $tensors, ?ModelIndex $index, bool $single): int
    {
        return RequestLayout::outputArea(
            $index?->outputBytes($model, $tensors),
            RequestLayout::inputBytes($tensors),
            $single,
            $this->session->regionCap(),
        );
    }

    /**
     * One request on a session that is ready for it (Session::ready(): in step with the server, a
     * region attached, nothing abandoned, no checksums): pipeline() for a single request, with the
     * same frame and the same checks, fused into fewer calls and objects (this is the path of
     * every plain infer()). Null, with nothing sent, when the session is not ready or the region
     * is too small: pipeline() then takes the request.
     *
     * @param array<string, Tensor> $tensors
     * @return array{0: array<int, Reply|TensorBridgeException>, 1: TensorBridgeException|null}|null
     */
    private function one(Target $target, array $tensors, Deadline $deadline, ?ModelIndex $index): ?array
    {
        $session = $this->session;
        $conn = $session->readyConnection();
        $region = $session->readyRegion();
        if ($conn === null || $region === null) {
            return null;
        }
        $model = $target->model;
        $size = $region->size;
        // the region is ours alone: the request starts at 0 (RequestLayout::place())
        $written = RequestLayout::writeInputs($region, $tensors, 0, false, $size);
        if ($written === null) {
            return null; // pipeline() attaches a larger region
        }
        [$descriptors, $cursor] = $written;
        $capacity = RequestLayout::outputArea(
            $index?->outputBytes($model, $tensors),
            $cursor,
            true,
            $session->regionCap(),
        );
        if ($capacity > $size - $cursor) {
            return null;
        }
        $id = $session->nextId();
        $head = Wire::inferHead(
            (int) max(1, min(self::MAX_TIMEOUT_US, intdiv($deadline->at - hrtime(true), 1000))),
            $model,
            count($tensors),
            $cursor,
            $capacity,
            $target->version,
            $target->routingKey,
        );
        $frame = Wire::encodeFrame(FrameType::INFER, $id, $head . $descriptors);
        $spin = $session->spin->spinMicros($model);
        $sentAt = hrtime(true);
        try {
            $conn->send($frame, $deadline->at);
        } catch (TimeoutException | ConnectionException $e) {
            return self::sendFailure($e, $conn, true, $model, 1) ?? $this->resend($target, [$tensors], $deadline, $index);
        }
        try {
            $reply = $session->awaitReply($id, $deadline, $model, $spin);
            $session->spin->record($model, $spin, $conn->spinHit(), hrtime(true) - $sentAt);
            if (!$reply instanceof InferResponse) {
                throw new ProtocolException('the server answered INFER with a ' . get_debug_type($reply));
            }
            $outputs = RequestLayout::readOutputs($reply, $cursor, $capacity, $region, false);
            return [[new Reply($outputs, self::timing($reply))], null];
        } catch (TensorBridgeException $e) {
            if ($e->errorCode() !== null && $conn->isOpen()) {
                return [[$e], null]; // the server's answer to this request
            }
            $end = min(RequestLayout::align($cursor + $capacity), $size);
            return [[], $this->awaitFailure($e, $conn, [$id => [0, $end]], $model, $deadline)];
        }
    }

    /**
     * The requests again, once, on a new connection and region: the server had closed the
     * connection while it was idle (idle_timeout, a restart) and not a byte of them reached it.
     *
     * @param list<array<string, Tensor>> $requests
     * @return array{0: array<int, Reply|TensorBridgeException>, 1: TensorBridgeException|null}
     */
    private function resend(Target $target, array $requests, Deadline $deadline, ?ModelIndex $index): array
    {
        $this->session->drop();
        return $this->pipeline($target, $requests, $deadline, $index, count($requests) === 1, false);
    }

    /**
     * What a failed send means: the failure of the requests in flight; null when the server had
     * closed the idle connection before a byte went out (send them again, once: see resend()).
     *
     * @throws TimeoutException when not a byte was sent (the connection is intact, nothing in flight)
     */
    private static function sendFailure(
        TimeoutException|ConnectionException $e,
        Connection $conn,
        bool $mayReconnect,
        string $model,
        int $count,
    ): ?ConnectionException {
        if ($e instanceof TimeoutException) {
            if ($conn->isOpen()) {
                throw $e;
            }
        } elseif ($mayReconnect && $conn->refusedBeforeSending()) {
            return null;
        }
        return self::inFlight($e, $model, $count);
    }

    /**
     * The failure that ends a pipeline while waiting for replies (not an ERROR reply: the
     * connection failed, the framing was lost or the deadline passed); on a timeout the requests
     * still unanswered are abandoned (their region bytes stay busy until their late replies).
     *
     * @param array<int, array{0: int, 1: int}> $late request id => region byte range of the unanswered requests
     */
    private function awaitFailure(
        TensorBridgeException $e,
        Connection $conn,
        array $late,
        string $model,
        Deadline $deadline,
    ): TensorBridgeException {
        if ($e instanceof TimeoutException && $conn->isOpen()) {
            $this->session->abandon($late);
            return new TimeoutException(sprintf(
                'inference on model "%s" timed out after %.3f s (the client\'s own deadline);'
                . ' the server may still finish it (its late reply will be discarded).'
                . ' Raise the timeout or check the server load.',
                $model,
                $deadline->timeout,
            ), $deadline->timeout, null, $e);
        }
        if ($e instanceof ConnectionException && !$e instanceof UnauthorizedException) {
            return self::inFlight($e, $model, count($late));
        }
        return $e;
    }

    /**
     * @return array{queue_us: int, compute_us: int, preprocess_us: int, batch_size: int, version: int}
     */
    private static function timing(InferResponse $reply): array
    {
        return [
            'queue_us' => $reply->queueUs,
            'compute_us' => $reply->computeUs,
            'preprocess_us' => $reply->preprocessUs,
            'batch_size' => $reply->batchSize,
            'version' => $reply->version,
        ];
    }

    /**
     * Lays out, sends and collects one pipeline of INFER requests.
     *
     * Returns every answer read (a Reply, or the server's error for that request) by request index,
     * and the failure that ended the pipeline early (connection lost, framing lost, deadline passed),
     * after which the remaining requests have no answer. Such requests were sent and may have run;
     * they are never re-sent. Throws only when nothing was sent.
     *
     * @param list<array<string, Tensor>> $requests
     * @return array{0: array<int, Reply|TensorBridgeException>, 1: TensorBridgeException|null}
     */
    private function pipeline(
        Target $target,
        array $requests,
        Deadline $deadline,
        ?ModelIndex $index,
        bool $single,
        bool $mayReconnect = true,
    ): array {
        $model = $target->model;
        $need = 0;
        $outAreas = [];
        foreach ($requests as $i => $tensors) {
            $outAreas[$i] = $this->outputArea($model, $tensors, $index, $single);
            $need += RequestLayout::inputBytes($tensors) + $outAreas[$i];
        }
        $session = $this->session;
        $base = $session->allocate($need, $deadline);
        $region = $session->region($deadline);
        $plans = RequestLayout::place($region, $base, $requests, $outAreas, $session->nextId(...), $session->checksums);

        $timeoutUs = (int) max(1, min(self::MAX_TIMEOUT_US, intdiv($deadline->remainingNs(), 1000)));
        $frames = '';
        foreach ($plans as $plan) {
            $frames .= Wire::inferFrame($plan->id, $timeoutUs, $target, $plan, $session->checksums);
        }
        $conn = $session->connection($deadline);
        $spin = $session->spin->spinMicros($model);
        $sentAt = hrtime(true);
        try {
            $conn->send($frames, $deadline->at);
        } catch (TimeoutException | ConnectionException $e) {
            $failure = self::sendFailure($e, $conn, $mayReconnect, $model, count($plans));
            return $failure === null ? $this->resend($target, $requests, $deadline, $index) : [[], $failure];
        }

        $answers = [];
        foreach ($plans as $k => $plan) {
            try {
                $reply = $session->awaitReply($plan->id, $deadline, $model, $spin);
                if ($single) {
                    $session->spin->record($model, $spin, $conn->spinHit(), hrtime(true) - $sentAt);
                }
                if (!$reply instanceof InferResponse) {
                    throw new ProtocolException('the server answered INFER with a ' . get_debug_type($reply));
                }
                $outputs = RequestLayout::readOutputs(
                    $reply,
                    $plan->outOffset,
                    $plan->outCapacity,
                    $region,
                    $session->checksums,
                );
                $answers[$k] = new Reply($outputs, self::timing($reply));
            } catch (TensorBridgeException $e) {
                if ($e->errorCode() !== null && $conn->isOpen()) {
                    $answers[$k] = $e; // the server's answer to this request; the others carry on
                    continue;
                }
                $late = [];
                foreach (array_slice($plans, $k) as $plan) {
                    $late[$plan->id] = [$plan->start, $plan->end];
                }
                return [$answers, $this->awaitFailure($e, $conn, $late, $model, $deadline)];
            }
        }
        return [$answers, null];
    }

    /**
     * A connection failure while requests were in flight: says that they were not re-sent.
     */
    private static function inFlight(TensorBridgeException $e, string $model, int $count): ConnectionException
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
        ), $e->errorCode(), $e);
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
}
