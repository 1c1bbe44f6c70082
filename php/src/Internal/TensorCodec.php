<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

use TensorBridge\DType;
use TensorBridge\Exception\InvalidInputException;
use TensorBridge\Exception\TensorBridgeException;

// Imported so that the per-item checks compile to type-check opcodes instead of calls through
// the namespace fallback (1.5 ms per 150,528 items on the development VM).
use function array_slice;
use function count;
use function is_bool;
use function is_float;
use function is_int;
use function is_string;
use function pack;
use function strlen;

/**
 * Converts between PHP values and the packed little-endian tensor encoding of spec §2.
 *
 * All bulk work is done by pack()/unpack() over flattened arrays.
 *
 * @internal
 */
final class TensorCodec
{
    private const PACK = [
        1 => 'C*', 2 => 'C*', 3 => 'c*', 4 => 's*', 5 => 'l*', 6 => 'q*', 8 => 'g*', 9 => 'e*',
    ];

    private const INT_RANGE = [
        2 => [0, 255], 3 => [-128, 127], 4 => [-32768, 32767], 5 => [-2147483648, 2147483647],
    ];

    /**
     * Items per pack() call. One spread of N arguments makes PHP map a fresh N x 16-byte VM stack
     * on every call (page faults included); slices of this size reuse the stack it has, which
     * halves the cost of packing 150,528 floats.
     */
    private const PACK_SLICE = 8192;
    /** rows at least this long are packed one by one rather than merged first */
    private const ROW_PACK_MIN = 64;

    private static ?bool $littleEndian = null;

    /**
     * Checks a (nested) PHP array's shape and returns [shape, rows]: its innermost lists in
     * row-major order (a 1-D list is one row, a scalar [[value]]). They are not merged into one
     * list: pack() takes them row by row, which for big rows saves a copy of every item.
     *
     * @return array{0: list<int>, 1: list<list<mixed>>}
     */
    public static function flatten(mixed $data): array
    {
        if (!is_array($data)) {
            return [[], [[$data]]];
        }
        $shape = [];
        $rows = [$data];
        $depth = 0;
        while (true) {
            $n = count($rows[0]);
            foreach ($rows as $i => $row) {
                if (!is_array($row)) {
                    throw new InvalidInputException(sprintf(
                        'ragged array: row %d at depth %d is a %s, expected an array of %d items',
                        $i,
                        $depth,
                        get_debug_type($row),
                        $n,
                    ));
                }
                if (count($row) !== $n) {
                    throw new InvalidInputException(sprintf(
                        'ragged array: row %d at depth %d has %d items, expected %d',
                        $i,
                        $depth,
                        count($row),
                        $n,
                    ));
                }
                if (!array_is_list($row)) {
                    throw new InvalidInputException(sprintf(
                        'row %d at depth %d is not a list (it has non-sequential keys); pass array_values() of it',
                        $i,
                        $depth,
                    ));
                }
            }
            $shape[] = $n;
            if (count($shape) > Spec::MAX_DIMS) {
                throw new InvalidInputException(sprintf(
                    'array has more than %d dimensions (the protocol maximum)',
                    Spec::MAX_DIMS,
                ));
            }
            if ($n === 0 || !is_array($rows[0][0])) {
                return [$shape, $rows];
            }
            $rows = count($rows) === 1 ? $rows[0] : array_merge(...$rows);
            $depth++;
        }
    }

    /**
     * Packs rows of values (flatten()'s) as $dtype; rejects values that do not fit the type.
     *
     * @param list<list<mixed>> $rows
     * @param list<int> $shape used for error messages only
     */
    public static function pack(array $rows, DType $dtype, array $shape): string
    {
        if (($dtype === DType::FP32 || $dtype === DType::FP64) && count($rows) > 1
            && count($rows[0]) >= self::ROW_PACK_MIN) {
            // Big rows of floats (e.g. an image as [3][224][224]) are checked and packed row by
            // row; anything else is merged into one list first.
            $parts = [];
            foreach ($rows as $row) {
                foreach ($row as $v) {
                    if (!is_float($v)) {
                        return self::packList(array_merge(...$rows), $dtype, $shape);
                    }
                }
                $parts[] = self::packSlices(self::PACK[$dtype->value], $row);
            }
            return implode('', $parts);
        }
        return self::packList(count($rows) === 1 ? $rows[0] : array_merge(...$rows), $dtype, $shape);
    }

