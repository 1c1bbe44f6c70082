<?php

declare(strict_types=1);

namespace TensorBridge\Transport;

/**
 * Settings of an HTTP(S) connection to an Open Inference Protocol server (see HttpTransport):
 * a bearer token and TLS options. Pass to `new Client('https://host:8443', http: new HttpOptions(...))`.
 */
final class HttpOptions
{
    /**
     * @param string|null $token sent as `Authorization: Bearer <token>` on every request; null: none
     * @param string|null $caFile PEM file of the certificate authorities to trust for https
     *        (e.g. a private CA); null: the system's
     * @param bool $verifyTls check the server's certificate and host name (turn off only for tests)
     * @param string|null $clientCert PEM client certificate for mutual TLS; null: none
     * @param string|null $clientKey PEM private key of $clientCert (when not inside that file)
     */
    public function __construct(
        public readonly ?string $token = null,
        public readonly ?string $caFile = null,
        public readonly bool $verifyTls = true,
        public readonly ?string $clientCert = null,
        public readonly ?string $clientKey = null,
    ) {
        if ($token !== null && ($token === '' || preg_match('/[\x00-\x20\x7f]/', $token) === 1)) {
            throw new \InvalidArgumentException('token must be non-empty, without spaces or control characters');
        }
        foreach (['caFile' => $caFile, 'clientCert' => $clientCert, 'clientKey' => $clientKey] as $name => $file) {
            if ($file !== null && !is_readable($file)) {
                throw new \InvalidArgumentException(sprintf('%s "%s" is not a readable file', $name, $file));
            }
        }
    }

    /**
     * What tells two connections' TLS settings apart (the token is not part of a connection).
     */
    public function tlsKey(): string
    {
        return implode("\0", [
            $this->caFile ?? '',
            $this->verifyTls ? '1' : '0',
            $this->clientCert ?? '',
            $this->clientKey ?? '',
        ]);
    }
}
