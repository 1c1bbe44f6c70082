<?php

// Test driver: one JSON command on stdin, one JSON result on stdout.
// {"socket":..., "timeout":1.0, "checksums":false, "calls":[{"op":"infer","model":"echo",
//   "inputs":{"x":{"dtype":"FP32","shape":[2],"hex":"..."} | {"dtype":"FP32","values":[..]}
//             | {"array":[...]}}}, {"op":"ping"}, {"op":"models"}]}
// Each call's result: {"outputs":{name:{"dtype","shape","hex","values"}}} or
// {"error":"ShortClassName","message":"..."}.

declare(strict_types=1);

require __DIR__ . '/../../../php/autoload.php';

use TensorBridge\Client;
use TensorBridge\Tensor;

$cmd = json_decode(stream_get_contents(STDIN), true, 512, JSON_THROW_ON_ERROR);
$client = new Client(
    $cmd['socket'],
    timeout: (float) ($cmd['timeout'] ?? 2.0),
    persistent: (bool) ($cmd['persistent'] ?? false),
    checksums: (bool) ($cmd['checksums'] ?? false),
);

function tensorOut(Tensor $t): array
{
    $values = $t->toArray();
    return ['dtype' => $t->dtype(), 'shape' => $t->shape(), 'hex' => bin2hex($t->bytes()),
        'values' => $t->dtype() === 'BYTES' ? null : $values];
}

function tensorIn(array $spec): Tensor|array
{
    if (array_key_exists('array', $spec)) {
        return $spec['array'];
    }
    if (array_key_exists('hex', $spec)) {
        return Tensor::fromBytes(hex2bin($spec['hex']), $spec['dtype'], $spec['shape']);
    }
    return Tensor::fromArray($spec['values'], $spec['dtype']);
}

$results = [];
foreach ($cmd['calls'] as $call) {
    $t0 = hrtime(true);
    try {
        switch ($call['op']) {
            case 'ping':
                $r = ['pong' => $client->ping()];
                break;
            case 'models':
                $r = ['models' => $client->models()];
                break;
            case 'infer':
                $out = $client->infer($call['model'], array_map('tensorIn', $call['inputs']));
                $r = ['outputs' => array_map('tensorOut', $out), 'timing' => $client->lastTiming()];
                break;
            case 'infer_many':
                $lists = array_map(fn ($in) => array_map('tensorIn', $in), $call['inputs']);
                $r = ['many' => array_map(
                    fn ($out) => array_map('tensorOut', $out),
                    $client->inferMany($call['model'], $lists),
                )];
                break;
            case 'big':
                // n random bytes through the echo model; compared by hash, not dumped.
                $bytes = random_bytes((int) $call['bytes']);
                $out = $client->infer('echo', ['x' => Tensor::fromBytes($bytes, 'uint8', [strlen($bytes)])]);
                $r = ['equal' => hash_equals(md5($bytes), md5($out['x']->bytes())),
                    'shape' => $out['x']->shape()];
                break;
            case 'wait_file':
                // Blocks until the test creates the file (the test drives the timing).
                while (!file_exists($call['path'])) {
                    usleep(20000);
                }
                $r = [];
                break;
            case 'sleep':
                usleep((int) $call['us']);
                $r = [];
                break;
            default:
                throw new RuntimeException('unknown op ' . $call['op']);
        }
    } catch (Throwable $e) {
        $r = ['error' => (new ReflectionClass($e))->getShortName(), 'message' => $e->getMessage(),
            'is_base' => $e instanceof \TensorBridge\Exception\TensorBridgeException];
    }
    $r['ms'] = (hrtime(true) - $t0) / 1e6;
    $results[] = $r;
    if (!empty($call['print_now'])) {
        fwrite(STDERR, json_encode($r) . "\n");
    }
}
echo json_encode($results, JSON_PRESERVE_ZERO_FRACTION | JSON_INVALID_UTF8_SUBSTITUTE), "\n";
