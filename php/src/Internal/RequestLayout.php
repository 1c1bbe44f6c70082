<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

use TensorBridge\DType;
use TensorBridge\Exception\InvalidInputException;
use TensorBridge\Exception\ProtocolException;
use TensorBridge\Tensor;

/**
 * How requests are laid out in the region (spec §5.2): each request's inputs, 64-byte aligned,
 * then its output area; and how outputs are read back, checked against that area.
 *
 * @internal
 */
final class RequestLayout
{
    /** output area offered to a single request whose output size the signature does not give */
    private const UNKNOWN_OUTPUT_SINGLE = 262144;
    /** the same for each request of a pipeline (outputs that do not fit come back inline) */
    private const UNKNOWN_OUTPUT_PIPELINED = 65536;

    /** @var (\Closure(DType, list<int>, string): Tensor)|null makes a Tensor of bytes already checked */
    private static ?\Closure $wrap = null;

    /**
     * $n rounded up to the region alignment.
     */
    public static function align(int $n): int
    {
        return ($n + Spec::ALIGN - 1) & ~(Spec::ALIGN - 1);
    }

    /**
     * Region bytes the request's inputs take, each aligned.
     *
     * @param array<string, Tensor> $tensors
     */
    public static function inputBytes(array $tensors): int
    {
        $in = 0;
        foreach ($tensors as $t) {
            $in += self::align($t->nbytes());
        }
        return $in;
    }

    /**
     * The output area to offer: exact when the signature tells ($known), else a bounded guess.
     * It is bounded rather than "the rest of the region" so that a timed-out request does not
     * keep the whole region busy.
     *
     * @param int $in the region bytes the request's inputs take (inputBytes())
     * @param int $regionCap the largest region the server attaches (0 = not known)
     */
    public static function outputArea(?int $known, int $in, bool $single, int $regionCap): int
    {
        if ($known !== null) {
            return $known;
        }
        $out = max($in, $single ? self::UNKNOWN_OUTPUT_SINGLE : self::UNKNOWN_OUTPUT_PIPELINED);
        if ($regionCap > 0 && $in + $out > $regionCap) {
            $out = max($regionCap - $in, Spec::ALIGN);
        }
        return $out;
    }

    /**
     * Writes every request's inputs into the region from $base and plans its output area.
     *
     * @param list<array<string, Tensor>> $requests
     * @param list<int> $outAreas each request's output area (outputArea())
     * @param \Closure(): int $nextId gives each request its id
     * @return list<PlannedRequest>
     */
    public static function place(
        Region $region,
        int $base,
        array $requests,
        array $outAreas,
        \Closure $nextId,
        bool $checksums,
    ): array {
        $cursor = $base;
        $plans = [];
        foreach ($requests as $i => $tensors) {
            $start = $cursor;
            [$descriptors, $cursor] = self::writeInputs($region, $tensors, $cursor, $checksums, null);
            $outOffset = $cursor;
            $capacity = min($outAreas[$i], $region->size - $outOffset);
            $cursor = self::align($outOffset + $capacity);
            $end = min($cursor, $region->size);
            $plans[] = new PlannedRequest($nextId(), $start, $end, $outOffset, $capacity, $descriptors, count($tensors));
        }
        return $plans;
    }

    /**
     * Writes one request's inputs into the region from $cursor, each aligned: their descriptors
     * and the aligned offset after them; null (some inputs may be written) when an input would
     * end past $limit (null: the caller has checked that they fit).
     *
     * @param array<string, Tensor> $tensors
     * @return array{0: string, 1: int}|null
     */
    public static function writeInputs(Region $region, array $tensors, int $cursor, bool $checksums, ?int $limit): ?array
    {
        $descriptors = '';
        foreach ($tensors as $name => $tensor) {
            $bytes = $tensor->bytes();
            $len = strlen($bytes);
            if ($limit !== null && $len > $limit - $cursor) {
                return null;
            }
            $region->write($cursor, $bytes);
            $descriptors .= Descriptors::encodeFields(
                (string) $name,
                $tensor->dtypeEnum(),
                $tensor->shape(),
                Spec::LOCATION_REGION,
                $cursor,
                $len,
                $checksums ? Wire::crc32c($bytes) : 0,
            );
            $cursor = ($cursor + $len + Spec::ALIGN - 1) & ~(Spec::ALIGN - 1);
        }
        return [$descriptors, $cursor];
    }

    /**
     * The reply's outputs as tensors, read from the request's output area or the inline bytes.
     *
     * @return array<string, Tensor>
     * @throws ProtocolException when an output lies outside the area, fails its checksum or is malformed
     */
    public static function readOutputs(
        InferResponse $reply,
        int $outOffset,
        int $outCapacity,
        Region $region,
        bool $checksums,
    ): array {
        $outputs = [];
        $areaEnd = $outOffset + $outCapacity;
        foreach ($reply->outputs as $d) {
            if ($d->location === Spec::LOCATION_REGION) {
                if ($d->offset < $outOffset || $d->offset > $areaEnd || $d->nbytes > $areaEnd - $d->offset) {
                    throw new ProtocolException(sprintf(
                        'output "%s" at region bytes [%d, +%d) lies outside the output area [%d, +%d)',
                        $d->name,
                        $d->offset,
                        $d->nbytes,
                        $outOffset,
                        $outCapacity,
                    ));
                }
                $bytes = $region->read($d->offset, $d->nbytes);
            } else {
                $bytes = substr($reply->inline, $d->offset, $d->nbytes);
            }
            if ($checksums && Wire::crc32c($bytes) !== $d->crc32c) {
                throw new ProtocolException(sprintf('checksum mismatch on output "%s"', $d->name));
            }
            if ($d->dtype !== DType::BOOL && $d->dtype !== DType::BYTES) {
                // the decoder checked nbytes against shape and dtype, and $bytes is nbytes long
                $outputs[$d->name] = (self::$wrap ??= self::wrapper())($d->dtype, $d->shape, $bytes);
                continue;
            }
            try {
                $outputs[$d->name] = Tensor::fromBytes($bytes, $d->dtype, $d->shape); // checks the contents too
            } catch (InvalidInputException $e) {
                $message = sprintf('output "%s" is malformed: %s', $d->name, $e->getMessage());
                throw new ProtocolException($message, null, $e);
            }
        }
        return $outputs;
    }

    /**
     * A Tensor of bytes whose length the decoder checked against dtype and shape: the check
     * Tensor::fromBytes() would repeat on every output of every reply.
     *
     * @return \Closure(DType, list<int>, string): Tensor
     */
    private static function wrapper(): \Closure
    {
        $wrap = \Closure::bind(
            static fn (DType $dtype, array $shape, string $bytes): Tensor => new Tensor($dtype, $shape, $bytes),
            null,
            Tensor::class,
        );
        return $wrap ?? throw new \LogicException('cannot bind to Tensor');
    }
}
