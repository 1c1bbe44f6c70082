<?php

// A scratch application's entry point, run by test_php_composer.py: it loads the client through
// Composer's autoloader only, calls the server given as argv[1] and prints what it saw as JSON.

declare(strict_types=1);

require getcwd() . '/vendor/autoload.php';

use TensorBridge\Client;
use TensorBridge\Exception\ModelNotFoundException;
use TensorBridge\Tensor;

$client = new Client($argv[1], timeout: 5.0, persistent: false, breakerStateDir: $argv[2]);
$out = $client->infer('echo', ['x' => Tensor::fromArray([[1.5, -2.0], [0.25, 8.0]], 'float32')]);
try {
    $client->infer('no-such-model', ['x' => [1]]);
    $missing = null;
} catch (ModelNotFoundException $e) {
    $missing = $e->getModelName();
}
echo json_encode([
    'pong' => $client->ping(),
    'echo' => $out['x']->toArray(),
    'missing' => $missing,
    'client_file' => (new ReflectionClass(Client::class))->getFileName(),
    'included' => get_included_files(),
], JSON_PRESERVE_ZERO_FRACTION), "\n";
$client->close();
