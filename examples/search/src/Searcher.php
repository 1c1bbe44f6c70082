<?php

declare(strict_types=1);

namespace TensorBridge\Examples\Search;

use TensorBridge\Client;

/**
 * A query in, the nearest documents out, with the time each stage took: the text is embedded
 * by `minilm`, its vector goes straight back to `search-index` (one matrix product over every
 * document's vector, in the server), and the ids found are read from PostgreSQL.
 */
final class Searcher
{
    public const EMBED_MODEL = 'minilm';
    public const INDEX_MODEL = 'search-index';

    public function __construct(private readonly Client $client, private readonly Store $store)
    {
    }

    /** Reads the settings from the environment (TB_SEARCH_DSN, TB_SEARCH_VECTORS). */
    public static function fromEnvironment(float $timeout = 10.0): self
    {
        $dsn = getenv('TB_SEARCH_DSN') ?: throw new \RuntimeException(
            'TB_SEARCH_DSN is not set: give the PostgreSQL DSN (scripts/search.sh sets it)');
        $vectors = getenv('TB_SEARCH_VECTORS') ?: throw new \RuntimeException(
            'TB_SEARCH_VECTORS is not set: give the vector file of the search-index model');
        return new self(new Client(timeout: $timeout), Store::open($dsn, $vectors));
    }

    public function store(): Store
    {
        return $this->store;
    }

    /**
     * The $k nearest documents with their cosine similarity, and milliseconds per stage.
     *
     * @return array{hits: list<array{id: int, package: string, summary: string, section: string,
     *     score: float}>, ms: array{embed: float, nearest: float, database: float, total: float},
     *     truncated: bool}
     */
    public function search(string $query, int $k = 10): array
    {
        $t0 = hrtime(true);
        $embedded = $this->client->infer(self::EMBED_MODEL, ['text' => [$query]]);
        $t1 = hrtime(true);
        $found = $this->client->infer(self::INDEX_MODEL, ['query' => $embedded['embedding']]);
        $t2 = hrtime(true);
        $ids = array_slice($found['ids']->toArray()[0] ?? [], 0, $k);
        $scores = $found['scores']->toArray()[0] ?? [];
        $docs = $this->store->fetch(array_map('intval', $ids));
        $t3 = hrtime(true);
        $scoreById = array_combine($ids, array_slice($scores, 0, count($ids)));
        $hits = array_map(static fn (array $doc): array => $doc + ['score' => (float) $scoreById[$doc['id']]], $docs);
        $ms = static fn (int $a, int $b): float => ($b - $a) / 1e6;
        return ['hits' => $hits, 'truncated' => (bool) $embedded['truncated']->toArray()[0],
            'ms' => ['embed' => $ms($t0, $t1), 'nearest' => $ms($t1, $t2),
                'database' => $ms($t2, $t3), 'total' => $ms($t0, $t3)]];
    }

    /**
     * Embeds texts in one request: FP32 [n, DIM], packed (as stored in the database).
     *
     * @param list<string> $texts
     */
    public function embed(array $texts): string
    {
        return $this->client->infer(self::EMBED_MODEL, ['text' => $texts])['embedding']->bytes();
    }
}
