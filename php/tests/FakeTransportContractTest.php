<?php

declare(strict_types=1);

namespace TensorBridge\Tests;

use TensorBridge\Client;
use TensorBridge\ErrorCode;
use TensorBridge\Testing\FakeTransport;

require_once __DIR__ . '/ClientContractTestCase.php';

/**
 * The Client contract against the in-memory FakeTransport, programmed like the test models.
 */
final class FakeTransportContractTest extends ClientContractTestCase
{
    protected function client(): Client
    {
        $any = ['inputs' => null, 'outputs' => [['name' => 'output', 'datatype' => 'ANY', 'shape' => null]]];
        $fake = (new FakeTransport())
            ->answer('echo', static fn (array $inputs): array => $inputs, $any)
            ->fail('fail', FakeTransport::serverError(
                ErrorCode::MODEL_ERROR,
                'ValueError: this model always fails (tensorbridge.models.testing:fail)',
                'fail',
            ), $any);
        return new Client(transport: $fake);
    }
}
