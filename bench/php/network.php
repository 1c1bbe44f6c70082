<?php

// S9 client (bench/network.py): one JSON job on stdin, {"samples_us": [...]} on stdout.
// {"endpoint": a Unix socket path or an http:// URL of an OIP REST server,
//  "fastapi": a URL of bench/http_app.py instead (its /binary routes),
//  "oip": a URL of an OIP REST server called with curl_exec of a prebuilt binary request
//  (the same client work as "fastapi", so the two compare the servers),
//  "size": "tiny" (16 B in) | "large" (602,112 B in), "n": 100, "warmup": 10}

declare(strict_types=1);

require __DIR__ . '/../../php/autoload.php';

use TensorBridge\Client;
use TensorBridge\Tensor;

$job = json_decode(stream_get_contents(STDIN), true, 512, JSON_THROW_ON_ERROR);
$large = $job['size'] === 'large';
$bytes = $large
    ? pack('g*', ...array_map(fn (int $i): float => ($i % 255) / 255.0, range(0, 602112 / 4 - 1)))
    : pack('g*', 1.0, 2.0, 3.0, 4.0);

if (isset($job['fastapi'])) {
    $ch = curl_init();
    curl_setopt_array($ch, [
        CURLOPT_URL => $job['fastapi'] . ($large ? '/binary/head' : '/binary/echo'),
        CURLOPT_POST => true, CURLOPT_RETURNTRANSFER => true, CURLOPT_TCP_NODELAY => true,
        CURLOPT_HTTPHEADER => ['Content-Type: application/octet-stream',
            'X-Shape: ' . ($large ? '1,3,224,224' : '4')],
    ]);
    $call = function () use ($ch, $bytes): void {
        curl_setopt($ch, CURLOPT_POSTFIELDS, $bytes);
        if (curl_exec($ch) === false || curl_getinfo($ch, CURLINFO_RESPONSE_CODE) !== 200) {
            throw new RuntimeException('HTTP call failed: ' . curl_error($ch));
        }
    };
} elseif (isset($job['oip'])) {
    [$name, $input, $output, $shape] = $large
        ? ['head', 'input', 'output', [1, 3, 224, 224]] : ['tiny', 'x', 'x', [1, 4]];
    $header = json_encode(['inputs' => [['name' => $input, 'datatype' => 'FP32', 'shape' => $shape,
        'parameters' => ['binary_data_size' => strlen($bytes)]]],
        'outputs' => [['name' => $output, 'parameters' => ['binary_data' => true]]]],
        JSON_THROW_ON_ERROR);
    $ch = curl_init();
    curl_setopt_array($ch, [
        CURLOPT_URL => $job['oip'] . "/v2/models/$name/infer",
        CURLOPT_POST => true, CURLOPT_RETURNTRANSFER => true, CURLOPT_TCP_NODELAY => true,
        CURLOPT_HTTPHEADER => ['Content-Type: application/octet-stream',
            'Inference-Header-Content-Length: ' . strlen($header)],
    ]);
    $body = $header . $bytes;
    $call = function () use ($ch, $body): void {
        curl_setopt($ch, CURLOPT_POSTFIELDS, $body);
        if (curl_exec($ch) === false || curl_getinfo($ch, CURLINFO_RESPONSE_CODE) !== 200) {
            throw new RuntimeException('HTTP call failed: ' . curl_error($ch));
        }
    };
} else {
    $client = new Client($job['endpoint'], timeout: 30.0);
    $call = $large
        ? fn () => $client->infer('head', ['input' => Tensor::fromBytes($bytes, 'float32', [1, 3, 224, 224])])['output']->bytes()
        : fn () => $client->infer('tiny', ['x' => Tensor::fromBytes($bytes, 'float32', [1, 4])])['x']->bytes();
}

for ($i = 0; $i < ($job['warmup'] ?? 10); $i++) {
    $call();
}
$samples = [];
for ($i = 0, $n = (int) ($job['n'] ?? 100); $i < $n; $i++) {
    $t = hrtime(true);
    $call();
    $samples[] = (hrtime(true) - $t) / 1e3;
}
echo json_encode(['samples_us' => $samples]), "\n";
