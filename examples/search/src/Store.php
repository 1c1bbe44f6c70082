<?php

declare(strict_types=1);

namespace TensorBridge\Examples\Search;

use PDO;

/**
 * The documents in PostgreSQL (each with its vector) and the vector file the `search-index`
 * model reads (tensorbridge.models.nearest): one record per document, appended as documents
 * are added, rebuilt from the database when the two disagree.
 */
final class Store
{
    /** Values per vector (all-MiniLM-L6-v2). */
    public const DIM = 384;
    private const MAGIC = 'TBVECS01';
    private const HEADER_BYTES = 16;
    private const RECORD_BYTES = 8 + 4 * self::DIM;

    public function __construct(private readonly PDO $db, private readonly string $vectorFile)
    {
    }

    /** Connects with $dsn (e.g. pgsql:host=/run/dir;dbname=search;user=tensorbridge). */
    public static function open(string $dsn, string $vectorFile): self
    {
        $db = new PDO($dsn, null, null, [PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION,
            PDO::ATTR_DEFAULT_FETCH_MODE => PDO::FETCH_ASSOC]);
        return new self($db, $vectorFile);
    }

    /** Creates the table when missing. */
    public function migrate(): void
    {
        $this->db->exec((string) file_get_contents(__DIR__ . '/../schema.sql'));
    }

    public function count(): int
    {
        return (int) $this->db->query('SELECT count(*) FROM docs')->fetchColumn();
    }

    /** @return array<string, true> the packages already indexed */
    public function known(): array
    {
        $names = $this->db->query('SELECT package FROM docs')->fetchAll(PDO::FETCH_COLUMN);
        return array_fill_keys(array_map('strval', $names), true);
    }

    /**
     * Stores documents with their vectors (FP32 [n, DIM] as TensorBridge returned them, packed),
     * then appends their records to the vector file, so the index finds them on its next call.
     *
     * @param list<array{package: string, summary: string, section: string}> $docs
     */
    public function add(array $docs, string $vectors): void
    {
        $insert = $this->db->prepare('INSERT INTO docs (package, summary, section, embedding) '
            . 'VALUES (:package, :summary, :section, :embedding) RETURNING id');
        $records = '';
        $this->db->beginTransaction();
        foreach ($docs as $i => $doc) {
            $vector = substr($vectors, $i * 4 * self::DIM, 4 * self::DIM);
            $insert->bindValue(':package', $doc['package']);
            $insert->bindValue(':summary', $doc['summary']);
            $insert->bindValue(':section', $doc['section']);
            $insert->bindValue(':embedding', $vector, PDO::PARAM_LOB);
            $insert->execute();
            $records .= pack('P', (int) $insert->fetchColumn()) . $vector;
        }
        $this->db->commit();
        $this->append($records);
    }

    /**
     * Makes the vector file hold exactly the database's vectors (rebuilt, then renamed into
     * place, when the record count differs). Returns the number of vectors.
     */
    public function syncVectorFile(): int
    {
        $count = $this->count();
        clearstatcache();
        $size = is_file($this->vectorFile) ? filesize($this->vectorFile) : 0;
        if ($size === self::HEADER_BYTES + $count * self::RECORD_BYTES) {
            return $count;
        }
        $tmp = $this->vectorFile . '.tmp';
        $out = fopen($tmp, 'wb');
        fwrite($out, self::header());
        $rows = $this->db->query('SELECT id, embedding FROM docs ORDER BY id');
        foreach ($rows as $row) {
            $vector = is_resource($row['embedding']) ? stream_get_contents($row['embedding'])
                : $row['embedding'];
            fwrite($out, pack('P', (int) $row['id']) . $vector);
        }
        fclose($out);
        rename($tmp, $this->vectorFile);
        return $count;
    }

    /**
     * The documents with these ids, in the order given.
     *
     * @param list<int> $ids
     * @return list<array{id: int, package: string, summary: string, section: string}>
     */
    public function fetch(array $ids): array
    {
        if ($ids === []) {
            return [];
        }
        $query = $this->db->prepare('SELECT id, package, summary, section FROM docs '
            . 'WHERE id = ANY(:ids::bigint[])');
        $query->execute([':ids' => '{' . implode(',', $ids) . '}']);
        $byId = [];
        foreach ($query->fetchAll() as $row) {
            $row['id'] = (int) $row['id'];
            $byId[$row['id']] = $row;
        }
        return array_values(array_filter(array_map(static fn (int $id) => $byId[$id] ?? null, $ids)));
    }

    private static function header(): string
    {
        return self::MAGIC . pack('VV', self::DIM, 0);
    }

    private function append(string $records): void
    {
        $new = !is_file($this->vectorFile);
        $out = fopen($this->vectorFile, 'ab');
        flock($out, LOCK_EX);
        // One write per batch: the index reads whole records only, never half of one.
        fwrite($out, ($new ? self::header() : '') . $records);
        flock($out, LOCK_UN);
        fclose($out);
    }
}
