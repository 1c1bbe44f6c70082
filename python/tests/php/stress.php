<?php

// Stress driver for the crash, soak and fuzz suites. argv[1] = JSON:
// {"socket":..., "worker":1, "count":100 (0 = until stop_file exists), "stop_file":...,
//  "timeout":2.0, "mix":{"echo":5,"bytes":2,"f64":2,"head":1,"sleep":1,"fail":1},
//  "sizes":[64,65536,1048576], "sleep_ms":200, "events":false, "seed":1, "error_pause_ms":20,
//  "client":{named Client constructor arguments, those this Client does not know are ignored}}
// Every answer is checked against what was sent. With "events", one JSON line per call goes to
// stdout before it ({"i","kind","phase":"start"}) and after it ({"i","kind","r","ms"}), where r
// is "ok", "bad" (a wrong answer) or the exception's short class name. Last line: the summary
// {"summary":true,"calls","ok","bad","errors":{class:count},"bad_examples","error_examples"}.

declare(strict_types=1);

require __DIR__ . '/../../../php/autoload.php';

use TensorBridge\Client;
use TensorBridge\Tensor;

$cfg = json_decode($argv[1], true, 512, JSON_THROW_ON_ERROR);
$worker = (int) ($cfg['worker'] ?? 0);
$count = (int) ($cfg['count'] ?? 100);
$stopFile = $cfg['stop_file'] ?? null;
$events = (bool) ($cfg['events'] ?? false);
$sizes = $cfg['sizes'] ?? [64, 4096, 65536, 1048576];
$sleepMs = (float) ($cfg['sleep_ms'] ?? 100);
$errorPauseUs = (int) (1000 * ($cfg['error_pause_ms'] ?? 20));
mt_srand((int) ($cfg['seed'] ?? $worker));

$known = array_map(
    fn (ReflectionParameter $p) => $p->getName(),
    (new ReflectionMethod(Client::class, '__construct'))->getParameters(),
);
$args = array_intersect_key($cfg['client'] ?? [], array_flip($known));
$args['timeout'] = (float) ($cfg['timeout'] ?? 2.0);
$client = new Client($cfg['socket'], ...$args);

$wheel = [];
foreach ($cfg['mix'] ?? ['echo' => 1] as $kind => $weight) {
    for ($k = 0; $k < $weight; $k++) {
        $wheel[] = $kind;
    }
}

function line(array $data): void
{
    fwrite(STDOUT, json_encode($data) . "\n");
}

/** Runs one call of $kind; true when the answer is exactly what it must be. */
function call(Client $client, string $kind, int $worker, int $i, array $sizes, float $sleepMs): bool
{
    switch ($kind) {
        case 'echo':
            $n = 1 + (($i * 7 + $worker) % 300);
            $values = range($worker * 100000 + $i, $worker * 100000 + $i + $n - 1);
            $tag = "w{$worker}-r{$i}";
            $out = $client->infer('echo', [
                'x' => Tensor::fromArray($values, 'int32'),
                'tag' => Tensor::fromArray([$tag], 'bytes'),
            ]);
            return $out['x']->toArray() === $values && $out['tag']->toArray() === [$tag];
        case 'bytes':
            $bytes = random_bytes($sizes[mt_rand(0, count($sizes) - 1)]);
            $out = $client->infer('echo', ['b' => Tensor::fromBytes($bytes, 'uint8', [strlen($bytes)])]);
            return $out['b']->shape() === [strlen($bytes)] && hash_equals(md5($bytes), md5($out['b']->bytes()));
        case 'f64':
            $values = [];
            for ($k = 0, $n = mt_rand(1, 64); $k < $n; $k++) {
                $values[] = mt_rand() / mt_getrandmax() * 1e6 - 5e5;
            }
            $out = $client->infer('echo', ['v' => Tensor::fromArray([$values], 'float64')]);
            return $out['v']->toArray() === [$values];
        case 'head':
            // Integers below 2^24 are exact in FP32, so out = in + 1 exactly.
            $base = mt_rand(0, 1 << 20);
            $first = [];
            for ($k = 0; $k < 1000; $k++) {
                $first[] = (float) ($base + $k);
            }
            $bytes = pack('g*', ...$first) . str_repeat("\0", 4 * (3 * 224 * 224 - 1000));
            $out = $client->infer('head', ['input' => Tensor::fromBytes($bytes, 'float32', [1, 3, 224, 224])]);
            return $out['output']->shape() === [1, 1000]
                && $out['output']->toArray() === [array_map(fn ($v) => $v + 1.0, $first)];
        case 'sleep':
            $out = $client->infer('sleep', ['ms' => Tensor::fromArray([$sleepMs], 'float32')]);
            return $out['ms']->toArray() === [$sleepMs];
        case 'fail':
            try {
                $client->infer('fail', ['x' => Tensor::fromArray([1], 'int32')]);
                return false;
            } catch (\TensorBridge\Exception\ServerException $e) {
                return str_contains($e->getMessage(), 'always fails');
            }
        case 'ping':
            return ($client->ping()['server'] ?? null) === 'tensorbridge';
    }
    throw new RuntimeException("unknown kind $kind");
}

$summary = ['summary' => true, 'calls' => 0, 'ok' => 0, 'bad' => 0, 'errors' => [],
    'bad_examples' => [], 'error_examples' => []];
for ($i = 0; $count === 0 || $i < $count; $i++) {
    if ($stopFile !== null && file_exists($stopFile)) {
        break;
    }
    $kind = $wheel[mt_rand(0, count($wheel) - 1)];
    if ($events) {
        line(['i' => $i, 'kind' => $kind, 'phase' => 'start']);
    }
    $t0 = hrtime(true);
    try {
        $good = call($client, $kind, $worker, $i, $sizes, $sleepMs);
        $r = $good ? 'ok' : 'bad';
        $summary[$good ? 'ok' : 'bad']++;
        if (!$good && count($summary['bad_examples']) < 5) {
            $summary['bad_examples'][] = "$kind #$i";
        }
    } catch (Throwable $e) {
        $r = (new ReflectionClass($e))->getShortName();
        $summary['errors'][$r] = ($summary['errors'][$r] ?? 0) + 1;
        if (count($summary['error_examples']) < 5) {
            $summary['error_examples'][] = "$kind #$i: $r: " . $e->getMessage();
        }
        usleep($errorPauseUs);  // as an app would: no busy loop while the server is down
    }
    $summary['calls']++;
    if ($events) {
        line(['i' => $i, 'kind' => $kind, 'r' => $r, 'ms' => (hrtime(true) - $t0) / 1e6,
            'msg' => isset($e) && $r !== 'ok' && $r !== 'bad' ? $e->getMessage() : null]);
    }
    unset($e);
}
line($summary);
