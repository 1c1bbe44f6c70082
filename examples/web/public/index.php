<?php

// The web demo's page: draw a digit or upload an image; app.js posts it to classify.php.

declare(strict_types=1);

require __DIR__ . '/../../../php/autoload.php';

use TensorBridge\Client;
use TensorBridge\Exception\TensorBridgeException;

/** @var array<string, string> $models */
$models = require __DIR__ . '/../models.php';

function e(string $text): string
{
    return htmlspecialchars($text, ENT_QUOTES | ENT_SUBSTITUTE, 'UTF-8');
}

// Ask the server which models it has, so that a down server or a missing model shows at once
// rather than on the first click. The socket comes from TENSORBRIDGE_SOCKET (php-fpm.conf).
$client = new Client(null, timeout: 2.0);
$loaded = [];
$problem = null;
try {
    $loaded = array_column($client->models(), 'name');
} catch (TensorBridgeException $e) {
    $problem = sprintf(
        'The TensorBridge server at %s does not answer (%s). Start the demo with `make demo`.',
        $client->socketPath(),
        $e->getMessage(),
    );
}
header('Content-Type: text/html; charset=utf-8');
?>
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>TensorBridge web demo</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="app.css">
</head>
<body>
<header>
  <h1>TensorBridge web demo</h1>
  <p>nginx &rarr; PHP-FPM &rarr; <code>$client-&gt;classify()</code> &rarr; a PyTorch model kept
     loaded by <code>tensorbridge serve</code>, tensors through shared memory.</p>
</header>
<?php if ($problem !== null) : ?>
<div class="box error" role="alert"><?= e($problem) ?></div>
<?php endif; ?>
<main>
  <section class="card" aria-label="Input">
    <label for="model">Model</label>
    <select id="model" name="model">
<?php foreach ($models as $name => $title) :
    $missing = $problem === null && !in_array($name, $loaded, true); ?>
      <option value="<?= e($name) ?>"<?= $missing ? ' disabled' : '' ?>><?=
        e($title . ($missing ? ' (not loaded by the server)' : '')) ?></option>
<?php endforeach; ?>
    </select>
    <p class="hint">Draw a digit, big and centred, filling the square:</p>
    <canvas id="pad" width="256" height="256" aria-label="Drawing pad"></canvas>
    <div class="row">
      <button type="button" id="clear">Clear</button>
      <button type="button" id="classify" class="primary">Classify drawing</button>
    </div>
    <p class="hint"><label for="file">or upload an image (PNG, JPEG, GIF, WebP):</label></p>
    <input type="file" id="file" name="image" accept="image/*">
  </section>
  <section class="card" aria-label="Result" id="result" data-state="idle">
    <h2>Result <span id="source" class="muted"></span></h2>
    <div id="error" class="box error" role="alert" hidden></div>
    <div id="notice" class="box notice" hidden></div>
    <ol id="top"></ol>
    <table id="timing" hidden>
      <caption>Latency of this classification</caption>
      <tbody></tbody>
    </table>
    <p id="idle" class="muted">Draw or upload something and the top-3 labels show here.</p>
  </section>
</main>
<script src="app.js"></script>
</body>
</html>
