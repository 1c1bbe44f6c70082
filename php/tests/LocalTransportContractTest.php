<?php

declare(strict_types=1);

namespace TensorBridge\Tests;

use TensorBridge\Client;

require_once __DIR__ . '/ClientContractTestCase.php';
require_once __DIR__ . '/TempDir.php';

/**
 * The Client contract against a real `tensorbridge serve` (LocalTransport). It needs a server with
 * the test models: python/tests/test_php_contract.py starts one and runs this group with
 * TENSORBRIDGE_CONTRACT_SOCKET set; plain `phpunit` leaves the group out (phpunit.xml).
 *
 * @group server
 */
final class LocalTransportContractTest extends ClientContractTestCase
{
    private string $stateDir = '';
    /** @var list<Client> */
    private array $clients = [];

    protected function setUp(): void
    {
        if (!is_string(getenv('TENSORBRIDGE_CONTRACT_SOCKET'))) {
            self::markTestSkipped('needs TENSORBRIDGE_CONTRACT_SOCKET (run by python/tests/test_php_contract.py)');
        }
        $this->stateDir = TempDir::create('tb-contract');
    }

    protected function tearDown(): void
    {
        foreach ($this->clients as $client) {
            $client->close();
        }
        TempDir::remove($this->stateDir);
    }

    protected function client(?int $spinMicros = null): Client
    {
        $client = new Client(
            (string) getenv('TENSORBRIDGE_CONTRACT_SOCKET'),
            timeout: 5.0,
            persistent: false,
            spinMicros: $spinMicros,
            breakerStateDir: $this->stateDir,
        );
        $this->clients[] = $client;
        return $client;
    }

    protected function clientsForEachWait(): array
    {
        return ['auto' => $this->client(), 'never spin' => $this->client(0), 'spin 50 µs' => $this->client(50)];
    }
}
