<?php

/*
 * The web demo's JSON endpoint. POST multipart/form-data with `model` (see ../models.php) and
 * `image` (an encoded image file: the canvas as PNG, or an upload). Answers
 *   {"ok": true, "model": ..., "top": [{"label": ..., "score": ...}, x3], "notice": string|null,
 *    "timing": {"php_total_us", "round_trip_us", "preprocess_us", "compute_us", "queue_us"}}
 * or {"ok": false, "error": "what went wrong and what to do"}.
 *
 * Bad input (no file, not an image, too big, unknown model) answers 200 with ok=false: it is an
 * expected outcome the page shows, and a 4xx would also be logged as a failed resource in the
 * browser's console. A server that is down or failing answers 503/500.
 */

declare(strict_types=1);

$started = hrtime(true);

require __DIR__ . '/../../../php/autoload.php';

use TensorBridge\Client;
use TensorBridge\Exception\ConnectionException;
use TensorBridge\Exception\InvalidInputException;
use TensorBridge\Exception\ModelNotFoundException;
use TensorBridge\Exception\OverloadedException;
use TensorBridge\Exception\PayloadTooLargeException;
use TensorBridge\Exception\TensorBridgeException;
use TensorBridge\Exception\TimeoutException;

/** @var array<string, string> $models */
$models = require __DIR__ . '/../models.php';

/**
 * @param array<string, mixed> $body
 */
function answer(int $status, array $body): never
{
    http_response_code($status);
    header('Content-Type: application/json; charset=utf-8');
    header('Cache-Control: no-store');
    echo json_encode($body, JSON_THROW_ON_ERROR | JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE
        | JSON_INVALID_UTF8_SUBSTITUTE);
    exit;
}

function refuse(string $message): never
{
    answer(200, ['ok' => false, 'error' => $message]);
}

/** The one uploaded file's bytes, or a message that says what to do. */
function uploadedImage(): string
{
    $file = $_FILES['image'] ?? null;
    if (!is_array($file) || !is_int($file['error'] ?? null)) {
        // PHP drops the whole body (files and fields) when it exceeds post_max_size.
        if ((int) ($_SERVER['CONTENT_LENGTH'] ?? 0) > 0 && $_POST === []) {
            refuse('That file is too large: the limit is 8 MB. Upload a smaller image.');
        }
        refuse('No image was sent: draw a digit, or choose an image file to upload.');
    }
    $problem = match ($file['error']) {
        UPLOAD_ERR_OK => null,
        UPLOAD_ERR_INI_SIZE, UPLOAD_ERR_FORM_SIZE => 'That file is too large: the limit is 8 MB. Upload a smaller image.',
        UPLOAD_ERR_NO_FILE => 'No image was sent: draw a digit, or choose an image file to upload.',
        UPLOAD_ERR_PARTIAL => 'The upload was cut off before the end; try again.',
        default => sprintf('The upload failed on the web server (PHP upload error %d); try again.', $file['error']),
    };
    if ($problem !== null) {
        refuse($problem);
    }
    $bytes = file_get_contents($file['tmp_name']);
    if ($bytes === false || $bytes === '') {
        refuse('That file is empty. Upload a PNG, JPEG, GIF or WebP image.');
    }
    return $bytes;
}

if (($_SERVER['REQUEST_METHOD'] ?? '') !== 'POST') {
    answer(405, ['ok' => false, 'error' => 'POST an image here (multipart/form-data fields `model` and `image`).']);
}
$model = $_POST['model'] ?? '';
if (!is_string($model) || !array_key_exists($model, $models)) {
    refuse(sprintf('Unknown model; pick one of: %s.', implode(', ', array_keys($models))));
}
$image = uploadedImage();

// One client per FPM worker: its connection (and shared-memory region) persists across requests.
$client = new Client(null, timeout: 10.0);
try {
    $t0 = hrtime(true);
    $top = $client->classify($model, $image, topK: 3);
    $roundTrip = hrtime(true) - $t0;
} catch (PayloadTooLargeException $e) { // before its parent, InvalidInputException
    refuse(sprintf('That file is too large for the server (%s). Upload a smaller image.', $e->getMessage()));
} catch (InvalidInputException $e) {
    // The server decoded nothing it could use. Say first what a person most likely did.
    $headline = @getimagesizefromstring($image) === false
        ? 'That file is not an image'
        : 'The model cannot use that image';
    refuse(sprintf('%s (%s). Upload a PNG, JPEG, GIF or WebP image.', $headline, $e->getMessage()));
} catch (ModelNotFoundException $e) {
    answer(503, ['ok' => false, 'error' => sprintf(
        'The TensorBridge server has no model "%s" loaded (%s). Restart the demo: make demo-stop && make demo.',
        $model,
        $e->getMessage(),
    )]);
} catch (ConnectionException $e) {
    answer(503, ['ok' => false, 'error' => sprintf(
        'The TensorBridge server at %s is not reachable (%s). Start it with: make demo.',
        $client->socketPath(),
        $e->getMessage(),
    )]);
} catch (TimeoutException | OverloadedException $e) {
    answer(503, ['ok' => false, 'error' => sprintf('The server is busy (%s); try again in a moment.', $e->getMessage())]);
} catch (TensorBridgeException $e) {
    answer(500, ['ok' => false, 'error' => sprintf('The classification failed: %s', $e->getMessage())]);
}

$timing = $client->lastTiming() ?? [];
answer(200, [
    'ok' => true,
    'model' => $model,
    'top' => array_map(
        static fn (array $row): array => ['label' => (string) $row['label'], 'score' => (float) $row['score']],
        $top,
    ),
    'notice' => $client->lastNotice(),
    'timing' => [
        'php_total_us' => intdiv(hrtime(true) - $started, 1000),
        'round_trip_us' => intdiv($roundTrip, 1000),
        'preprocess_us' => $timing['preprocess_us'] ?? null,
        'compute_us' => $timing['compute_us'] ?? null,
        'queue_us' => $timing['queue_us'] ?? null,
    ],
]);
