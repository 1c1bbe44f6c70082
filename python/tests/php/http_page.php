<?php

// A PHP-FPM page calling an Open Inference Protocol server over HTTP (test_php_http.py):
// n calls on one Client, and how many TCP connections its transport opened for them.

declare(strict_types=1);

require __DIR__ . '/../../../php/autoload.php';

use TensorBridge\Client;
use TensorBridge\Tensor;
use TensorBridge\Transport\HttpOptions;
use TensorBridge\Transport\HttpTransport;

header('Content-Type: application/json');
$transport = new HttpTransport($_GET['url'], new HttpOptions(token: $_GET['token']));
$client = new Client(timeout: 5.0, transport: $transport);
try {
    $ok = true;
    for ($i = 0; $i < (int) $_GET['n']; $i++) {
        $ok = $ok && $client->infer('echo', ['x' => Tensor::fromArray([$i], 'int32')])['x']->toArray() === [$i];
    }
    echo json_encode(['ok' => $ok, 'pid' => getmypid(), 'connects' => $transport->connects()]);
} catch (\TensorBridge\Exception\TensorBridgeException $e) {
    echo json_encode(['error' => get_class($e), 'message' => $e->getMessage()]);
}
