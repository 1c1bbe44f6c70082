<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

/**
 * Optional fast path: the region mmap'ed through FFI, copied with FFI::memcpy / FFI::string.
 *
 * Used only where FFI may be used (CLI, or ffi.enable=1); under PHP-FPM's default
 * ffi.enable=preload, FFI::cdef() throws and the region falls back to stream I/O.
 *
 * @internal
 */
final class FfiMapping
{
    private const PROT_READ = 1;
    private const PROT_WRITE = 2;
    private const MAP_SHARED = 1;

    /** pointers at offsets used so far (requests reuse the same few offsets) */
    private const POINTERS_MAX = 64;

    private static ?\FFI $libc = null;
    private static bool $unavailable = false;
    /** @var array<int, \FFI\CData> offset => pointer into the mapping */
    private array $pointers = [];

    private function __construct(
        private readonly \FFI $ffi,
        private ?\FFI\CData $base,
        private readonly int $size,
    ) {
    }

    /**
     * Maps the descriptor behind $stream, or returns null when FFI is not usable here.
     *
     * @param resource $stream
     */
    public static function tryMap(mixed $stream, int $size): ?self
    {
        if ($size <= 0 || self::$unavailable || !self::ffiAllowed()) {
            return null;
        }
        $fd = self::findFd($stream);
        if ($fd === null) {
            return null;
        }
        try {
            self::$libc ??= \FFI::cdef(
                'void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);'
                . ' int munmap(void *addr, size_t length);',
            );
            $ptr = self::$libc->mmap(null, $size, self::PROT_READ | self::PROT_WRITE, self::MAP_SHARED, $fd, 0);
            if ($ptr === null || self::$libc->cast('intptr_t', $ptr)->cdata === -1) {
                return null; // MAP_FAILED
            }
            return new self(self::$libc, self::$libc->cast('char *', $ptr), $size);
        } catch (\Throwable) {
            self::$unavailable = true;
            return null;
        }
    }

    /**
     * Copies $data into the mapping at $offset (bounds are checked by the caller).
     */
    public function write(int $offset, string $data): void
    {
        \FFI::memcpy($this->pointers[$offset] ?? $this->pointer($offset), $data, strlen($data));
    }

    /**
     * Copies $len bytes out of the mapping at $offset (bounds are checked by the caller).
     */
    public function read(int $offset, int $len): string
    {
        return \FFI::string($this->pointers[$offset] ?? $this->pointer($offset), $len);
    }

    /**
     * A pointer $offset bytes into the mapping, kept for the next use of the same offset.
     */
    private function pointer(int $offset): \FFI\CData
    {
        if ($this->base === null) {
            throw new \LogicException('the region is unmapped');
        }
        if (count($this->pointers) >= self::POINTERS_MAX) {
            $this->pointers = [];
        }
        return $this->pointers[$offset] = $this->base + $offset;
    }

    /**
     * Unmaps the region.
     */
    public function close(): void
    {
        if ($this->base !== null) {
            $this->pointers = [];
            $this->ffi->munmap($this->base, $this->size);
            $this->base = null;
        }
    }

    public function __destruct()
    {
        $this->close();
    }

    private static function ffiAllowed(): bool
    {
        if (!extension_loaded('ffi') || !class_exists(\FFI::class)) {
            return false;
        }
        $mode = strtolower((string) ini_get('ffi.enable'));
        return $mode === '1' || $mode === 'true' || $mode === 'on' || ($mode === 'preload' && PHP_SAPI === 'cli');
    }

    /**
     * Finds the descriptor number of a stream by matching device and inode in /proc/self/fd.
     *
     * @param resource $stream
     */
    private static function findFd(mixed $stream): ?int
    {
        $st = @fstat($stream);
        $entries = @scandir('/proc/self/fd');
        if ($st === false || $entries === false) {
            return null;
        }
        foreach ($entries as $entry) {
            if ($entry === '.' || $entry === '..' || (string) (int) $entry !== $entry) {
                continue;
            }
            $other = @stat('/proc/self/fd/' . $entry);
            if ($other !== false && $other['ino'] === $st['ino'] && $other['dev'] === $st['dev']) {
                return (int) $entry;
            }
        }
        return null;
    }
}
