<?php

declare(strict_types=1);

namespace TensorBridge\Tests;

use PHPUnit\Framework\TestCase;
use TensorBridge\DType;
use TensorBridge\Exception\InvalidInputException;

/**
 * Checks dtype names, aliases and item sizes (spec §2).
 */
final class DTypeTest extends TestCase
{
    /**
     * @return iterable<string, array{string, DType}>
     */
    public static function aliasProvider(): iterable
    {
        $aliases = [
            'FP32' => DType::FP32, 'float32' => DType::FP32, 'Float32' => DType::FP32, 'fp32' => DType::FP32,
            'float16' => DType::FP16, 'FP16' => DType::FP16, 'float64' => DType::FP64, 'FP64' => DType::FP64,
            'bfloat16' => DType::BF16, 'BF16' => DType::BF16, 'int8' => DType::INT8, 'INT16' => DType::INT16,
            'int16' => DType::INT16, 'int32' => DType::INT32, 'INT64' => DType::INT64, 'int64' => DType::INT64,
            'uint8' => DType::UINT8, 'UINT8' => DType::UINT8, 'bool' => DType::BOOL, 'BOOL' => DType::BOOL,
            'bytes' => DType::BYTES, 'BYTES' => DType::BYTES, ' double ' => DType::FP64,
        ];
        foreach ($aliases as $name => $dtype) {
            yield $name => [$name, $dtype];
        }
    }

    /**
     * @dataProvider aliasProvider
     */
    public function testAliases(string $name, DType $expected): void
    {
        self::assertSame($expected, DType::fromName($name));
        self::assertSame($expected, DType::of($name));
    }

    public function testCodesAndSizes(): void
    {
        $expected = [
            'BOOL' => [1, 1], 'UINT8' => [2, 1], 'INT8' => [3, 1], 'INT16' => [4, 2], 'INT32' => [5, 4],
            'INT64' => [6, 8], 'FP16' => [7, 2], 'FP32' => [8, 4], 'FP64' => [9, 8], 'BF16' => [10, 2],
            'BYTES' => [11, 0],
        ];
        self::assertCount(count($expected), DType::cases());
        foreach ($expected as $name => [$code, $size]) {
            $d = DType::from($code);
            self::assertSame($name, $d->name());
            self::assertSame($size, $d->itemSize());
        }
    }

    public function testUnknownName(): void
    {
        self::assertNull(DType::tryFromName('ANY'));
        $this->expectException(InvalidInputException::class);
        $this->expectExceptionMessage('unknown dtype "complex64"');
        DType::fromName('complex64');
    }
}
