<?php

declare(strict_types=1);

namespace TensorBridge;

use TensorBridge\Exception\InvalidInputException;
use TensorBridge\Internal\TensorCodec;

/**
 * An immutable tensor: a dtype, a shape and the packed little-endian bytes of spec §2.
 */
final class Tensor
{
    private mixed $arrayCache = null;
    private bool $cached = false;

    /**
     * @param list<int> $shape
     */
    private function __construct(
        private readonly DType $dtype,
        private readonly array $shape,
        private readonly string $bytes,
    ) {
    }

    /**
     * Builds a tensor from a (nested) PHP array or a scalar; the nesting gives the shape.
     *
     * @param array<mixed>|int|float|bool|string $data
     * @throws InvalidInputException for ragged arrays, values that do not fit the dtype, or more than 8 dimensions
     */
    public static function fromArray(array|int|float|bool|string $data, string|DType $dtype = 'float32'): self
    {
        $dtype = DType::of($dtype);
        [$shape, $flat] = TensorCodec::flatten($data);
        return new self($dtype, $shape, TensorCodec::pack($flat, $dtype, $shape));
    }

    /**
     * Wraps already packed little-endian bytes (for BYTES: the u32-length-prefixed items).
     *
     * @param list<int> $shape
     * @throws InvalidInputException when the byte length or structure does not match the shape
     */
    public static function fromBytes(string $bytes, string|DType $dtype, array $shape): self
    {
        $dtype = DType::of($dtype);
        $count = TensorCodec::elementCount($shape);
        if ($dtype === DType::BYTES) {
            TensorCodec::splitBytes($bytes, $count);
        } else {
            $expected = $count * $dtype->itemSize();
            if (strlen($bytes) !== $expected) {
                throw new InvalidInputException(sprintf(
                    'byte length %d does not match shape %s of %s: expected %d bytes (%d items x %d bytes)',
                    strlen($bytes),
                    json_encode($shape),
                    $dtype->name,
                    $expected,
                    $count,
                    $dtype->itemSize(),
                ));
            }
            if ($dtype === DType::BOOL && strspn($bytes, "\x00\x01") !== strlen($bytes)) {
                throw new InvalidInputException('BOOL tensor bytes must be 0 or 1');
            }
        }
        return new self($dtype, $shape, $bytes);
    }

    /**
     * The same bytes seen with another shape of the same element count (no copy), e.g. a
     * flat array of 150,528 floats as [1, 3, 224, 224].
     *
     * @param list<int> $shape
     * @throws InvalidInputException when the element counts differ
     */
    public function reshape(array $shape): self
    {
        $count = TensorCodec::elementCount($shape);
        if ($count !== $this->size()) {
            throw new InvalidInputException(sprintf(
                'cannot reshape %s (%d items) to %s (%d items)',
                json_encode($this->shape),
                $this->size(),
                json_encode($shape),
                $count,
            ));
        }
        return new self($this->dtype, $shape, $this->bytes);
    }

    /**
     * The KServe datatype name, e.g. 'FP32'.
     */
    public function dtype(): string
    {
        return $this->dtype->name;
    }

    /**
     * The datatype as an enum.
     */
    public function dtypeEnum(): DType
    {
        return $this->dtype;
    }

    /**
     * The shape, one int per dimension ([] for a scalar).
     *
     * @return list<int>
     */
    public function shape(): array
    {
        return $this->shape;
    }

    /**
     * The raw packed little-endian bytes (BYTES: u32-length-prefixed items).
     */
    public function bytes(): string
    {
        return $this->bytes;
    }

    /**
     * Number of elements (the product of the shape).
     */
    public function size(): int
    {
        return (int) array_product($this->shape);
    }

    /**
     * Size of the packed data in bytes.
     */
    public function nbytes(): int
    {
        return strlen($this->bytes);
    }

    /**
     * The values as nested PHP arrays following the shape (a scalar for a 0-dim tensor):
     * bool for BOOL, int for integer types, float for floating types, string for BYTES.
     */
    public function toArray(): mixed
    {
        if (!$this->cached) {
            $this->arrayCache = TensorCodec::reshape(TensorCodec::unpack($this->bytes, $this->dtype), $this->shape);
            $this->cached = true;
        }
        return $this->arrayCache;
    }
}
