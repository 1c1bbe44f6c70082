<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

use TensorBridge\Exception\ConnectionException;
use TensorBridge\Exception\ProtocolException;
use TensorBridge\Exception\TensorBridgeException;
use TensorBridge\Exception\TimeoutException;

/**
 * The Unix-socket control channel (spec §1, §3): frame I/O with deadlines, exact-length reads
 * while a descriptor may follow a frame, read-ahead otherwise (see readFrame()).
 *
 * All socket errors become exceptions here and nowhere else. A connection whose framing is
 * lost (EOF, reset, protocol error, a frame half-read or half-written at a timeout) is dropped.
 *
 * @internal
 */
final class Connection
{
    /** bytes a read-ahead received past the frame it read: the start of the next frame(s) */
    private string $pending = '';
    /** true when the last send() found the peer gone before a byte went out */
    private bool $refusedUnsent = false;
    /** how the last readFrame() spun: true = data came while spinning, false = it slept after; null = no spin */
    private ?bool $spinHit = null;
    /** @var array<string, true> paths whose persistent stream a live Connection of this process holds */
    private static array $persistentInUse = [];

    /**
     * @param resource|null $stream the persistent stream the socket was imported from, if any
     */
    private function __construct(
        private ?\Socket $socket,
        private mixed $stream,
        public readonly string $path,
        private readonly float $timeout,
    ) {
    }

    /** connect() errors worth retrying: the server is (re)starting or its backlog is full */
    private const TRANSIENT_ERRNOS = [
        SOCKET_ENOENT,
        SOCKET_ECONNREFUSED,
        SOCKET_EAGAIN,
        SOCKET_EINTR,
        SOCKET_ETIMEDOUT,
    ];
    /** the longest pause between two connection attempts, in seconds */
    private const MAX_BACKOFF = 0.5;
    /** bytes one read-ahead recv() may take: several reply frames (tensors travel in the region) */
    private const READ_AHEAD = 8192;

    /**
     * Connects to the server's socket; persistent streams are shared across requests of a PHP worker.
     *
     * Set-up is retried: up to $attempts connects, pausing $backoff seconds before the second,
     * doubling each time (at most 0.5 s, with jitter so that many workers do not retry in step),
     * never past $deadline (hrtime ns). Only errors that a (re)starting server causes are retried
     * (no socket file yet, connection refused); nothing has been sent at this point.
     */
    public static function open(
        string $path,
        float $timeout,
        bool $persistent,
        int $attempts = 1,
        float $backoff = 0.0,
        ?int $deadline = null,
    ): self {
        $started = hrtime(true);
        $delay = $backoff;
        for ($attempt = 1; ; $attempt++) {
            $result = self::connectOnce($path, $timeout, $persistent);
            if ($result instanceof self) {
                return $result;
            }
            [$errno, $reason] = $result;
            $left = $deadline === null ? PHP_INT_MAX : $deadline - hrtime(true);
            $pause = (int) round($delay * (0.5 + mt_rand() / mt_getrandmax() / 2) * 1e9);
            if ($attempt >= $attempts || !in_array($errno, self::TRANSIENT_ERRNOS, true) || $pause >= $left) {
                $tries = $attempt === 1 ? '' : sprintf(
                    ' (%d attempts over %.2f s)',
                    $attempt,
                    (hrtime(true) - $started) / 1e9,
                );
                throw self::connectError($path, $reason . $tries);
            }
            usleep(intdiv($pause, 1000));
            $delay = min($delay * 2, self::MAX_BACKOFF);
        }
    }

    /**
     * One connect attempt: the connection, or [errno, reason].
     *
     * @return self|array{0: int, 1: string}
     */
    private static function connectOnce(string $path, float $timeout, bool $persistent): self|array
    {
        if ($persistent && !isset(self::$persistentInUse[$path])) {
            $errno = 0;
            $errstr = '';
            $stream = @stream_socket_client(
                'unix://' . $path,
                $errno,
                $errstr,
                max($timeout, 0.001),
                STREAM_CLIENT_CONNECT | STREAM_CLIENT_PERSISTENT,
            );
            if ($stream === false) {
                return [$errno, $errstr !== '' ? $errstr : 'error ' . $errno];
            }
            $socket = @socket_import_stream($stream);
            if ($socket === false) {
                @fclose($stream);
                throw new ConnectionException(sprintf('cannot use the socket stream for %s', $path));
            }
            self::$persistentInUse[$path] = true;
            return new self($socket, $stream, $path, $timeout);
        }
        $socket = @socket_create(AF_UNIX, SOCK_STREAM, 0);
        if ($socket === false) {
            throw new ConnectionException('cannot create a Unix socket: ' . socket_strerror(socket_last_error()));
        }
        if (!@socket_connect($socket, $path)) {
            $errno = socket_last_error($socket);
            socket_close($socket);
            return [$errno, socket_strerror($errno)];
        }
        return new self($socket, null, $path, $timeout);
    }

