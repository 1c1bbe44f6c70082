<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

/**
 * Breaker state in a small file, so that it survives across the web requests of a PHP-FPM
 * worker (PHP resets every static variable at the end of a request) and is shared by all
 * workers of the same user: when the server is down, they all fail fast together.
 *
 * The file exists only while there are failures to remember; in the normal (closed) state a
 * call costs one stat() of a missing file (under 1 µs). Writes go through a temporary file and
 * rename(), so readers never see half a state. The probe claim is an exclusively created
 * file (fopen mode "x"): exactly one caller wins it. The directory must belong to this user
 * and be private (0700); files owned by anybody else are ignored, so another local user
 * cannot hold the breaker open.
 *
 * @internal
 */
final class FileBreakerStore implements BreakerStore
{
    private readonly string $statePath;
    private readonly string $probePath;

    /**
     * @param string $dir a directory private to this user (created 0700 when first written)
     * @param string $key names the guarded server (a hash of the socket path)
     * @param int $uid this process's effective uid; files owned by other uids are ignored
     */
    public function __construct(private readonly string $dir, string $key, private readonly int $uid)
    {
        $this->statePath = $dir . '/' . $key . '.json';
        $this->probePath = $dir . '/' . $key . '.probe';
    }

    /**
     * The store for a socket path: a file in $dir, else in sys_get_temp_dir()/tensorbridge-<euid>
     * (created on the first failure, so that a healthy setup never writes anything); process
     * memory where the uid cannot be known (no ext-posix).
     *
     * @throws \InvalidArgumentException when $dir is given but is not a private directory of this user
     */
    public static function forSocket(string $socketPath, ?string $dir): BreakerStore
    {
        $key = 'breaker-' . substr(hash('sha256', $socketPath), 0, 24);
        if (!function_exists('posix_geteuid')) {
            return new MemoryBreakerStore($key);
        }
        $uid = posix_geteuid();
        if ($dir !== null) {
            if (!self::privateDirectory($dir, $uid)) {
                throw new \InvalidArgumentException(sprintf(
                    'breakerStateDir %s must be a directory owned by uid %d with mode 0700'
                    . ' (or one that can be created)',
                    $dir,
                    $uid,
                ));
            }
            return new self($dir, $key, $uid);
        }
        return new self(rtrim(sys_get_temp_dir(), '/') . '/tensorbridge-' . $uid, $key, $uid);
    }

    public function load(): ?array
    {
        // The usual case is no file (no failures remembered): is_file() answers that in under a
        // microsecond, a third of what a failing fopen() costs. PHP does not cache a missing file.
        if (!is_file($this->statePath)) {
            return null;
        }
        $h = @fopen($this->statePath, 'rb');
        if ($h === false) {
            return null;
        }
        try {
            $stat = fstat($h);
            if ($stat === false || $stat['uid'] !== $this->uid) {
                return null;
            }
            $raw = stream_get_contents($h, 4096);
        } finally {
            fclose($h);
        }
        $data = is_string($raw) ? json_decode($raw, true) : null;
        if (
            !is_array($data) || !is_int($data['failures'] ?? null)
            || !(is_float($data['open_until'] ?? null) || is_int($data['open_until'] ?? null)
                || ($data['open_until'] ?? null) === null)
        ) {
            return null; // unreadable: behave as closed rather than fail every call
        }
        return [
            'failures' => $data['failures'],
            'open_until' => $data['open_until'] === null ? null : (float) $data['open_until'],
            'reason' => is_string($data['reason'] ?? null) ? $data['reason'] : '',
        ];
    }

    public function save(array $state): void
    {
        if (!self::privateDirectory($this->dir, $this->uid)) {
            return; // best effort: where it cannot remember safely, the breaker stays closed
        }
        $tmp = sprintf('%s.%d.tmp', $this->statePath, getmypid());
        $json = json_encode($state, JSON_PRESERVE_ZERO_FRACTION | JSON_INVALID_UTF8_SUBSTITUTE);
        @unlink($tmp); // a leftover of a killed worker with our pid
        // 'x' = O_CREAT|O_EXCL: never follows a planted symlink; umask keeps it private from the start.
        $mask = umask(0077);
        $h = @fopen($tmp, 'xb');
        umask($mask);
        if ($h === false) {
            return; // best effort: a breaker that cannot remember stays closed
        }
        $ok = fwrite($h, (string) $json) !== false;
        fclose($h);
        if (!$ok || !@rename($tmp, $this->statePath)) {
            @unlink($tmp);
        }
    }

    public function clear(): void
    {
        @unlink($this->statePath);
        @unlink($this->probePath);
    }

    public function claimProbe(float $now, float $until): bool
    {
        for ($try = 0; $try < 2; $try++) {
            $mask = umask(0077);
            $h = @fopen($this->probePath, 'xb');
            umask($mask);
            if ($h !== false) {
                fwrite($h, sprintf('%.6F', $until));
                fclose($h);
                return true;
            }
            $held = @file_get_contents($this->probePath);
            if ($held !== false && (float) $held > $now && @fileowner($this->probePath) === $this->uid) {
                return false; // another caller is probing
            }
            @unlink($this->probePath); // an expired claim (its caller died) or a foreign file
        }
        return false;
    }

    public function releaseProbe(): void
    {
        @unlink($this->probePath);
    }

    private static function privateDirectory(string $dir, int $uid): bool
    {
        clearstatcache(true, $dir);
        if (is_link($dir)) {
            return false; // is_dir/fileowner follow links: another user could point it anywhere
        }
        if (!is_dir($dir) && !@mkdir($dir, 0700, true) && !is_dir($dir)) {
            return false;
        }
        clearstatcache(true, $dir);
        if (is_link($dir)) {
            return false;
        }
        $owner = @fileowner($dir);
        $perms = @fileperms($dir);
        return $owner === $uid && $perms !== false && ($perms & 0077) === 0;
    }
}
