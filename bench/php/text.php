<?php

// S8 benchmark client: one JSON job on stdin, one JSON result on stdout.
// {"mode": "tb"|"http", "socket": "...", "url": "http://127.0.0.1:PORT/embed",
//  "sentences": "/path/sentences.json", "offset": 0, "warmup": 5, "duration": 3.0,
//  "start": "/path/start-file"}
// Embeds one sentence per request in a loop for "duration" seconds, after touching
// "<start>.ready.<pid>" and waiting for "start" to exist (all processes start together).

declare(strict_types=1);

require __DIR__ . '/../../php/autoload.php';

use TensorBridge\Client;

$job = json_decode(stream_get_contents(STDIN), true, 512, JSON_THROW_ON_ERROR);
$sentences = json_decode(file_get_contents($job['sentences']), true, 512, JSON_THROW_ON_ERROR);
$count = count($sentences);

if ($job['mode'] === 'tb') {
    $client = new Client($job['socket'], timeout: 60.0);
    $embed = function (string $text) use ($client): int {
        $out = $client->infer('minilm', ['text' => [$text]]);
        return count($out['embedding']->toArray()[0]);
    };
} else {
    $ch = curl_init();
    $embed = function (string $text) use ($ch, $job): int {
        curl_setopt_array($ch, [CURLOPT_URL => $job['url'], CURLOPT_POST => true,
            CURLOPT_POSTFIELDS => json_encode(['texts' => [$text]], JSON_THROW_ON_ERROR),
            CURLOPT_HTTPHEADER => ['Content-Type: application/json'], CURLOPT_RETURNTRANSFER => true]);
        $body = curl_exec($ch);
        if ($body === false || curl_getinfo($ch, CURLINFO_RESPONSE_CODE) !== 200) {
            throw new RuntimeException('HTTP call failed: ' . curl_error($ch) . ' ' . $body);
        }
        return count(json_decode($body, true, 512, JSON_THROW_ON_ERROR)['embeddings'][0]);
    };
}

$i = (int) ($job['offset'] ?? 0);
for ($w = 0; $w < (int) ($job['warmup'] ?? 5); $w++) {
    $embed($sentences[$i++ % $count]);
}
if (!empty($job['start'])) {
    touch($job['start'] . '.ready.' . getmypid());
    while (!file_exists($job['start'])) {
        usleep(1000);
    }
}
$samples = [];
$t0 = hrtime(true);
$until = $t0 + (int) ($job['duration'] * 1e9);
while (hrtime(true) < $until) {
    $t = hrtime(true);
    $dim = $embed($sentences[$i++ % $count]);
    $samples[] = (hrtime(true) - $t) / 1000;
    if ($dim !== 384) {
        throw new RuntimeException("an embedding of $dim values, not 384");
    }
}
echo json_encode(['samples_us' => $samples, 'wall_us' => (hrtime(true) - $t0) / 1000]);
