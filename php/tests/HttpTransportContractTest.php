<?php

declare(strict_types=1);

namespace TensorBridge\Tests;

use TensorBridge\Client;
use TensorBridge\Transport\HttpOptions;

require_once __DIR__ . '/ClientContractTestCase.php';
require_once __DIR__ . '/TempDir.php';

/**
 * The Client contract over HTTP (HttpTransport) against TensorBridge's own REST listener
 * (`tensorbridge serve --http-port`): python/tests/test_php_http.py starts one and runs this
 * group with TENSORBRIDGE_CONTRACT_URL (and _TOKEN, _CA for its bearer token and certificate) set; plain `phpunit`
 * leaves the group out (phpunit.xml).
 *
 * @group server
 */
final class HttpTransportContractTest extends ClientContractTestCase
{
    private string $stateDir = '';

    protected function setUp(): void
    {
        if (!is_string(getenv('TENSORBRIDGE_CONTRACT_URL'))) {
            self::markTestSkipped('needs TENSORBRIDGE_CONTRACT_URL (run by python/tests/test_php_http.py)');
        }
        $this->stateDir = TempDir::create('tb-contract-http');
    }

    protected function tearDown(): void
    {
        TempDir::remove($this->stateDir);
    }

    protected function client(): Client
    {
        $token = getenv('TENSORBRIDGE_CONTRACT_TOKEN');
        $ca = getenv('TENSORBRIDGE_CONTRACT_CA');
        return new Client(
            (string) getenv('TENSORBRIDGE_CONTRACT_URL'),
            timeout: 5.0,
            breakerStateDir: $this->stateDir,
            http: new HttpOptions(token: is_string($token) ? $token : null, caFile: is_string($ca) ? $ca : null),
        );
    }

    public function testPingAnswersProtocolOne(): void
    {
        // over HTTP ping() returns the server's v2 metadata, not the socket protocol's PONG
        $pong = $this->client()->ping();
        self::assertSame('tensorbridge', $pong['server']);
        self::assertSame('oip-v2', $pong['protocol']);
    }
}