    /**
     * Whether the connection can still be used.
     */
    public function isOpen(): bool
    {
        return $this->socket !== null;
    }

    /**
     * The underlying socket (for recvmsg of the fd carrier).
     */
    public function socket(): \Socket
    {
        if ($this->socket === null) {
            throw new ConnectionException('the connection is closed');
        }
        return $this->socket;
    }

    /**
     * Whether the last send() failed because the server had already closed the connection,
     * before a byte of it went out (so nothing of it can have run).
     */
    public function refusedBeforeSending(): bool
    {
        return $this->refusedUnsent;
    }

    /**
     * Sends all bytes before the deadline (hrtime ns).
     *
     * A timeout before the first byte leaves the connection usable; after it, the connection is dropped.
     */
    public function send(string $data, int $deadline): void
    {
        $sock = $this->socket();
        $len = strlen($data);
        $sent = 0;
        $this->refusedUnsent = false;
        while ($sent < $len) {
            $rest = $sent === 0 ? $data : substr($data, $sent);
            $n = @socket_send($sock, $rest, $len - $sent, MSG_DONTWAIT | MSG_NOSIGNAL);
            if ($n === false) {
                $err = socket_last_error($sock);
                socket_clear_error($sock);
                if ($err === SOCKET_EAGAIN || $err === SOCKET_EINTR) {
                    if (!$this->wait(false, $deadline)) {
                        if ($sent > 0) {
                            $this->drop();
                        }
                        throw new TimeoutException(
                            sprintf('timed out after %.3f s sending to %s', $this->timeout, $this->path),
                            $this->timeout,
                        );
                    }
                    continue;
                }
                if ($err === SOCKET_EPIPE || $err === SOCKET_ECONNRESET) {
                    $this->refusedUnsent = $sent === 0;
                    $this->throwPendingError();
                }
                throw $this->ioError($err);
            }
            $sent += $n;
        }
    }

    /**
     * A server that refuses a connection (UNAUTHORIZED) answers and hangs up, possibly before
     * our first frame goes out; its ERROR is still in our receive buffer and says more than
     * EPIPE. Throws that error when it is there; returns otherwise.
     */
    private function throwPendingError(): void
    {
        try {
            [$header, $body] = $this->readFrame(hrtime(true) + 200_000_000);
            $error = Wire::decodeBody($header, $body);
        } catch (TensorBridgeException) {
            return;
        }
        if ($error instanceof ErrorReply && $header->requestId === 0) {
            $this->drop();
            throw ErrorMapper::toException($error, '', $this->timeout);
        }
    }

    /**
     * Reads one frame. By default with exact-length reads that never go past the frame (spec
     * §5.1: an ATTACH_OK is followed by the fd carrier, which a longer read would swallow with
     * its descriptor). With $readAhead, for when no ATTACH_OK can be on the way, it waits for
     * the socket first (a reply is never there the moment its request went out) and one recv()
     * then takes the whole frame and whatever follows it (kept for the next read): select +
     * recv per reply instead of recv (EAGAIN) + select + recv (header) + recv (body).
     *
     * A blocking recv() would save the select() but the kernel wakes it each time the server
     * reads from this socket too (write space), one spurious wake-up per call in two; select()
     * sleeps until data comes.
     *
     * @return array{0: FrameHeader, 1: string}
     */
    public function readFrame(int $deadline, int $spinMicros = 0, bool $readAhead = false): array
    {
        $this->spinHit = null;
        if ($readAhead && $spinMicros === 0 && $this->pending === '') {
            $frame = $this->readWholeFrame($deadline);
            if ($frame !== null) {
                return $frame;
            }
        }
        $raw = $this->readExact(Spec::HEADER_SIZE, $deadline, $spinMicros, false, $readAhead);
        try {
            $header = Wire::decodeHeader($raw);
        } catch (ProtocolException $e) {
            $this->drop();
            throw $e;
        }
        $body = $header->bodyLen === 0 ? '' : $this->readExact($header->bodyLen, $deadline, 0, true, $readAhead);
        return [$header, $body];
    }

