<?php

// A web page as a PHP-FPM app would have it: one Client per web request.

declare(strict_types=1);

require __DIR__ . '/../../../php/autoload.php';

use TensorBridge\Client;
use TensorBridge\Tensor;

header('Content-Type: application/json');
$client = new Client($_GET['socket'], timeout: 5.0);
try {
    $n = (int) $_GET['n'];
    $out = $client->infer('echo', ['x' => Tensor::fromArray(range($n, $n + 9), 'int32')]);
    echo json_encode(['ok' => $out['x']->toArray() === range($n, $n + 9),
        'pid' => getmypid(), 'pong' => $client->ping()]);
} catch (\TensorBridge\Exception\TensorBridgeException $e) {
    echo json_encode(['error' => get_class($e), 'message' => $e->getMessage()]);
}
