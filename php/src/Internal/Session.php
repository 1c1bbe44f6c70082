<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

use TensorBridge\ErrorCode;
use TensorBridge\Exception\ConnectionException;
use TensorBridge\Exception\PayloadTooLargeException;
use TensorBridge\Exception\ProtocolException;
use TensorBridge\Exception\TimeoutException;
use TensorBridge\Exception\UnauthorizedException;
use TensorBridge\Transport\Deadline;

/**
 * One connection to the server and the shared region attached to it (spec §1, §5, §8): request
 * ids, reply matching, late replies of requests given up on, and where in the region the next
 * requests may go.
 *
 * A persistent connection may carry late replies meant for an earlier user of the same PHP
 * process; they are skipped until this session gets its first own reply.
 *
 * @internal
 */
final class Session
{
    private ?Connection $conn = null;
    private ?Region $region = null;
    private int $regionCap = 0;
    /** true once this session got a reply on the connection: stale frames of earlier users are behind us */
    private bool $synced = false;
    /** true while an ATTACH awaits its ATTACH_OK (exact-length reads: the descriptor follows it) */
    private bool $attaching = false;
    /** true until the first round trip on a (possibly reused) persistent connection succeeded */
    private bool $untested = false;
    private int $nextId;
    /** @var array<int, array{0: int, 1: int}> request id => region byte range [start, end) of requests given up on */
    private array $abandoned = [];

    public function __construct(
        public readonly string $socketPath,
        private readonly bool $persistent,
        public readonly bool $checksums,
        public readonly SpinPolicy $spin,
        private readonly int $connectAttempts,
        private readonly float $connectBackoff,
    ) {
        $this->nextId = random_int(1, 2 ** 40);
    }

    /**
     * A fresh request id.
     */
    public function nextId(): int
    {
        return $this->nextId++;
    }

    /**
     * The attached region; attaches one (of any size) first when there is none.
     */
    public function region(Deadline $deadline): Region
    {
        if ($this->region === null) {
            $this->attach(0, $deadline);
        }
        return $this->region ?? throw new ProtocolException('the server attached no region');
    }

    /**
     * The largest region the server will attach (0 = not known).
     */
    public function regionCap(): int
    {
        return $this->regionCap;
    }

    /**
     * The open connection, connecting first when there is none.
     */
    public function connection(Deadline $deadline): Connection
    {
        if ($this->conn === null || !$this->conn->isOpen()) {
            $this->drop();
            $this->conn = Connection::open(
                $this->socketPath,
                $deadline->timeout,
                $this->persistent,
                $this->connectAttempts,
                $this->connectBackoff,
                $deadline->at,
            );
            $this->untested = $this->persistent;
            $this->synced = false;
        }
        return $this->conn;
    }

    /**
     * The connection when a request can go out on it at once: open and in step with the server
     * (a reply read, no stale frames of earlier users ahead), nothing abandoned, no checksums.
     */
    public function readyConnection(): ?Connection
    {
        return $this->synced && $this->abandoned === [] && !$this->checksums && $this->conn?->isOpen() === true
            ? $this->conn
            : null;
    }

    /**
     * The attached region, if any (no attach).
     */
    public function readyRegion(): ?Region
    {
        return $this->region;
    }

    /**
     * Whether a connection exists and is still usable.
     */
    public function isOpen(): bool
    {
        return $this->conn !== null && $this->conn->isOpen();
    }

    /**
     * Whether a connection was opened and has since been lost.
     */
    public function isBroken(): bool
    {
        return $this->conn !== null && !$this->conn->isOpen();
    }

    /**
     * Forgets the connection (a persistent one is closed, not kept for reuse) and the region.
     */
    public function drop(): void
    {
        $this->release(true);
    }

    /**
     * Releases the region and the connection (a persistent connection stays open for reuse).
     */
    public function close(): void
    {
        $this->release(false);
    }

    /**
     * Marks requests whose replies will not be waited for; their region bytes stay busy until then.
     *
     * @param array<int, array{0: int, 1: int}> $ranges request id => region byte range [start, end)
     */
    public function abandon(array $ranges): void
    {
        $this->abandoned = $ranges + $this->abandoned;
    }

    /**
     * One request/reply round trip for PING, MODELS or ATTACH.
     *
     * On a reused persistent connection the server may have restarted since: if the first round trip
     * fails because the peer is gone, reconnect once (these requests are idempotent). The same when
     * the server closed an idle connection before the request went out.
     */
    public function exchange(int $type, ?AttachRequest $message, Deadline $deadline): mixed
    {
        $retried = false;
        while (true) {
            $conn = $this->connection($deadline);
            $retryable = $this->untested && !$retried;
            $id = $this->nextId++;
            $this->attaching = $type === FrameType::ATTACH;
            try {
                $frame = Wire::encodeFrame($type, $id, Wire::encodeBody($type, $message), $this->checksums);
                $conn->send($frame, $deadline->at);
                $reply = $this->awaitReply($id, $deadline, '', $this->spin->controlSpinMicros());
                $this->untested = false;
                return $reply;
            } catch (ConnectionException $e) {
                $this->drop();
                $retryable = $retryable || (!$retried && $conn->refusedBeforeSending());
                if (!$retryable || $e instanceof UnauthorizedException) {
                    throw $e;
                }
                $retried = true;
            } catch (TimeoutException $e) {
                if ($type === FrameType::ATTACH) {
                    // a late ATTACH_OK would be followed by a descriptor: do not keep such a connection
                    $this->drop();
                } elseif ($conn->isOpen()) {
                    $this->abandoned[$id] = [0, 0];
                }
                throw $e;
            } finally {
                $this->attaching = false;
            }
        }
    }

