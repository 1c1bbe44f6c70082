<?php

// Benchmark client: one JSON job on stdin, one JSON result on stdout.
// {"mode": "...", "socket": "...", "floor": "...", "url": "http://127.0.0.1:8781",
//  "warmup": 200, "n": 2000, "duration": 0}
// With "duration" > 0 it runs until that many seconds have passed (throughput runs) and
// waits for the file "start" (if given) to exist first, so that all processes start together.

declare(strict_types=1);

require __DIR__ . '/../../php/autoload.php';

use TensorBridge\Client;
use TensorBridge\Tensor;

// workers.php forks this file's processes and hands them the job it read
$job = $GLOBALS['TB_JOB'] ?? json_decode(stream_get_contents(STDIN), true, 512, JSON_THROW_ON_ERROR);
$mode = $job['mode'];
$large = 602112;                       // 1 x 3 x 224 x 224 float32
$floats = array_map(fn (int $i): float => ($i % 255) / 255.0, range(0, $large / 4 - 1));
$bytes = pack('g*', ...$floats);
$tiny = pack('g*', 1.0, 2.0, 3.0, 4.0);
$extraUs = [];
$jpeg = isset($job['jpeg']) ? file_get_contents($job['jpeg']) : '';

/** The seed article's PHP preprocessing: GD resize, imagecolorat per pixel, mean/std, CHW. */
function seedPreprocess(string $jpeg): string
{
    $img = imagecreatefromstring($jpeg);
    $small = imagescale($img, 224, 224);
    $r = $g = $b = [];
    for ($y = 0; $y < 224; $y++) {
        for ($x = 0; $x < 224; $x++) {
            $c = imagecolorat($small, $x, $y);
            $r[] = ((($c >> 16) & 0xFF) / 255 - 0.485) / 0.229;
            $g[] = ((($c >> 8) & 0xFF) / 255 - 0.456) / 0.224;
            $b[] = (($c & 0xFF) / 255 - 0.406) / 0.225;
        }
    }
    return pack('g*', ...$r, ...$g, ...$b);
}

function curlPost($ch, string $url, string $body, array $headers): string
{
    curl_setopt_array($ch, [CURLOPT_URL => $url, CURLOPT_POST => true, CURLOPT_POSTFIELDS => $body,
        CURLOPT_HTTPHEADER => $headers, CURLOPT_RETURNTRANSFER => true]);
    $out = curl_exec($ch);
    if ($out === false || curl_getinfo($ch, CURLINFO_RESPONSE_CODE) !== 200) {
        throw new RuntimeException('HTTP call failed: ' . curl_error($ch) . ' ' . $out);
    }
    return $out;
}

function kserveJson(array $data, array $shape): string
{
    return json_encode(['inputs' => [['name' => 'x', 'shape' => $shape, 'datatype' => 'FP32',
        'data' => $data]]], JSON_PRESERVE_ZERO_FRACTION);
}

/** Floor connection: a Unix socket plus, for shm, a memfd the floor server sent. */
function floorConnect(string $path): array
{
    $sock = socket_create(AF_UNIX, SOCK_STREAM, 0);
    socket_connect($sock, $path);
    $msg = ['buffer_size' => 1, 'controllen' => socket_cmsg_space(SOL_SOCKET, SCM_RIGHTS, 1)];
    socket_recvmsg($sock, $msg, 0);
    $mem = $msg['control'][0]['data'][0];
    stream_set_write_buffer($mem, 0);
    stream_set_read_buffer($mem, 0);
    return [$sock, $mem];
}

function floorTrip(array $conn, string $payload): void
{
    [$sock, $mem] = $conn;
    if ($payload !== '') {
        fseek($mem, 0);
        fwrite($mem, $payload);
    }
    socket_write($sock, pack('P', strlen($payload)) . str_repeat("\0", 16), 24);
    $got = '';
    while (strlen($got) < 24) {
        $chunk = socket_read($sock, 24 - strlen($got));
        if ($chunk === false || $chunk === '') {
            throw new RuntimeException('floor server went away');
        }
        $got .= $chunk;
    }
}

$url = $job['url'] ?? '';
$ch = curl_init();
curl_setopt($ch, CURLOPT_TCP_NODELAY, true);
$batchSizes = [];
$computeUs = [];
if (isset($job['sockets'])) {   // S7's two-process variant: each PHP process picks one server
    $job['socket'] = $job['sockets'][getmypid() % count($job['sockets'])];
}
// the client's default (auto spin-then-block); "_spin": always poll 50 µs; "_nospin": never poll
$spin = match (true) {
    str_ends_with($mode, '_nospin') => 0,
    str_ends_with($mode, '_spin') => 50,
    default => null,
};
$client = isset($job['socket']) ? new Client($job['socket'], timeout: 30.0, spinMicros: $spin) : null;
$floor = isset($job['floor']) ? floorConnect($job['floor']) : null;
$ctype = ['Content-Type: application/json'];

