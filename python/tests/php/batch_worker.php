<?php

// Batching worker: argv = socket, worker id, request count. Each request sends 1-3 rows
// derived from (worker, i) to the `rows` test model (y = 2x + 1, rows = rows in the model
// call) and checks every value of the answer, so a row given to the wrong caller shows.
// Prints one JSON line {"ok":n,"bad":n,"max_rows":n,"errors":[...]}.

declare(strict_types=1);

require __DIR__ . '/../../../php/autoload.php';

use TensorBridge\Client;
use TensorBridge\Tensor;

[, $socket, $worker, $count] = $argv;
$client = new Client($socket, timeout: 30.0);
$ok = 0;
$bad = 0;
$maxRows = 0;
$errors = [];
for ($i = 0; $i < (int) $count; $i++) {
    $n = 1 + (($i + (int) $worker) % 3);
    $x = [];
    for ($r = 0; $r < $n; $r++) {
        $x[] = [(float) $worker, (float) $i, (float) $r, (float) ($worker * 1000 + $i)];
    }
    try {
        $out = $client->infer('rows', ['x' => Tensor::fromArray($x, 'float32')]);
        $want = array_map(fn (array $row) => array_map(fn (float $v) => 2 * $v + 1, $row), $x);
        $rows = $out['rows']->toArray();
        if ($out['y']->toArray() === $want && count($rows) === $n) {
            $ok++;
        } else {
            $bad++;
        }
        $maxRows = max($maxRows, $rows[0]);
    } catch (Throwable $e) {
        $errors[] = get_class($e) . ': ' . $e->getMessage();
    }
}
echo json_encode(['ok' => $ok, 'bad' => $bad, 'max_rows' => $maxRows,
    'errors' => array_slice($errors, 0, 5)]), "\n";