    /**
     * The usual read of a reply, in one piece: sleep until the socket is readable, then one
     * recv() that takes the whole frame and whatever follows it (kept for the next read). Null
     * when that recv() did not bring a whole frame (what it brought is kept for readExact()).
     *
     * @return array{0: FrameHeader, 1: string}|null
     */
    private function readWholeFrame(int $deadline): ?array
    {
        $sock = $this->socket();
        if (!$this->wait(true, $deadline)) {
            throw new TimeoutException(
                sprintf('timed out after %.3f s waiting for the server at %s', $this->timeout, $this->path),
                $this->timeout,
            );
        }
        $buf = '';
        $n = @socket_recv($sock, $buf, self::READ_AHEAD, MSG_DONTWAIT);
        if ($n === false) {
            $err = socket_last_error($sock);
            socket_clear_error($sock);
            if ($err !== SOCKET_EAGAIN && $err !== SOCKET_EINTR) {
                throw $this->ioError($err);
            }
            return null;
        }
        if ($n === 0) {
            throw $this->ioError(0);
        }
        if ($n >= Spec::HEADER_SIZE) {
            try {
                $header = Wire::decodeHeader($n === Spec::HEADER_SIZE ? $buf : substr($buf, 0, Spec::HEADER_SIZE));
            } catch (ProtocolException $e) {
                $this->drop();
                throw $e;
            }
            $end = Spec::HEADER_SIZE + $header->bodyLen;
            if ($n >= $end) {
                $this->pending = $n === $end ? '' : substr($buf, $end);
                return [$header, $header->bodyLen === 0 ? '' : substr($buf, Spec::HEADER_SIZE, $header->bodyLen)];
            }
        }
        $this->pending = $buf;
        return null;
    }

    /**
     * How the last readFrame() waited: true = its frame came while spinning, false = the spin
     * ran out and it slept; null = it did not spin (no spin asked, or the frame was already read).
     */
    public function spinHit(): ?bool
    {
        return $this->spinHit;
    }

    /**
     * Receives the fd carrier byte with its SCM_RIGHTS descriptor (spec §5.1).
     *
     * @return resource the received descriptor as a stream
     */
    public function receiveDescriptor(int $deadline): mixed
    {
        $sock = $this->socket();
        while (true) {
            $msg = ['buffer_size' => 1, 'controllen' => socket_cmsg_space(SOL_SOCKET, SCM_RIGHTS, 1)];
            socket_clear_error();
            $n = @socket_recvmsg($sock, $msg, MSG_DONTWAIT);
            if ($n === false) {
                // socket_recvmsg() records its errno only in the global error, not the socket's
                $err = socket_last_error($sock) ?: socket_last_error();
                socket_clear_error($sock);
                socket_clear_error();
                if ($err === SOCKET_EAGAIN || $err === SOCKET_EINTR) {
                    if (!$this->wait(true, $deadline)) {
                        $this->drop();
                        throw new TimeoutException(
                            sprintf('timed out after %.3f s waiting for the region descriptor', $this->timeout),
                            $this->timeout,
                        );
                    }
                    continue;
                }
                throw $this->ioError($err);
            }
            if ($n === 0) {
                throw $this->ioError(0);
            }
            $fd = $msg['control'][0]['data'][0] ?? null;
            if (($msg['iov'][0] ?? null) !== chr(Spec::FD_CARRIER) || !is_resource($fd)) {
                $this->drop();
                throw new ProtocolException('ATTACH_OK was not followed by the fd carrier byte with a descriptor');
            }
            return $fd;
        }
    }

    /**
     * Closes the connection; with $drop a persistent stream is closed too, so the next Client reconnects.
     */
    public function close(bool $drop = false): void
    {
        if ($this->socket === null) {
            return;
        }
        $drop = $drop || $this->pending !== ''; // the next user of the stream would start mid-frame
        $this->pending = '';
        if ($this->stream !== null) {
            unset(self::$persistentInUse[$this->path]);
            $this->socket = null;
            if ($drop && is_resource($this->stream)) {
                @fclose($this->stream);
            }
            $this->stream = null;
            return;
        }
        @socket_close($this->socket);
        $this->socket = null;
    }

