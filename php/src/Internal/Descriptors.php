<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

use TensorBridge\DType;
use TensorBridge\Exception\InvalidInputException;
use TensorBridge\Exception\ProtocolException;

/**
 * Tensor descriptors (spec §6.3): encoding, and decoding with every bounds check.
 *
 * A reply usually repeats the descriptors of the last one byte for byte (same output, shape,
 * offset). A descriptor's own checks (dtype, dims, name, UTF-8, nbytes against the shape,
 * alignment) depend on its bytes alone, so a descriptor that passed them is remembered by its
 * exact bytes and reused as is (TensorDescriptor is immutable); what depends on the frame or
 * the region (duplicate names, inline and region bounds) is checked on every frame.
 *
 * @internal
 */
final class Descriptors
{
    public const FIXED_SIZE = 32;
    /** distinct descriptors remembered; past that the memory starts afresh */
    private const KNOWN_MAX = 256;

    /** @var array<string, TensorDescriptor> exact descriptor bytes => the checked descriptor */
    private static array $known = [];

    /**
     * Encodes one tensor descriptor.
     */
    public static function encode(TensorDescriptor $d): string
    {
        return self::encodeFields($d->name, $d->dtype, $d->shape, $d->location, $d->offset, $d->nbytes, $d->crc32c);
    }

    /**
     * Encodes one tensor descriptor from its fields (no TensorDescriptor needed).
     *
     * @param list<int> $shape
     */
    public static function encodeFields(
        string $name,
        DType $dtype,
        array $shape,
        int $location,
        int $offset,
        int $nbytes,
        int $crc32c,
    ): string {
        $ndim = count($shape);
        if ($ndim > Spec::MAX_DIMS) {
            throw new InvalidInputException(sprintf(
                'tensor "%s" has %d dimensions; the maximum is 8',
                $name,
                $ndim,
            ));
        }
        $nameLen = strlen($name);
        if ($nameLen < 1 || $nameLen > Spec::MAX_NAME) {
            throw new InvalidInputException(sprintf(
                'tensor name "%s" must be 1 to %d bytes long',
                $name,
                Spec::MAX_NAME,
            ));
        }
        return pack('CCCCvvPPVV', $dtype->value, $ndim, $location, 0, $nameLen, 0, $offset, $nbytes, $crc32c, 0)
            . ($ndim > 0 ? pack('P*', ...$shape) : '') . $name;
    }

    /**
     * Decodes $count descriptors from $pos (advanced past them), then checks them against the
     * frame's inline bytes and, when known, the region size.
     *
     * @param string $what 'input' or 'output', for messages
     * @return list<TensorDescriptor>
     * @throws ProtocolException for anything malformed or out of bounds
     */
    public static function decode(
        string $body,
        int &$pos,
        int $count,
        string $what,
        ?int $regionSize,
    ): array {
        $len = strlen($body);
        $out = [];
        for ($i = 0; $i < $count; $i++) {
            if ($len - $pos >= self::FIXED_SIZE) {
                // ndim (byte 1) and name_len (bytes 4-5) give the descriptor's length
                $size = self::FIXED_SIZE + 8 * ord($body[$pos + 1]) + (ord($body[$pos + 4]) | ord($body[$pos + 5]) << 8);
                if ($len - $pos >= $size) {
                    $known = self::$known[substr($body, $pos, $size)] ?? null;
                    if ($known !== null) {
                        $out[] = $known;
                        $pos += $size;
                        continue;
                    }
                }
            }
            $start = $pos;
            $d = self::decodeOne($body, $pos, $i, $what);
            if (count(self::$known) >= self::KNOWN_MAX) {
                self::$known = [];
            }
            self::$known[substr($body, $start, $pos - $start)] = $d;
            $out[] = $d;
        }
        self::checkPlacement($out, strlen($body) - $pos, $regionSize, $what);
        return $out;
    }

