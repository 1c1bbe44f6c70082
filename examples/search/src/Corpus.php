<?php

declare(strict_types=1);

namespace TensorBridge\Examples\Search;

/**
 * The documents: Debian's package descriptions, read from `apt-cache dumpavail` (every package
 * the machine's apt lists know) or, without apt lists, from dpkg's status file (the installed
 * packages). Nothing is downloaded.
 */
final class Corpus
{
    private const DPKG_STATUS = '/var/lib/dpkg/status';

    /**
     * Every package once: name => [package, summary, section].
     *
     * @return array<string, array{package: string, summary: string, section: string}>
     */
    public static function debianPackages(): array
    {
        $docs = self::parse(self::lines('apt-cache dumpavail 2>/dev/null'));
        if ($docs === [] && is_readable(self::DPKG_STATUS)) {
            $docs = self::parse(self::lines('cat ' . escapeshellarg(self::DPKG_STATUS)));
        }
        return $docs;
    }

    /**
     * The documents to index: every labelled one (the recall check needs them), then the others
     * in a fixed pseudo-random order (by md5 of the name) up to $limit in all; 0 = all.
     *
     * @param array<string, array{package: string, summary: string, section: string}> $all
     * @param list<string> $labelled
     * @return list<array{package: string, summary: string, section: string}>
     */
    public static function select(array $all, array $labelled, int $limit): array
    {
        $chosen = [];
        foreach ($labelled as $name) {
            if (isset($all[$name])) {
                $chosen[$name] = $all[$name];
            }
        }
        $others = array_diff_key($all, $chosen);
        uksort($others, static fn (string $a, string $b): int => strcmp(md5($a), md5($b)));
        foreach ($others as $name => $doc) {
            if ($limit > 0 && count($chosen) >= $limit) {
                break;
            }
            $chosen[$name] = $doc;
        }
        return array_values($chosen);
    }

    /**
     * What is embedded for a document.
     *
     * @param array{package: string, summary: string, section: string} $doc
     */
    public static function text(array $doc): string
    {
        return $doc['package'] . ': ' . $doc['summary'];
    }

    /** @return \Generator<string> the command's output, line by line */
    private static function lines(string $command): \Generator
    {
        $pipe = popen($command, 'r');
        if ($pipe === false) {
            return;
        }
        try {
            while (($line = fgets($pipe)) !== false) {
                yield rtrim($line, "\n");
            }
        } finally {
            pclose($pipe);
        }
    }

    /**
     * Debian control paragraphs -> documents (the first paragraph of a name wins).
     *
     * @param iterable<string> $lines
     * @return array<string, array{package: string, summary: string, section: string}>
     */
    private static function parse(iterable $lines): array
    {
        $docs = [];
        $fields = [];
        $flush = static function () use (&$docs, &$fields): void {
            $name = $fields['Package'] ?? '';
            $summary = trim($fields['Description'] ?? '');
            if ($name !== '' && $summary !== '' && !isset($docs[$name])
                && mb_check_encoding($summary, 'UTF-8')) {
                $docs[$name] = ['package' => $name, 'summary' => $summary,
                    'section' => $fields['Section'] ?? ''];
            }
            $fields = [];
        };
        foreach ($lines as $line) {
            if ($line === '') {
                $flush();
            } elseif ($line[0] !== ' ' && ($colon = strpos($line, ':')) !== false) {
                $fields[substr($line, 0, $colon)] = ltrim(substr($line, $colon + 1));
            }
        }
        $flush();
        return $docs;
    }
}