$call = match ($mode) {
    // S1: tiny tensor, no-op model
    'tb_tiny', 'tb_tiny_spin', 'tb_tiny_nospin' => fn () => $client->infer('echo', ['x' => Tensor::fromBytes($tiny, 'float32', [4])])['x']->bytes(),
    'http_json_tiny' => fn () => json_decode(curlPost($ch, "$url/json/echo", kserveJson([1.0, 2.0, 3.0, 4.0], [4]), $ctype), true),
    'http_orjson_tiny' => fn () => json_decode(curlPost($ch, "$url/orjson/echo", kserveJson([1.0, 2.0, 3.0, 4.0], [4]), $ctype), true),
    'http_binary_tiny' => fn () => curlPost($ch, "$url/binary/echo", $tiny, ['Content-Type: application/octet-stream', 'X-Shape: 4']),
    'floor_uds' => fn () => floorTrip($floor, ''),
    'floor_shm_tiny' => fn () => floorTrip($floor, $tiny),
    // S2: 602,112 bytes in from a PHP binary string, 4 KB out
    'tb_large', 'tb_large_spin', 'tb_large_nospin' => fn () => $client->infer('head', ['input' => Tensor::fromBytes($bytes, 'float32', [1, 3, 224, 224])])['output']->bytes(),
    'http_binary_large' => fn () => curlPost($ch, "$url/binary/head", $bytes, ['Content-Type: application/octet-stream', 'X-Shape: 1,3,224,224']),
    'http_json_large' => fn () => json_decode(curlPost($ch, "$url/json/head", kserveJson($floats, [1, 3, 224, 224]), $ctype), true),
    'http_orjson_large' => fn () => json_decode(curlPost($ch, "$url/orjson/head", kserveJson($floats, [1, 3, 224, 224]), $ctype), true),
    'floor_shm_large' => fn () => floorTrip($floor, $bytes),
    // S3: from a PHP float array (conversion timed on its own as well)
    'tb_array' => function () use ($client, $floats, &$extraUs) {
        $t = hrtime(true);
        $tensor = Tensor::fromArray($floats, 'float32')->reshape([1, 3, 224, 224]);
        $extraUs[] = (hrtime(true) - $t) / 1e3;
        return $client->infer('head', ['input' => $tensor])['output']->toArray();
    },
    'pack_only' => fn () => pack('g*', ...$floats),
    // S4: the seed's scenario, a 1024x768 JPEG -> ResNet-18 top-5
    'seed_gd' => fn () => $client->infer('resnet', ['input' => Tensor::fromBytes(seedPreprocess($jpeg), 'float32', [1, 3, 224, 224])])['index']->toArray(),
    'tb_jpeg' => function () use ($client, $jpeg, &$extraUs) {
        $t = hrtime(true);
        $out = $client->infer('jpeg', ['image' => Tensor::fromArray([$jpeg], 'bytes')])['index']->toArray();
        $timing = $client->lastTiming();   // overhead = round trip - queue - preprocessing + model
        $extraUs[] = (hrtime(true) - $t) / 1e3 - $timing['queue_us'] - $timing['compute_us'] - $timing['preprocess_us'];
        return $out;
    },
    'http_jpeg' => fn () => json_decode(curlPost($ch, "$url/jpeg/resnet", $jpeg, ['Content-Type: image/jpeg']), true),
    // S5 with ResNet-18: the 602,112-byte tensor from a PHP string
    // S7: any ResNet-18 variant of the batching servers (model and socket from the job).
    'tb_model' => function () use ($client, $bytes, $job, &$batchSizes, &$computeUs) {
        $out = $client->infer($job['model'], ['input' => Tensor::fromBytes($bytes, 'float32', [1, 3, 224, 224])]);
        $timing = $client->lastTiming();
        $batchSizes[] = $timing['batch_size'];
        $computeUs[] = $timing['compute_us'];
        return $out['prob']->toArray();
    },
    'tb_resnet' => fn () => $client->infer('resnet', ['input' => Tensor::fromBytes($bytes, 'float32', [1, 3, 224, 224])])['prob']->toArray(),
    'http_binary_resnet' => fn () => curlPost($ch, "$url/binary/resnet", $bytes, ['Content-Type: application/octet-stream', 'X-Shape: 1,3,224,224']),
    default => throw new InvalidArgumentException("unknown mode $mode"),
};

for ($i = 0; $i < ($job['warmup'] ?? 10); $i++) {
    $call();
}
$extraUs = [];
if (!empty($job['start'])) {
    touch($job['start'] . '.ready.' . getmypid());   // warm-up done: the harness counts these
    while (!file_exists($job['start'])) {
        usleep(1000);
    }
}
$samples = [];
$r0 = getrusage();
$t0 = hrtime(true);
$n = (int) ($job['n'] ?? 100);
$until = $t0 + (int) (($job['duration'] ?? 0) * 1e9);
for ($i = 0; ($job['duration'] ?? 0) > 0 ? hrtime(true) < $until : $i < $n; $i++) {
    $t = hrtime(true);
    $call();
    $samples[] = (hrtime(true) - $t) / 1e3;
}
$wall = (hrtime(true) - $t0) / 1e3;
$r1 = getrusage();
$cpu = ($r1['ru_utime.tv_sec'] - $r0['ru_utime.tv_sec'] + $r1['ru_stime.tv_sec'] - $r0['ru_stime.tv_sec']) * 1e6
    + ($r1['ru_utime.tv_usec'] - $r0['ru_utime.tv_usec'] + $r1['ru_stime.tv_usec'] - $r0['ru_stime.tv_usec']);
$warm = (int) ($job['warmup'] ?? 10);   // the batch sizes and compute times of the measured calls
echo json_encode(['samples_us' => $samples, 'extra_us' => $extraUs, 'wall_us' => $wall, 'cpu_us' => $cpu,
    'batch_sizes' => array_slice($batchSizes, $warm), 'compute_us' => array_slice($computeUs, $warm)]), "\n";