    /**
     * Packs a flat list of values as $dtype; rejects values that do not fit the type.
     *
     * @param list<mixed> $flat
     * @param list<int> $shape used for error messages only
     */
    private static function packList(array $flat, DType $dtype, array $shape): string
    {
        self::assertLittleEndian();
        $code = $dtype->value;
        switch ($dtype) {
            case DType::FP16:
            case DType::BF16:
            case DType::FP32:
            case DType::FP64:
                // The common case, floats only, checked with the cheapest loop PHP has (one type
                // check per item); anything else takes the full check, which also accepts ints.
                foreach ($flat as $v) {
                    if (!is_float($v)) {
                        self::checkNumbers($flat, $shape);
                        break;
                    }
                }
                break;
            case DType::INT64:
                foreach ($flat as $k => $v) {
                    if (!is_int($v)) {
                        throw self::badItem($k, $v, $shape, 'an integer');
                    }
                }
                break;
            case DType::UINT8:
            case DType::INT8:
            case DType::INT16:
            case DType::INT32:
                [$lo, $hi] = self::INT_RANGE[$code];
                foreach ($flat as $k => $v) {
                    if (!is_int($v) || $v < $lo || $v > $hi) {
                        throw self::badItem($k, $v, $shape, sprintf('an integer in [%d, %d]', $lo, $hi));
                    }
                }
                break;
            case DType::BOOL:
                foreach ($flat as $k => $v) {
                    if (!is_bool($v) && $v !== 0 && $v !== 1) {
                        throw self::badItem($k, $v, $shape, 'a bool (or 0/1)');
                    }
                }
                break;
            case DType::BYTES:
                $parts = [];
                foreach ($flat as $k => $v) {
                    if (!is_string($v)) {
                        throw self::badItem($k, $v, $shape, 'a string');
                    }
                    $parts[] = pack('V', strlen($v)) . $v;
                }
                return implode('', $parts);
        }

        // Every item was checked above, so pack() can neither warn nor throw here.
        if ($dtype === DType::FP16) {
            $bits = unpack('q*', self::packSlices('e*', $flat));
            return self::packSlices('v*', array_map(self::doubleBitsToHalf(...), $bits));
        }
        if ($dtype === DType::BF16) {
            $bits = unpack('V*', self::packSlices('g*', $flat));
            return self::packSlices('v*', array_map(self::floatBitsToBf16(...), $bits));
        }
        return self::packSlices(self::PACK[$code], $flat);
    }

    /**
     * pack($format, ...$items) done PACK_SLICE items at a time.
     *
     * @param array<mixed> $items
     */
    private static function packSlices(string $format, array $items): string
    {
        $n = count($items);
        if ($n <= self::PACK_SLICE) {
            return pack($format, ...$items);
        }
        $parts = [];
        for ($i = 0; $i < $n; $i += self::PACK_SLICE) {
            $parts[] = pack($format, ...array_slice($items, $i, self::PACK_SLICE));
        }
        return implode('', $parts);
    }

    /**
     * Checks that every item is a number (int or float).
     *
     * @param list<mixed> $flat
     * @param list<int> $shape
     */
    private static function checkNumbers(array $flat, array $shape): void
    {
        foreach ($flat as $k => $v) {
            if (!is_float($v) && !is_int($v)) {
                throw self::badItem($k, $v, $shape, 'a number');
            }
        }
    }

