<?php

// A web page under PHP-FPM: one Client per web request, with the circuit breaker configured
// from the query string. Shows that the breaker's state outlives the web request.

declare(strict_types=1);

require __DIR__ . '/../../../php/autoload.php';

use TensorBridge\Client;

header('Content-Type: application/json');
$client = new Client(
    $_GET['socket'],
    timeout: 2.0,
    connectAttempts: 1,
    breakerThreshold: (int) $_GET['threshold'],
    breakerCoolDown: (float) $_GET['cooldown'],
    breakerStateDir: $_GET['state'],
);
$page = ['pid' => getmypid()];
try {
    $page['pong'] = $client->ping();
} catch (\TensorBridge\Exception\TensorBridgeException $e) {
    $page += ['error' => (new ReflectionClass($e))->getShortName(), 'message' => $e->getMessage()];
}
$page['breaker'] = $client->breakerState();
echo json_encode($page);
