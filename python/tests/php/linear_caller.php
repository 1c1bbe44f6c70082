<?php

// Caller for the lifecycle tests: calls model "linear" (y = a * x + b) in a loop while the
// test reloads it. argv[1] = JSON {"socket", "worker", "stop_file", "events_file",
// "answers": {"name": [a, b], ...}, "timeout": 5.0, "model": "linear"}.
// One line per call is appended to events_file as soon as the call ends:
// [t_start, t_end, "name of the answer" | "bad" | "Exception: message"] (times: microtime).

declare(strict_types=1);

require __DIR__ . '/../../../php/autoload.php';

use TensorBridge\Client;
use TensorBridge\Tensor;

$cfg = json_decode($argv[1], true, 512, JSON_THROW_ON_ERROR);
$client = new Client($cfg['socket'], timeout: (float) ($cfg['timeout'] ?? 5.0));
$events = fopen($cfg['events_file'], 'a');
$model = $cfg['model'] ?? 'linear';
mt_srand((int) $cfg['worker'] + 1);

while (!file_exists($cfg['stop_file'])) {
    // Integers 2..100000 are exact in FP32, and a * x + b differs between the answers.
    $x = (float) mt_rand(2, 100000);
    $t0 = microtime(true);
    try {
        $y = $client->infer($model, ['x' => Tensor::fromArray([[$x]], 'float32')])['y']->toArray()[0][0];
        $which = 'bad';
        foreach ($cfg['answers'] as $name => [$a, $b]) {
            if ($y === $a * $x + $b) {
                $which = $name;
            }
        }
    } catch (Throwable $e) {
        $which = (new ReflectionClass($e))->getShortName() . ': ' . $e->getMessage();
        usleep(20000);
    }
    fwrite($events, json_encode([$t0, microtime(true), $which]) . "\n");
    fflush($events);
}
