<?php

declare(strict_types=1);

namespace TensorBridge;

use TensorBridge\Exception\InvalidInputException;

/**
 * Tensor data types with their wire codes (spec §2); names are the KServe v2 datatype names.
 */
enum DType: int
{
    case BOOL = 1;
    case UINT8 = 2;
    case INT8 = 3;
    case INT16 = 4;
    case INT32 = 5;
    case INT64 = 6;
    case FP16 = 7;
    case FP32 = 8;
    case FP64 = 9;
    case BF16 = 10;
    case BYTES = 11;

    /** names and aliases (lower case) => type */
    private const ALIASES = [
        'bool' => self::BOOL, 'boolean' => self::BOOL,
        'uint8' => self::UINT8, 'u8' => self::UINT8,
        'int8' => self::INT8, 'i8' => self::INT8,
        'int16' => self::INT16, 'i16' => self::INT16, 'short' => self::INT16,
        'int32' => self::INT32, 'i32' => self::INT32,
        'int64' => self::INT64, 'i64' => self::INT64, 'int' => self::INT64, 'long' => self::INT64,
        'fp16' => self::FP16, 'float16' => self::FP16, 'half' => self::FP16, 'f16' => self::FP16,
        'fp32' => self::FP32, 'float32' => self::FP32, 'float' => self::FP32, 'f32' => self::FP32,
        'fp64' => self::FP64, 'float64' => self::FP64, 'double' => self::FP64, 'f64' => self::FP64,
        'bf16' => self::BF16, 'bfloat16' => self::BF16,
        'bytes' => self::BYTES, 'string' => self::BYTES, 'str' => self::BYTES,
    ];

    /**
     * Item size in bytes; 0 for BYTES, whose items are variable-length.
     */
    public function itemSize(): int
    {
        return match ($this) {
            self::BOOL, self::UINT8, self::INT8 => 1,
            self::INT16, self::FP16, self::BF16 => 2,
            self::INT32, self::FP32 => 4,
            self::INT64, self::FP64 => 8,
            self::BYTES => 0,
        };
    }

    /**
     * The KServe name, e.g. 'FP32'.
     */
    public function name(): string
    {
        return $this->name;
    }

    /**
     * Parses a KServe name ('FP32') or a common alias ('float32', 'int64', 'bfloat16', ...), case-insensitively.
     *
     * @throws InvalidInputException for an unknown name
     */
    public static function fromName(string $name): self
    {
        $dtype = self::tryFromName($name);
        if ($dtype === null) {
            throw new InvalidInputException(sprintf(
                'unknown dtype "%s"; use one of BOOL, UINT8, INT8, INT16, INT32, INT64, FP16, FP32, FP64, BF16, BYTES'
                . ' (or an alias such as float32, int64, bfloat16)',
                $name,
            ));
        }
        return $dtype;
    }

    /**
     * Like fromName() but returns null for unknown names (e.g. 'ANY' in a model signature).
     */
    public static function tryFromName(string $name): ?self
    {
        // names already in lower case ('float32') need no case folding
        return self::ALIASES[$name] ?? self::ALIASES[strtolower(trim($name))] ?? null;
    }

    /**
     * Accepts a DType or a name/alias.
     *
     * @throws InvalidInputException for an unknown name
     */
    public static function of(string|self $dtype): self
    {
        return $dtype instanceof self ? $dtype : self::fromName($dtype);
    }
}
