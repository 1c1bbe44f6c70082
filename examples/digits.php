<?php

// Classify ten handwritten 8x8 digits with the bundled model; run with `make demo`.

declare(strict_types=1);

require __DIR__ . '/../php/autoload.php';

use TensorBridge\Client;
use TensorBridge\Tensor;

$samples = json_decode(file_get_contents(__DIR__ . '/digits_samples.json'), true);
$client = new Client($argv[1] ?? null, timeout: 1.0);

$rows = array_column($samples, 'pixels');                       // 10 x 64 pixel values, 0..16
$t0 = hrtime(true);
$out = $client->infer('digits', ['input' => Tensor::fromArray($rows, 'float32')]);
$first = (hrtime(true) - $t0) / 1e6;                            // includes connect + attach
for ($i = 0; $i < 5; $i++) {                                    // warm calls, as a web app sees them
    $t0 = hrtime(true);
    $client->infer('digits', ['input' => Tensor::fromArray($rows, 'float32')]);
    $ms = (hrtime(true) - $t0) / 1e6;
}

$right = 0;
foreach ($out['logits']->toArray() as $i => $logits) {
    $guess = array_search(max($logits), $logits, true);
    $right += (int) ($guess === $samples[$i]['label']);
    printf("sample %d: label %d, model says %d\n", $i, $samples[$i]['label'], $guess);
}
printf("%d/%d right; logits shape [%s] %s\n", $right, count($samples),
    implode(', ', $out['logits']->shape()), $out['logits']->dtype());
printf("first call %.2f ms (connect, attach the region), a warm call %.3f ms; server compute %d µs\n",
    $first, $ms, $client->lastTiming()['compute_us']);
