<?php

// Concurrency worker: argv = socket, worker id, request count. Each request sends a tensor
// derived from (worker, i) to the echo model and checks every byte of the answer.
// Prints one JSON line {"ok":n,"bad":n,"errors":[...]}.

declare(strict_types=1);

require __DIR__ . '/../../../php/autoload.php';

use TensorBridge\Client;
use TensorBridge\Tensor;

[, $socket, $worker, $count] = $argv;
$client = new Client($socket, timeout: 10.0);
$ok = 0;
$bad = 0;
$errors = [];
for ($i = 0; $i < (int) $count; $i++) {
    $n = 1 + (($i * 7 + (int) $worker) % 300);
    $values = range((int) $worker * 100000 + $i, (int) $worker * 100000 + $i + $n - 1);
    $tag = "w{$worker}-r{$i}";
    try {
        $out = $client->infer('echo', [
            'x' => Tensor::fromArray($values, 'int32'),
            'tag' => Tensor::fromArray([$tag], 'bytes'),
        ]);
        if ($out['x']->toArray() === $values && $out['tag']->toArray() === [$tag]) {
            $ok++;
        } else {
            $bad++;
        }
    } catch (Throwable $e) {
        $errors[] = get_class($e) . ': ' . $e->getMessage();
    }
}
echo json_encode(['ok' => $ok, 'bad' => $bad, 'errors' => array_slice($errors, 0, 5)]), "\n";
