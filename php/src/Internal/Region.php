<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

use TensorBridge\Exception\ConnectionException;
use TensorBridge\Exception\ProtocolException;

/**
 * The shared-memory region received over SCM_RIGHTS (spec §5), read and written with unbuffered stream I/O.
 *
 * @internal
 */
final class Region
{
    /**
     * @param resource $stream the memfd as a PHP stream
     */
    private function __construct(
        private mixed $stream,
        public readonly int $size,
        private ?FfiMapping $map,
    ) {
    }

    /**
     * Wraps a received descriptor; disables PHP's stream buffers (a buffered read would return stale bytes).
     *
     * @param resource $stream
     */
    public static function fromStream(mixed $stream, int $size): self
    {
        stream_set_read_buffer($stream, 0);
        stream_set_write_buffer($stream, 0);
        $stat = @fstat($stream);
        if ($stat === false || $stat['size'] < $size) {
            @fclose($stream);
            throw new ProtocolException(sprintf(
                'the region descriptor is %s bytes but ATTACH_OK announced %d',
                $stat === false ? 'of unknown size' : (string) $stat['size'],
                $size,
            ));
        }
        return new self($stream, $size, FfiMapping::tryMap($stream, $size));
    }

    /**
     * Writes bytes at an offset.
     */
    public function write(int $offset, string $data): void
    {
        $len = strlen($data);
        if ($len === 0) {
            return;
        }
        if ($this->map !== null) {
            $this->check($offset, $len);
            $this->map->write($offset, $data);
            return;
        }
        $this->seek($offset, $len);
        $done = 0;
        while ($done < $len) {
            $n = @fwrite($this->stream, $done === 0 ? $data : substr($data, $done));
            if ($n === false || $n === 0) {
                throw new ConnectionException(sprintf(
                    'cannot write %d bytes to the shared region at offset %d',
                    $len,
                    $offset,
                ));
            }
            $done += $n;
        }
    }

    /**
     * Reads bytes at an offset.
     */
    public function read(int $offset, int $len): string
    {
        if ($len === 0) {
            return '';
        }
        if ($this->map !== null) {
            $this->check($offset, $len);
            return $this->map->read($offset, $len);
        }
        $this->seek($offset, $len);
        $buf = '';
        while (strlen($buf) < $len) {
            $chunk = @fread($this->stream, $len - strlen($buf));
            if ($chunk === false || $chunk === '') {
                throw new ConnectionException(sprintf(
                    'cannot read %d bytes from the shared region at offset %d',
                    $len,
                    $offset,
                ));
            }
            $buf .= $chunk;
        }
        return $buf;
    }

    /**
     * Closes the descriptor.
     */
    public function close(): void
    {
        $this->map?->close();
        $this->map = null;
        if (is_resource($this->stream)) {
            @fclose($this->stream);
        }
    }

    public function __destruct()
    {
        $this->close();
    }

    /**
     * Whether the FFI mapping (rather than stream I/O) is in use.
     */
    public function isMapped(): bool
    {
        return $this->map !== null;
    }

    private function check(int $offset, int $len): void
    {
        if ($offset < 0 || $len < 0 || $offset > $this->size || $len > $this->size - $offset) {
            throw new ProtocolException(sprintf(
                'region access [%d, +%d) is outside the %d-byte region',
                $offset,
                $len,
                $this->size,
            ));
        }
    }

    private function seek(int $offset, int $len): void
    {
        $this->check($offset, $len);
        if (!is_resource($this->stream) || @fseek($this->stream, $offset) !== 0) {
            throw new ConnectionException('the shared region is no longer accessible');
        }
    }
}
