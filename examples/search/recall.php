<?php

/*
 * Search quality: recall@10 of the labelled queries (queries.json: each query with the packages
 * it must find). Prints one JSON object: recall_at_10 (the mean over queries of the share of
 * their packages found in the top 10), queries, and each miss with what came back instead.
 *
 *   php examples/search/recall.php        (settings as for index.php)
 */

declare(strict_types=1);

require __DIR__ . '/autoload.php';

use TensorBridge\Examples\Search\Searcher;

$searcher = Searcher::fromEnvironment();
/** @var list<array{query: string, relevant: list<string>}> $queries */
$queries = json_decode((string) file_get_contents(__DIR__ . '/queries.json'), true, 512, JSON_THROW_ON_ERROR);
$sum = 0.0;
$misses = [];
foreach ($queries as $q) {
    $top = array_column($searcher->search($q['query'], 10)['hits'], 'package');
    $found = array_intersect($q['relevant'], $top);
    $sum += count($found) / count($q['relevant']);
    if (count($found) < count($q['relevant'])) {
        $misses[] = ['query' => $q['query'], 'missing' => array_values(array_diff($q['relevant'], $top)),
            'top' => $top];
    }
}
echo json_encode(['recall_at_10' => round($sum / count($queries), 4), 'queries' => count($queries),
    'documents' => $searcher->store()->count(), 'misses' => $misses], JSON_PRETTY_PRINT), "\n";
