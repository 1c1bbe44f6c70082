<?php

// Test driver: one JSON command on stdin, one JSON result on stdout.
// {"socket":..., "timeout":1.0, "checksums":false, "calls":[{"op":"infer","model":"echo",
//   "inputs":{"x":{"dtype":"FP32","shape":[2],"hex":"..."} | {"dtype":"FP32","values":[..]}
//             | {"array":[...]}}}, {"op":"ping"}, {"op":"models"}]}
// Each call's result: {"outputs":{name:{"dtype","shape","hex","values"}}} or
// {"error":"ShortClassName","message":"..."}.
// Resilience options: "connect_attempts", "connect_backoff", "breaker_threshold",
// "breaker_cooldown", "breaker_state_dir" (default: <socket dir>/.tb-breaker, so that tests
// leave no breaker state behind). More ops: "classify" {"model","image_hex","top_k"},
// "classify_batch" {"model","images":{key:hex},"top_k"}, "infer_batch" {"model","inputs":{key:
// inputs}}, "touch" {"path"} (a marker for the test), "breaker" (the breaker's state),
// "embed" {"model","texts","normalize"}, "embed_batch" {"model","texts","normalize"} ("texts_hex"
// instead of "texts" for bytes that are no valid UTF-8).
// infer, infer_batch, classify, classify_batch and the embed ops take "version" and "routing_key".

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
    connectAttempts: (int) ($cmd['connect_attempts'] ?? 3),
    connectBackoff: (float) ($cmd['connect_backoff'] ?? 0.01),
    breakerThreshold: (int) ($cmd['breaker_threshold'] ?? 5),
    breakerCoolDown: (float) ($cmd['breaker_cooldown'] ?? 5.0),
    breakerStateDir: $cmd['breaker_state_dir'] ?? dirname($cmd['socket']) . '/.tb-breaker',
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

function errorOut(Throwable $e): array
{
    $out = ['error' => (new ReflectionClass($e))->getShortName(), 'message' => $e->getMessage(),
        'is_base' => $e instanceof \TensorBridge\Exception\TensorBridgeException];
    if ($e instanceof \TensorBridge\Exception\TimeoutException) {
        $out['deadline'] = $e->isServerDeadline() ? 'server' : 'client';
    }
    return $out;
}

/**
 * The texts of an embed op: "texts", or "texts_hex" decoded (non-strings kept as they are).
 */
function texts(array $call): array
{
    return $call['texts'] ?? array_map(fn ($hex) => is_string($hex) ? hex2bin($hex) : $hex, $call['texts_hex']);
}

/**
 * The call's pinned version and A/B routing key, as named arguments.
 */
function route(array $call): array
{
    return ['version' => $call['version'] ?? null, 'routingKey' => $call['routing_key'] ?? null];
}

/**
 * @param array<array-key, \TensorBridge\BatchResult> $batch
 */
function batchOut(array $batch, callable $value): array
{
    $out = [];
    foreach ($batch as $key => $result) {
        $out[] = ['key' => $key] + ($result->ok() ? ['value' => $value($result->value())] : errorOut($result->error()));
    }
    return $out;
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
                $out = $client->infer($call['model'], array_map('tensorIn', $call['inputs']), ...route($call));
                $r = ['outputs' => array_map('tensorOut', $out), 'timing' => $client->lastTiming()];
                break;
            case 'infer_many':
                $lists = array_map(fn ($in) => array_map('tensorIn', $in), $call['inputs']);
                $r = ['many' => array_map(
                    fn ($out) => array_map('tensorOut', $out),
                    $client->inferMany($call['model'], $lists),
                )];
                break;
            case 'infer_batch':
                $lists = array_map(fn ($in) => is_array($in) ? array_map('tensorIn', $in) : $in, $call['inputs']);
                $r = ['batch' => batchOut(
                    $client->inferBatch($call['model'], $lists, ...route($call)),
                    fn ($out) => array_map('tensorOut', $out),
                ), 'timing' => $client->lastTiming()];
                break;
            case 'classify':
                $item = array_key_exists('text', $call) ? $call['text'] : hex2bin($call['image_hex']);
                $r = ['top' => $client->classify($call['model'], $item, $call['top_k'] ?? 5, ...route($call)),
                    'notice' => $client->lastNotice(), 'timing' => $client->lastTiming()];
                break;
            case 'classify_batch':
                $images = $call['texts'] ?? array_map(fn ($hex) => is_string($hex) ? hex2bin($hex) : $hex, $call['images']);
                $r = ['batch' => batchOut(
                    $client->classifyBatch($call['model'], $images, $call['top_k'] ?? 5, ...route($call)),
                    fn ($top) => $top,
                ), 'notice' => $client->lastNotice()];
                break;
            case 'embed':
                $vectors = $client->embed($call['model'], texts($call), $call['normalize'] ?? true, ...route($call));
                $r = ['vectors' => $vectors, 'truncated' => $client->lastTruncated(), 'timing' => $client->lastTiming()];
                break;
            case 'embed_batch':
                $r = ['batch' => batchOut(
                    $client->embedBatch($call['model'], texts($call), $call['normalize'] ?? true, ...route($call)),
                    fn ($vector) => $vector,
                ), 'truncated' => $client->lastTruncated()];
                break;
            case 'touch':
                touch($call['path']);
                $r = [];
                break;
            case 'breaker':
                $r = ['state' => $client->breakerState()];
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
        $r = errorOut($e);
    }
    $r['ms'] = (hrtime(true) - $t0) / 1e6;
    $results[] = $r;
    if (!empty($call['print_now'])) {
        fwrite(STDERR, json_encode($r) . "\n");
    }
}
echo json_encode($results, JSON_PRESERVE_ZERO_FRACTION | JSON_INVALID_UTF8_SUBSTITUTE), "\n";