    /**
     * Reads frames until the reply to $id; returns its decoded body (ERROR replies are thrown).
     * $spinMicros: poll this long for the first frame before sleeping (SpinPolicy).
     */
    public function awaitReply(int $id, Deadline $deadline, string $model, int $spinMicros = 0): mixed
    {
        while (true) {
            $frame = $this->nextFrame($deadline, $spinMicros);
            if ($frame === null) {
                continue;
            }
            [$header, $body] = $frame;
            if ($header->requestId === $id) {
                $regionSize = $header->type === FrameType::INFER_OK ? $this->region?->size : null;
                $decoded = Wire::decodeBody($header, $body, $regionSize);
                $this->synced = true;
                foreach ($this->abandoned as $old => $_) {
                    if ($old < $id) {
                        unset($this->abandoned[$old]); // replies come in order: earlier requests are finished
                    }
                }
                if ($decoded instanceof ErrorReply) {
                    if (ErrorMapper::closesConnection($decoded)) {
                        $this->drop();
                    }
                    throw ErrorMapper::toException($decoded, $model, $deadline->timeout);
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
                FrameType::NAMES[$header->type],
                $header->requestId,
                $id,
            ));
        }
    }

    /**
     * Returns the region offset where $need bytes may be used, attaching or draining as needed.
     */
    public function allocate(int $need, Deadline $deadline): int
    {
        if ($this->region === null) {
            $this->attach($need, $deadline);
        }
        $region = $this->region($deadline);
        $busyEnd = 0;
        foreach ($this->abandoned as [, $end]) {
            $busyEnd = max($busyEnd, RequestLayout::align($end));
        }
        if ($busyEnd + $need <= $region->size) {
            return $busyEnd;
        }
        if ($this->abandoned !== []) {
            $this->drain($deadline);
        }
        if ($need <= $region->size) {
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
     * Reads the next frame; returns null when it was a late reply to an abandoned request (now dropped).
     *
     * @return array{0: FrameHeader, 1: string}|null
     */
    private function nextFrame(Deadline $deadline, int $spinMicros = 0): ?array
    {
        // read ahead only while no ATTACH_OK (and the descriptor after it) can be on the way
        $readAhead = $this->synced && !$this->attaching;
        [$header, $body] = $this->connection($deadline)->readFrame($deadline->at, $spinMicros, $readAhead);
        $rid = $header->requestId;
        if (isset($this->abandoned[$rid])) {
            unset($this->abandoned[$rid]);
            $this->skipStale($header, $deadline);
            return null;
        }
        if ($header->type === FrameType::ERROR && $rid === 0) {
            $error = Wire::decodeBody($header, $body);
            $this->drop();
            if (!$error instanceof ErrorReply) {
                $error = new ErrorReply(ErrorCode::PROTOCOL_ERROR->value, 'connection error');
            }
            throw ErrorMapper::toException($error, '', $deadline->timeout);
        }
        return [$header, $body];
    }

    private function skipStale(FrameHeader $header, Deadline $deadline): void
    {
        if ($header->type === FrameType::ATTACH_OK) {
            $fd = $this->connection($deadline)->receiveDescriptor($deadline->at);
            @fclose($fd);
        }
    }

    private function installRegion(AttachOk $ok, Deadline $deadline): void
    {
        $fd = $this->connection($deadline)->receiveDescriptor($deadline->at);
        $old = $this->region;
        $this->region = Region::fromStream($fd, $ok->regionSize);
        $this->regionCap = $ok->regionCap;
        $old?->close();
    }

    /**
     * Waits (within the deadline) until every abandoned request has been answered.
     */
    private function drain(Deadline $deadline): void
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
    private function attach(int $minRegion, Deadline $deadline): void
    {
        $this->connection($deadline);
        $this->drain($deadline);
        $request = new AttachRequest($this->checksums ? Spec::OPT_CRC : 0, $minRegion);
        $this->exchange(FrameType::ATTACH, $request, $deadline);
        if ($this->region === null || $this->region->size < $minRegion) {
            throw new ProtocolException(sprintf(
                'the server attached a %d-byte region, smaller than the %d bytes asked for',
                $this->region?->size ?? 0,
                $minRegion,
            ));
        }
    }

    private function release(bool $drop): void
    {
        $this->region?->close();
        $this->region = null;
        $this->conn?->close($drop);
        $this->conn = null;
        $this->abandoned = [];
        $this->synced = false;
    }
}
