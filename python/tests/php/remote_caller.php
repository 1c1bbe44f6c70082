<?php

// Load driver of the remote-backend tests: calls a model of the local server in a loop until
// stop_file exists, and records every call. argv[1] = JSON:
// {"socket":..., "model":"double", "timeout":1.0, "stop_file":..., "pause_ms":5,
//  "breaker_state_dir":..., "progress_file":...}
// progress_file (optional) holds "CALLS OK" after every call, replaced atomically, so that a
// test can wait for the callers to reach a phase.
// The model takes x FP32 [1, 4] and answers y = 2x + 1. Output: one JSON object
// {"calls":[{"t":start (s since the epoch),"ms":elapsed,"r":"ok"|"bad"|ShortClassName,
//  "code":error code or null,"msg":message}]}.

declare(strict_types=1);

require __DIR__ . '/../../../php/autoload.php';

use TensorBridge\Client;
use TensorBridge\Exception\TensorBridgeException;
use TensorBridge\Tensor;

$cfg = json_decode($argv[1], true, 512, JSON_THROW_ON_ERROR);
$timeout = (float) ($cfg['timeout'] ?? 1.0);
$client = new Client(
    $cfg['socket'],
    timeout: $timeout,
    breakerStateDir: $cfg['breaker_state_dir'] ?? dirname($cfg['socket']) . '/.tb-breaker',
);
$pauseUs = (int) (1000 * ($cfg['pause_ms'] ?? 5));
$calls = [];
$ok = 0;
for ($i = 0; !file_exists($cfg['stop_file']); $i++) {
    $x = [(float) $i, 1.0, -2.0, 0.5];
    $t = microtime(true);
    try {
        $out = $client->infer($cfg['model'] ?? 'double', ['x' => Tensor::fromArray([$x], 'float32')]);
        $want = array_map(fn (float $v) => 2 * $v + 1, $x);
        $r = $out['y']->toArray() === [$want] ? 'ok' : 'bad';
        $code = null;
        $msg = '';
    } catch (TensorBridgeException $e) {
        $r = (new ReflectionClass($e))->getShortName();
        $code = $e->getCode();
        $msg = $e->getMessage();
    }
    $ok += $r === 'ok' ? 1 : 0;
    if (isset($cfg['progress_file'])) {
        file_put_contents($cfg['progress_file'] . '.tmp', sprintf('%d %d', $i + 1, $ok));
        rename($cfg['progress_file'] . '.tmp', $cfg['progress_file']);
    }
    $calls[] = ['t' => $t, 'ms' => (microtime(true) - $t) * 1000, 'r' => $r, 'code' => $code,
                'msg' => substr($msg, 0, 300)];
    usleep($pauseUs);
}
echo json_encode(['calls' => $calls]), "\n";
