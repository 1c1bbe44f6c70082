<?php

// Quick round-trip check: php bench/php/rtt.php SOCKET [spinMicros]
// Prints p50/p99 of a tiny (16 B) and of a 602,112-byte FP32 echo round trip.

declare(strict_types=1);

require __DIR__ . '/../../php/autoload.php';

use TensorBridge\Client;
use TensorBridge\Tensor;

$client = new Client($argv[1], timeout: 5.0, spinMicros: (int) ($argv[2] ?? 0));
$cases = [
    'tiny 16 B' => [Tensor::fromBytes(pack('g*', 1, 2, 3, 4), 'float32', [4]), 3000],
    '602,112 B' => [Tensor::fromBytes(pack('g*', ...array_fill(0, 150528, 0.5)), 'float32', [1, 3, 224, 224]), 500],
];
foreach ($cases as $name => [$tensor, $n]) {
    for ($i = 0; $i < 100; $i++) {
        $client->infer('echo', ['x' => $tensor]);
    }
    $s = [];
    for ($i = 0; $i < $n; $i++) {
        $t = hrtime(true);
        $out = $client->infer('echo', ['x' => $tensor]);
        $s[] = (hrtime(true) - $t) / 1e3;
        if ($i === 0 && $out['x']->bytes() !== $tensor->bytes()) {
            throw new RuntimeException('echo returned different bytes');
        }
    }
    sort($s);
    printf("%-10s in+out: p50 %7.1f us  p99 %7.1f us  (n=%d)\n", $name, $s[intdiv($n, 2)], $s[(int) ($n * 0.99)], $n);
}
