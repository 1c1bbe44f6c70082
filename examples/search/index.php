<?php

/*
 * Indexes Debian's package descriptions for the semantic-search example: each package's
 * "name: summary" is embedded by TensorBridge (model `minilm`) in batches and stored in
 * PostgreSQL with its vector; the vectors are appended to the file the `search-index` model
 * reads. Packages already in the database are skipped, so a second run only adds new ones.
 *
 *   php examples/search/index.php [--limit N] [--batch N]
 *
 * --limit: documents in all (default 2000; 0 = every package apt knows, about 63,000 on
 * Debian 12). Settings from the environment: TENSORBRIDGE_SOCKET, TB_SEARCH_DSN,
 * TB_SEARCH_VECTORS (scripts/search.sh sets them). Progress goes to stderr; the last line of
 * stdout is a JSON summary (documents, seconds, docs_per_s).
 */

declare(strict_types=1);

require __DIR__ . '/autoload.php';

use TensorBridge\Examples\Search\Corpus;
use TensorBridge\Examples\Search\Searcher;

$options = getopt('', ['limit:', 'batch:']);
$limit = (int) ($options['limit'] ?? 2000);
$batch = max(1, (int) ($options['batch'] ?? 32));

$searcher = Searcher::fromEnvironment(timeout: 120.0);
$store = $searcher->store();
$store->migrate();
$store->syncVectorFile();

/** @var list<array{query: string, relevant: list<string>}> $queries */
$queries = json_decode((string) file_get_contents(__DIR__ . '/queries.json'), true, 512, JSON_THROW_ON_ERROR);
$labelled = array_merge(...array_map(static fn (array $q): array => $q['relevant'], $queries));
$all = Corpus::debianPackages();
$known = $store->known();
$todo = array_values(array_filter(Corpus::select($all, $labelled, $limit),
    static fn (array $doc): bool => !isset($known[$doc['package']])));
fprintf(STDERR, "search: %d packages found, %d already indexed, %d to index\n",
    count($all), count($known), count($todo));

$t0 = hrtime(true);
$lastReport = $t0;
foreach (array_chunk($todo, $batch) as $i => $docs) {
    $store->add($docs, $searcher->embed(array_map([Corpus::class, 'text'], $docs)));
    $done = min(count($todo), ($i + 1) * $batch);
    $now = hrtime(true);
    if ($now - $lastReport > 2e9 || $done === count($todo)) {
        $rate = $done / max(1e-9, ($now - $t0) / 1e9);
        fprintf(STDERR, "search: indexed %d/%d (%.0f docs/s, about %.0f s left)\n", $done,
            count($todo), $rate, (count($todo) - $done) / max($rate, 1e-9));
        $lastReport = $now;
    }
}
$seconds = (hrtime(true) - $t0) / 1e9;
$total = $store->syncVectorFile();
fprintf(STDERR, "search: %d documents in the index\n", $total);
echo json_encode(['documents' => count($todo), 'seconds' => round($seconds, 2),
    'docs_per_s' => $todo === [] ? null : round(count($todo) / $seconds, 1), 'total' => $total]), "\n";