    /**
     * Unpacks packed bytes (already validated against the shape) into a flat list.
     *
     * @return list<mixed>
     */
    public static function unpack(string $bytes, DType $dtype): array
    {
        self::assertLittleEndian();
        if ($bytes === '') {
            return [];
        }
        return match ($dtype) {
            DType::BOOL => array_map(static fn (int $b): bool => $b !== 0, array_values(unpack('C*', $bytes))),
            DType::FP16 => array_map(self::halfToFloat(...), array_values(unpack('v*', $bytes))),
            DType::BF16 => array_values(unpack('g*', "\0\0" . substr(chunk_split($bytes, 2, "\0\0"), 0, -2))),
            DType::BYTES => self::splitBytes($bytes, -1),
            default => array_values(unpack(self::PACK[$dtype->value], $bytes)),
        };
    }

    /**
     * Splits the u32-length-prefixed BYTES encoding into items; checks the structure and (if >= 0) the count.
     *
     * @return list<string>
     */
    public static function splitBytes(string $bytes, int $expectedCount): array
    {
        $items = [];
        $len = strlen($bytes);
        $pos = 0;
        while ($pos < $len) {
            if ($len - $pos < 4) {
                throw new InvalidInputException(sprintf(
                    'BYTES data is truncated: %d stray bytes at offset %d where a 4-byte item length was expected',
                    $len - $pos,
                    $pos,
                ));
            }
            $n = unpack('V', $bytes, $pos)[1];
            $pos += 4;
            if ($n > $len - $pos) {
                throw new InvalidInputException(sprintf(
                    'BYTES item %d claims %d bytes but only %d remain',
                    count($items),
                    $n,
                    $len - $pos,
                ));
            }
            $items[] = substr($bytes, $pos, $n);
            $pos += $n;
        }
        if ($expectedCount >= 0 && count($items) !== $expectedCount) {
            throw new InvalidInputException(sprintf(
                'BYTES data holds %d items but the shape needs %d',
                count($items),
                $expectedCount,
            ));
        }
        return $items;
    }

    /**
     * Validates a shape and returns its element count.
     *
     * @param array<mixed> $shape
     */
    public static function elementCount(array $shape): int
    {
        if (!array_is_list($shape)) {
            throw new InvalidInputException('shape must be a list of integers');
        }
        if (count($shape) > Spec::MAX_DIMS) {
            throw new InvalidInputException(sprintf(
                'shape has %d dimensions; the protocol maximum is %d',
                count($shape),
                Spec::MAX_DIMS,
            ));
        }
        $count = 1;
        foreach ($shape as $i => $d) {
            if (!is_int($d) || $d < 0) {
                throw new InvalidInputException(sprintf(
                    'shape dimension %d is %s; dimensions must be integers >= 0',
                    $i,
                    var_export($d, true),
                ));
            }
            if ($d !== 0 && $count > intdiv(PHP_INT_MAX, $d)) {
                throw new InvalidInputException('shape ' . json_encode($shape) . ' is too large');
            }
            $count *= $d;
        }
        return $count;
    }

    /**
     * Reshapes a flat list into nested lists following $shape (a scalar for a 0-dim shape).
     *
     * @param list<mixed> $flat
     * @param list<int> $shape
     */
    public static function reshape(array $flat, array $shape): mixed
    {
        if ($shape === []) {
            return $flat[0];
        }
        if (in_array(0, $shape, true)) {
            return self::emptyNested($shape);
        }
        for ($d = count($shape) - 1; $d >= 1; $d--) {
            $flat = array_chunk($flat, $shape[$d]);
        }
        return $flat;
    }