    /**
     * One descriptor with the checks that depend on its bytes alone.
     */
    private static function decodeOne(string $body, int &$pos, int $i, string $what): TensorDescriptor
    {
        $len = strlen($body);
        if ($len - $pos < self::FIXED_SIZE) {
            throw new ProtocolException(sprintf('body is truncated inside %s descriptor %d', $what, $i));
        }
        $d = unpack('Cdtype/Cndim/Cloc/Cres/vname_len/vres2/Poff/Pnbytes/Vcrc/Vres3', $body, $pos);
        $dtype = DType::tryFrom($d['dtype']);
        if ($dtype === null) {
            throw new ProtocolException(sprintf(
                '%s descriptor %d has unknown dtype code %d',
                $what,
                $i,
                $d['dtype'],
            ));
        }
        if ($d['ndim'] > Spec::MAX_DIMS) {
            throw new ProtocolException(sprintf(
                '%s descriptor %d has %d dims (max %d)',
                $what,
                $i,
                $d['ndim'],
                Spec::MAX_DIMS,
            ));
        }
        if ($d['loc'] !== Spec::LOCATION_REGION && $d['loc'] !== Spec::LOCATION_INLINE) {
            throw new ProtocolException(sprintf('%s descriptor %d has unknown location %d', $what, $i, $d['loc']));
        }
        if ($d['res'] !== 0 || $d['res2'] !== 0 || $d['res3'] !== 0) {
            throw new ProtocolException(sprintf('%s descriptor %d has non-zero reserved fields', $what, $i));
        }
        if ($d['name_len'] < 1 || $d['name_len'] > Spec::MAX_NAME) {
            throw new ProtocolException(sprintf(
                '%s descriptor %d name_len %d is not in 1..%d',
                $what,
                $i,
                $d['name_len'],
                Spec::MAX_NAME,
            ));
        }
        Wire::expectNonNegative("$what descriptor $i offset", $d['off']);
        Wire::expectNonNegative("$what descriptor $i nbytes", $d['nbytes']);
        $pos += self::FIXED_SIZE;
        $tail = 8 * $d['ndim'] + $d['name_len'];
        if ($len - $pos < $tail) {
            throw new ProtocolException(sprintf('body is truncated inside %s descriptor %d', $what, $i));
        }
        $shape = $d['ndim'] > 0 ? array_values(unpack('P' . $d['ndim'], $body, $pos)) : [];
        foreach ($shape as $dim) {
            Wire::expectNonNegative("$what descriptor $i dimension", $dim);
        }
        $pos += 8 * $d['ndim'];
        $name = substr($body, $pos, $d['name_len']);
        $pos += $d['name_len'];
        Wire::expectUtf8("$what descriptor $i name", $name);
        $descriptor = new TensorDescriptor($name, $dtype, $shape, $d['loc'], $d['off'], $d['nbytes'], $d['crc']);
        self::checkSize($descriptor, $what);
        return $descriptor;
    }

    /**
     * nbytes against the shape and dtype; a region offset's alignment.
     */
    private static function checkSize(TensorDescriptor $d, string $what): void
    {
        try {
            $count = TensorCodec::elementCount($d->shape);
        } catch (InvalidInputException $e) {
            throw new ProtocolException(sprintf('%s "%s": %s', $what, $d->name, $e->getMessage()), null, $e);
        }
        $size = $d->dtype->itemSize();
        if ($size > 0) {
            if ($count > intdiv(PHP_INT_MAX, $size) || $count * $size !== $d->nbytes) {
                throw new ProtocolException(sprintf(
                    '%s "%s": nbytes %d does not match shape %s of %s',
                    $what,
                    $d->name,
                    $d->nbytes,
                    json_encode($d->shape),
                    $d->dtype->name,
                ));
            }
        } elseif ($count > intdiv(PHP_INT_MAX, 4) || $d->nbytes < 4 * $count) {
            throw new ProtocolException(sprintf(
                '%s "%s": %d BYTES items cannot fit in %d bytes',
                $what,
                $d->name,
                $count,
                $d->nbytes,
            ));
        }
        if ($d->location === Spec::LOCATION_REGION && $d->offset % Spec::ALIGN !== 0) {
            throw new ProtocolException(sprintf(
                '%s "%s": region offset %d is not a multiple of %d',
                $what,
                $d->name,
                $d->offset,
                Spec::ALIGN,
            ));
        }
    }

    /**
     * What depends on the frame: distinct names, inline bytes within the inline data, region
     * bytes within the region (when its size is known).
     *
     * @param list<TensorDescriptor> $descriptors
     */
    private static function checkPlacement(array $descriptors, int $inlineLen, ?int $regionSize, string $what): void
    {
        if (count($descriptors) > 1) {
            $seen = [];
            foreach ($descriptors as $d) {
                if (isset($seen[$d->name])) {
                    throw new ProtocolException(sprintf('two %ss are named "%s"', $what, $d->name));
                }
                $seen[$d->name] = true;
            }
        }
        foreach ($descriptors as $d) {
            if ($d->location === Spec::LOCATION_INLINE) {
                if ($d->offset > $inlineLen || $d->nbytes > $inlineLen - $d->offset) {
                    throw new ProtocolException(sprintf(
                        '%s "%s": inline bytes [%d, +%d) lie outside the %d bytes of inline data',
                        $what,
                        $d->name,
                        $d->offset,
                        $d->nbytes,
                        $inlineLen,
                    ));
                }
            } elseif ($regionSize !== null && ($d->offset > $regionSize || $d->nbytes > $regionSize - $d->offset)) {
                throw new ProtocolException(sprintf(
                    '%s "%s": region bytes [%d, +%d) lie outside the %d-byte region',
                    $what,
                    $d->name,
                    $d->offset,
                    $d->nbytes,
                    $regionSize,
                ));
            }
        }
    }
}
