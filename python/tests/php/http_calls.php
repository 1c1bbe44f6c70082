<?php

// Test driver for python/tests/test_php_http.py: one Client over HttpTransport runs a list of
// operations read as JSON from stdin and prints one JSON result per operation.
//
// stdin: {"url": ..., "token": null, "timeout": 5.0, "breaker_threshold": 5, "state_dir": ...,
//         "ops": [{"op": "infer", "model": "echo", "inputs": {"a": {"dtype": "FP32", "data": [..]}}}, ...]}
// Ops: ping, models, infer (version?), infer_many (list of inputs), infer_batch, connects
// (TCP connections the transport opened so far). BYTES items travel base64-encoded both ways.
// A result is {"outputs": {name: {"dtype", "shape", "data"}}} (or what the op returns) or
// {"error": short class name, "message", "code", "ms": elapsed milliseconds}.

declare(strict_types=1);

require __DIR__ . '/../../../php/autoload.php';

use TensorBridge\Client;
use TensorBridge\Exception\TensorBridgeException;
use TensorBridge\Tensor;
use TensorBridge\Transport\HttpOptions;
use TensorBridge\Transport\HttpTransport;

$cmd = json_decode((string) stream_get_contents(STDIN), true, 512, JSON_THROW_ON_ERROR);
$options = new HttpOptions(token: $cmd['token'] ?? null, caFile: $cmd['ca_file'] ?? null);
$transport = new HttpTransport($cmd['url'], $options, connectAttempts: $cmd['connect_attempts'] ?? 3);
$client = new Client(
    timeout: (float) ($cmd['timeout'] ?? 5.0),
    breakerThreshold: $cmd['breaker_threshold'] ?? 5,
    transport: $transport,
);

/** @param array<string, array{dtype: string, data: mixed}> $inputs */
function tensors(array $inputs): array
{
    $out = [];
    foreach ($inputs as $name => $spec) {
        $data = $spec['data'];
        if (strtoupper($spec['dtype']) === 'BYTES') {
            array_walk_recursive($data, static function (mixed &$v): void {
                $v = base64_decode((string) $v, true);
            });
        }
        $out[$name] = isset($spec['shape'])
            ? Tensor::fromArray($data, $spec['dtype'])->reshape($spec['shape'])
            : Tensor::fromArray($data, $spec['dtype']);
    }
    return $out;
}

/** @param array<string, Tensor> $outputs */
function described(array $outputs): array
{
    $out = [];
    foreach ($outputs as $name => $t) {
        $data = $t->toArray();
        if ($t->dtype() === 'BYTES') {
            is_array($data) ? array_walk_recursive($data, static function (mixed &$v): void {
                $v = base64_encode($v);
            }) : $data = base64_encode($data);
        }
        $out[$name] = ['dtype' => $t->dtype(), 'shape' => $t->shape(), 'data' => $data];
    }
    return $out;
}

function failure(TensorBridgeException $e, int $started): array
{
    return [
        'error' => (new ReflectionClass($e))->getShortName(),
        'message' => $e->getMessage(),
        'code' => $e->getErrorCode(),
        'ms' => (hrtime(true) - $started) / 1e6,
    ];
}

$results = [];
foreach ($cmd['ops'] as $op) {
    $started = hrtime(true);
    try {
        $results[] = match ($op['op']) {
            'ping' => $client->ping(),
            'models' => $client->models(),
            'connects' => ['connects' => $transport->connects()],
            'breaker' => ['state' => $client->breakerState()],
            'infer' => ['outputs' => described($client->infer($op['model'], tensors($op['inputs']), $op['version'] ?? null))],
            'infer_many' => array_map(
                described(...),
                $client->inferMany($op['model'], array_map(tensors(...), $op['inputs'])),
            ),
            'infer_batch' => array_map(
                static fn ($r) => $r->ok() ? ['outputs' => described($r->value())] : failure($r->error(), $started),
                $client->inferBatch($op['model'], array_map(tensors(...), $op['inputs'])),
            ),
        };
    } catch (TensorBridgeException $e) {
        $results[] = failure($e, $started);
    }
}
echo json_encode($results, JSON_THROW_ON_ERROR | JSON_PRESERVE_ZERO_FRACTION), "\n";
