<?php

/*
 * The semantic-search page: a search box; the top 10 Debian packages for the query with their
 * cosine similarity, and how long each stage took (embedding, nearest-neighbour search in the
 * TensorBridge server, PostgreSQL). The form POSTs, so that a long query fits (a URL does not).
 */

declare(strict_types=1);

require __DIR__ . '/../autoload.php';

use TensorBridge\Examples\Search\Searcher;
use TensorBridge\Exception\TensorBridgeException;

function h(string $text): string
{
    return htmlspecialchars($text, ENT_QUOTES | ENT_SUBSTITUTE, 'UTF-8');
}

$query = (string) ($_POST['q'] ?? $_GET['q'] ?? '');
$result = null;
$error = null;
$documents = null;
try {
    $searcher = Searcher::fromEnvironment();
    $documents = $searcher->store()->count();
    if (trim($query) !== '') {
        $result = $searcher->search($query);
    }
} catch (TensorBridgeException $e) {
    $error = 'The TensorBridge server could not answer (' . $e->getMessage() . '). Is it running? '
        . 'Start the demo with: make demo';
} catch (PDOException | RuntimeException $e) {
    $error = 'The database could not answer (' . $e->getMessage() . '). Start the demo with: make demo';
}
if ($error !== null) {
    http_response_code(503);
}
header('Cache-Control: no-store');
?>
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>TensorBridge semantic search</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="search.css">
</head>
<body>
<header>
  <h1>Semantic search over Debian packages</h1>
  <p>Your words are embedded by all-MiniLM-L6-v2 in the TensorBridge server; the nearest of
    <span id="documents"><?= $documents === null ? '?' : number_format($documents) ?></span>
    package descriptions (PostgreSQL) are found by one matrix product there.
    <a href="/">Image demo</a></p>
</header>
<form method="post" action="./">
  <input type="search" name="q" id="q" value="<?= h($query) ?>" autofocus
         placeholder="e.g. edit photos, web server, read email in a terminal" aria-label="Search">
  <button type="submit" id="go">Search</button>
</form>
<?php if ($error !== null): ?>
  <p class="error" id="error"><?= h($error) ?></p>
<?php elseif ($result === null): ?>
  <p class="hint" id="hint">Type a few words about what you are looking for: the search matches
    meaning, not keywords.</p>
<?php else: ?>
  <p class="timing" id="timing">
    embedding <b id="ms-embed"><?= sprintf('%.1f', $result['ms']['embed']) ?></b> ms ·
    nearest neighbours <b id="ms-nearest"><?= sprintf('%.1f', $result['ms']['nearest']) ?></b> ms ·
    PostgreSQL <b id="ms-database"><?= sprintf('%.1f', $result['ms']['database']) ?></b> ms ·
    total <b id="ms-total"><?= sprintf('%.1f', $result['ms']['total']) ?></b> ms
  </p>
  <?php if ($result['truncated']): ?>
  <p class="notice" id="truncated">Your query is longer than the model's 256 tokens: only its
    beginning was used.</p>
  <?php endif; ?>
  <ol id="results">
  <?php foreach ($result['hits'] as $hit): ?>
    <li><span class="score"><?= sprintf('%.3f', $hit['score']) ?></span>
      <span class="package"><?= h($hit['package']) ?></span>
      <span class="summary"><?= h($hit['summary']) ?></span>
      <span class="section"><?= h($hit['section']) ?></span></li>
  <?php endforeach; ?>
  </ol>
<?php endif; ?>
</body>
</html>
