<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

use TensorBridge\Exception\ConnectionException;
use TensorBridge\Exception\TimeoutException;
use TensorBridge\Transport\Deadline;
use TensorBridge\Transport\HttpOptions;

/**
 * HTTP/1.1 requests over one ext-curl handle, kept alive between calls.
 *
 * A persistent channel shares one handle per (base URL, TLS settings) in this PHP process, so
 * every Client of a CLI worker or of one web request reuses the same TCP (and TLS) connection.
 * PHP frees curl handles at the end of a web request; where PHP has persistent curl shares
 * (curl_share_init_persistent(), PHP 8.5) the connection also outlives the request under PHP-FPM.
 *
 * @internal
 */
final class HttpChannel
{
    /** curl errors that mean nothing reached the server and a restarting one may soon accept */
    private const RETRYABLE = [CURLE_COULDNT_CONNECT];
    private const TLS_ERRORS = [35, 51, 53, 54, 58, 59, 60, 64, 66, 77, 80, 82, 83, 90, 91];
    private const MAX_BACKOFF = 0.5;

    /** @var array<string, \CurlHandle> key => the process's shared handle for it */
    private static array $shared = [];

    private ?\CurlHandle $own = null;
    private bool $sent = false;
    private int $connects = 0;

    /**
     * @param string $baseUrl scheme://host[:port][/prefix] without a trailing slash
     * @param bool $persistent share one keep-alive handle per process (false: one per channel)
     * @param int $connectAttempts connects per request while the server refuses connections
     * @param float $connectBackoff seconds before the second connect, doubled for each further one
     */
    public function __construct(
        public readonly string $baseUrl,
        private readonly HttpOptions $options,
        private readonly bool $persistent,
        private readonly int $connectAttempts,
        private readonly float $connectBackoff,
    ) {
    }

    /**
     * Sends one request and reads the whole response (any status).
     *
     * @param string|null $body null: GET, else POST with this body
     * @param list<string> $headers extra request headers ("Name: value")
     * @throws ConnectionException when the server cannot be reached or drops the connection
     * @throws TimeoutException when the deadline passes first
     */
    public function request(string $path, ?string $body, array $headers, Deadline $deadline): HttpResponse
    {
        $this->sent = false;
        $handle = $this->handle();
        $headers[] = 'Expect:'; // no 100-continue round trip before a large body
        if ($this->options->token !== null) {
            $headers[] = 'Authorization: Bearer ' . $this->options->token;
        }
        $received = [];
        curl_setopt_array($handle, [
            CURLOPT_URL => $this->baseUrl . $path,
            CURLOPT_HTTPHEADER => $headers,
            CURLOPT_HEADERFUNCTION => static function ($_, string $line) use (&$received): int {
                $colon = strpos($line, ':');
                if ($colon !== false) {
                    $received[strtolower(substr($line, 0, $colon))] = trim(substr($line, $colon + 1));
                }
                return strlen($line);
            },
        ]);
        if ($body === null) {
            curl_setopt($handle, CURLOPT_HTTPGET, true);
        } else {
            curl_setopt($handle, CURLOPT_POSTFIELDS, $body);
        }
        $started = hrtime(true);
        $delay = $this->connectBackoff;
        for ($attempt = 1; ; $attempt++) {
            $ms = intdiv($deadline->remainingNs(), 1_000_000);
            if ($ms < 1) {
                throw $this->error(CURLE_OPERATION_TIMEDOUT, '', $deadline);
            }
            curl_setopt($handle, CURLOPT_TIMEOUT_MS, $ms);
            curl_setopt($handle, CURLOPT_CONNECTTIMEOUT_MS, $ms);
            $received = [];
            $result = curl_exec($handle);
            $errno = curl_errno($handle);
            $this->sent = curl_getinfo($handle, CURLINFO_REQUEST_SIZE) > 0 && $errno !== CURLE_COULDNT_CONNECT;
            $this->connects += (int) curl_getinfo($handle, CURLINFO_NUM_CONNECTS);
            if ($errno === CURLE_OK && is_string($result)) {
                return new HttpResponse((int) curl_getinfo($handle, CURLINFO_RESPONSE_CODE), $received, $result);
            }
            $pause = (int) round($delay * (0.5 + mt_rand() / mt_getrandmax() / 2) * 1e9);
            if ($attempt >= $this->connectAttempts || !in_array($errno, self::RETRYABLE, true)
                || $pause >= $deadline->remainingNs()) {
                $tries = $attempt === 1
                    ? ''
                    : sprintf(' (%d attempts over %.2f s)', $attempt, (hrtime(true) - $started) / 1e9);
                throw $this->error($errno, curl_error($handle) . $tries, $deadline);
            }
            usleep(intdiv($pause, 1000));
            $delay = min($delay * 2, self::MAX_BACKOFF);
        }
    }

