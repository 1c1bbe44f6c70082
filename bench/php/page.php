<?php

// The S6 web page: what a PHP-FPM app does per web request, through each transport.
// ?via=tb|json|binary; the model is the no-op echo on 64 floats (a feature vector).

declare(strict_types=1);

require __DIR__ . '/../../php/autoload.php';

use TensorBridge\Client;
use TensorBridge\Tensor;

$features = array_map(fn (int $i): float => $i / 64, range(0, 63));
$via = $_GET['via'] ?? 'tb';
if ($via === 'tb') {
    $client = new Client(getenv('TB_SOCKET') ?: $_GET['socket'], timeout: 1.0);
    $scores = $client->infer('echo', ['x' => Tensor::fromArray($features, 'float32')])['x']->toArray();
} else {
    $ch = curl_init();
    $url = $_GET['url'];
    if ($via === 'json') {
        curl_setopt_array($ch, [CURLOPT_URL => "$url/json/echo", CURLOPT_POST => true,
            CURLOPT_RETURNTRANSFER => true, CURLOPT_HTTPHEADER => ['Content-Type: application/json'],
            CURLOPT_POSTFIELDS => json_encode(['inputs' => [['name' => 'x', 'shape' => [64],
                'datatype' => 'FP32', 'data' => $features]]])]);
        $scores = json_decode(curl_exec($ch), true)['outputs'][0]['data'];
    } else {
        curl_setopt_array($ch, [CURLOPT_URL => "$url/binary/echo", CURLOPT_POST => true,
            CURLOPT_RETURNTRANSFER => true,
            CURLOPT_HTTPHEADER => ['Content-Type: application/octet-stream', 'X-Shape: 64'],
            CURLOPT_POSTFIELDS => pack('g*', ...$features)]);
        $scores = array_values(unpack('g*', curl_exec($ch)));
    }
}
header('Content-Type: application/json');
echo json_encode(['top' => array_search(max($scores), $scores, true)]);