    /**
     * Converts the IEEE binary64 bit pattern (as a signed PHP int) to binary16, rounding to nearest even.
     */
    public static function doubleBitsToHalf(int $b): int
    {
        $sign = ($b >> 48) & 0x8000;
        $exp = ($b >> 52) & 0x7FF;
        $mant = $b & 0xFFFFFFFFFFFFF;
        if ($exp === 0x7FF) {
            return $sign | 0x7C00 | ($mant !== 0 ? 0x200 | (($mant >> 42) & 0x1FF) : 0);
        }
        $e = $exp - 1023 + 15;
        if ($e >= 31) {
            return $sign | 0x7C00;
        }
        if ($e >= 1) {
            $m = $mant >> 42;
            $rem = $mant & 0x3FFFFFFFFFF;
            $half = 0x20000000000;
            $h = ($e << 10) | $m;
            if ($rem > $half || ($rem === $half && ($m & 1) === 1)) {
                $h++; // a carry into the exponent is exactly right, up to infinity (0x7C00)
            }
            return $sign | $h;
        }
        if ($exp === 0) {
            return $sign; // binary64 subnormals are far below the smallest half subnormal
        }
        $shift = 43 - $e; // 42 mantissa bits dropped plus (1 - e) for the subnormal scaling
        if ($shift >= 54) {
            return $sign;
        }
        $full = $mant | 0x10000000000000;
        $m = $full >> $shift;
        $rem = $full & ((1 << $shift) - 1);
        $half = 1 << ($shift - 1);
        if ($rem > $half || ($rem === $half && ($m & 1) === 1)) {
            $m++;
        }
        return $sign | $m;
    }

    /**
     * Converts binary32 bits to bfloat16 bits, rounding to nearest even; NaN stays (quiet) NaN.
     */
    public static function floatBitsToBf16(int $b): int
    {
        if (($b & 0x7FFFFFFF) > 0x7F800000) {
            return ($b >> 16) | 0x40;
        }
        return (($b + 0x7FFF + (($b >> 16) & 1)) >> 16) & 0xFFFF;
    }

    /**
     * Converts binary16 bits to a PHP float (exact).
     */
    public static function halfToFloat(int $h): float
    {
        $exp = ($h >> 10) & 0x1F;
        $mant = $h & 0x3FF;
        if ($exp === 0) {
            $v = $mant * 5.9604644775390625E-8; // 2^-24
        } elseif ($exp === 31) {
            $v = $mant === 0 ? INF : NAN;
        } else {
            $v = ($mant + 1024) * (2.0 ** ($exp - 25));
        }
        return ($h & 0x8000) !== 0 ? -$v : $v;
    }

    /**
     * Throws unless the host packs 's', 'l' and 'q' little-endian (the wire byte order).
     */
    public static function assertLittleEndian(): void
    {
        if (self::$littleEndian === null) {
            self::$littleEndian = pack('S', 1) === "\x01\x00";
        }
        if (!self::$littleEndian) {
            throw new TensorBridgeException(
                'TensorBridge needs a little-endian host: PHP packs integers in machine byte order'
                . ' and the wire format is little-endian'
            );
        }
    }

    /**
     * @param list<int> $shape
     */
    private static function badItem(int $flatIndex, mixed $value, array $shape, string $expected): InvalidInputException
    {
        $index = [];
        for ($d = count($shape) - 1; $d >= 0; $d--) {
            $dim = max($shape[$d], 1);
            $index[$d] = $flatIndex % $dim;
            $flatIndex = intdiv($flatIndex, $dim);
        }
        ksort($index);
        $shown = is_array($value)
            ? 'an array (ragged array: it is nested deeper than the first item)'
            : get_debug_type($value) . (is_scalar($value) ? ' ' . var_export($value, true) : '');
        return new InvalidInputException(sprintf(
            'item [%s] is %s, expected %s',
            implode(', ', $index),
            $shown,
            $expected,
        ));
    }

    /**
     * @param list<int> $shape
     * @return list<mixed>
     */
    private static function emptyNested(array $shape): array
    {
        if ($shape[0] === 0 || count($shape) === 1) {
            return [];
        }
        return array_fill(0, $shape[0], self::emptyNested(array_slice($shape, 1)));
    }
}