    /**
     * Whether the last request's bytes (some of them) went out: a failed request that was not
     * sent cannot have run.
     */
    public function lastSent(): bool
    {
        return $this->sent;
    }

    /**
     * TCP connections this channel opened so far (a kept-alive connection is opened once).
     */
    public function connects(): int
    {
        return $this->connects;
    }

    /**
     * Releases a handle of this channel's own (the shared one stays open for reuse).
     */
    public function close(): void
    {
        if ($this->own !== null) {
            curl_close($this->own);
            $this->own = null;
        }
    }

    private function handle(): \CurlHandle
    {
        if (!$this->persistent) {
            return $this->own ??= $this->open();
        }
        $key = $this->baseUrl . "\0" . $this->options->tlsKey();
        return self::$shared[$key] ??= $this->open();
    }

    private function open(): \CurlHandle
    {
        $handle = curl_init();
        if ($handle === false) {
            throw new ConnectionException('cannot create a curl handle');
        }
        $options = [
            CURLOPT_RETURNTRANSFER => true,
            CURLOPT_HTTP_VERSION => CURL_HTTP_VERSION_1_1,
            CURLOPT_PROTOCOLS => CURLPROTO_HTTP | CURLPROTO_HTTPS,
            CURLOPT_FOLLOWLOCATION => false,
            CURLOPT_NOSIGNAL => true, // needed for timeouts under one second
            CURLOPT_TCP_NODELAY => true,
            CURLOPT_SSL_VERIFYPEER => $this->options->verifyTls,
            CURLOPT_SSL_VERIFYHOST => $this->options->verifyTls ? 2 : 0,
        ];
        if ($this->options->caFile !== null) {
            $options[CURLOPT_CAINFO] = $this->options->caFile;
        }
        if ($this->options->clientCert !== null) {
            $options[CURLOPT_SSLCERT] = $this->options->clientCert;
        }
        if ($this->options->clientKey !== null) {
            $options[CURLOPT_SSLKEY] = $this->options->clientKey;
        }
        if ($this->persistent && function_exists('curl_share_init_persistent')) {
            // PHP >= 8.5: connections (and DNS answers) outlive the web request under PHP-FPM
            $options[CURLOPT_SHARE] = curl_share_init_persistent([CURL_LOCK_DATA_CONNECT, CURL_LOCK_DATA_DNS]);
        }
        curl_setopt_array($handle, $options);
        return $handle;
    }

    private function error(int $errno, string $reason, Deadline $deadline): ConnectionException|TimeoutException
    {
        $url = $this->baseUrl;
        return match (true) {
            $errno === CURLE_OPERATION_TIMEDOUT => new TimeoutException(
                sprintf('timed out after %.3f s waiting for the server at %s', $deadline->timeout, $url),
                $deadline->timeout,
            ),
            $errno === CURLE_COULDNT_CONNECT, $errno === CURLE_COULDNT_RESOLVE_HOST => new ConnectionException(
                sprintf('cannot connect to %s: %s', $url, $reason),
            ),
            in_array($errno, self::TLS_ERRORS, true) => new ConnectionException(sprintf(
                'TLS with %s failed: %s. Check HttpOptions caFile / clientCert (or the server\'s certificate).',
                $url,
                $reason,
            )),
            in_array($errno, [CURLE_GOT_NOTHING, CURLE_SEND_ERROR, CURLE_RECV_ERROR], true) => new ConnectionException(
                sprintf('the server at %s closed the connection (did it crash or restart?): %s', $url, $reason),
            ),
            default => new ConnectionException(
                sprintf('HTTP request to %s failed: curl error %d: %s', $url, $errno, $reason),
            ),
        };
    }
}