    /**
     * Closes the connection for good (its framing is lost or the peer is gone).
     */
    public function drop(): void
    {
        $this->close(true);
    }

    public function __destruct()
    {
        $this->close();
    }

    /**
     * $len bytes: from what a read-ahead left first, then from the socket ($readAhead: wait
     * first unless spinning, then take up to READ_AHEAD bytes).
     */
    private function readExact(
        int $len,
        int $deadline,
        int $spinMicros,
        bool $midFrame,
        bool $readAhead = false,
    ): string {
        $buf = $this->pending;
        if (strlen($buf) >= $len) {
            $this->pending = (string) substr($buf, $len);
            return strlen($buf) === $len ? $buf : substr($buf, 0, $len);
        }
        $this->pending = '';
        $sock = $this->socket();
        $spinUntil = $spinMicros > 0 ? hrtime(true) + $spinMicros * 1000 : 0;
        $waitFirst = $readAhead && $spinUntil === 0 && $buf === '';
        while (true) {
            if ($waitFirst && !$this->wait(true, $deadline)) {
                throw new TimeoutException(
                    sprintf('timed out after %.3f s waiting for the server at %s', $this->timeout, $this->path),
                    $this->timeout,
                );
            }
            $waitFirst = false;
            $chunk = '';
            $want = $readAhead ? max(self::READ_AHEAD, $len - strlen($buf)) : $len - strlen($buf);
            $n = @socket_recv($sock, $chunk, $want, MSG_DONTWAIT);
            if ($n === false) {
                $err = socket_last_error($sock);
                socket_clear_error($sock);
                if ($err !== SOCKET_EAGAIN && $err !== SOCKET_EINTR) {
                    throw $this->ioError($err);
                }
                if ($spinUntil > 0 && $buf === '') {
                    if (hrtime(true) < $spinUntil) {
                        continue;
                    }
                    $this->spinHit = false;
                }
                if (!$this->wait(true, $deadline)) {
                    if ($midFrame || $buf !== '') {
                        $this->drop();
                    }
                    throw new TimeoutException(
                        sprintf('timed out after %.3f s waiting for the server at %s', $this->timeout, $this->path),
                        $this->timeout,
                    );
                }
                continue;
            }
            if ($n === 0) {
                throw $this->ioError(0);
            }
            $this->spinHit ??= $spinUntil > 0 ? true : null;
            $buf .= $chunk;
            if (strlen($buf) >= $len) {
                if (strlen($buf) === $len) {
                    return $buf;
                }
                $this->pending = substr($buf, $len);
                return substr($buf, 0, $len);
            }
        }
    }

    /**
     * Waits for readability/writability until the deadline; false when it passed.
     */
    private function wait(bool $read, int $deadline): bool
    {
        $sock = $this->socket();
        while (true) {
            $left = $deadline - hrtime(true);
            if ($left <= 0) {
                return false;
            }
            $r = $read ? [$sock] : null;
            $w = $read ? null : [$sock];
            $e = null;
            $n = @socket_select($r, $w, $e, intdiv($left, 1_000_000_000), intdiv($left % 1_000_000_000, 1000));
            if ($n === false) {
                $err = socket_last_error();
                socket_clear_error();
                if ($err === SOCKET_EINTR) {
                    continue;
                }
                throw $this->ioError($err);
            }
            if ($n > 0) {
                return true;
            }
        }
    }

    private function ioError(int $errno): ConnectionException
    {
        $this->drop();
        if ($errno === 0 || $errno === SOCKET_EPIPE || $errno === SOCKET_ECONNRESET) {
            return new ConnectionException(sprintf(
                'the server at %s closed the connection (did it crash or restart?)',
                $this->path,
            ));
        }
        return new ConnectionException(sprintf('socket error on %s: %s', $this->path, socket_strerror($errno)));
    }

    private static function connectError(string $path, string $reason): ConnectionException
    {
        $hint = str_contains(strtolower($reason), 'permission')
            ? ' Check that this user may access the socket (mode 0660: add it to the socket\'s group).'
            : sprintf(' Is `tensorbridge serve --socket %s` running?', $path);
        return new ConnectionException(sprintf('cannot connect to %s: %s.%s', $path, rtrim($reason, '.'), $hint));
    }
}
