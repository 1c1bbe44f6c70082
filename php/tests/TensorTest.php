<?php

declare(strict_types=1);

namespace TensorBridge\Tests;

use PHPUnit\Framework\TestCase;
use TensorBridge\DType;
use TensorBridge\Exception\InvalidInputException;
use TensorBridge\Internal\TensorCodec;
use TensorBridge\Tensor;

/**
 * Checks tensor packing against the spec's tensor vectors and the input validation.
 */
final class TensorTest extends TestCase
{
    /**
     * @return iterable<string, array{array<string, mixed>}>
     */
    public static function tensorProvider(): iterable
    {
        $json = (string) file_get_contents(__DIR__ . '/../../spec/vectors/vectors.json');
        foreach (json_decode($json, true, 512, JSON_THROW_ON_ERROR)['tensors'] as $vector) {
            yield $vector['name'] => [$vector];
        }
    }

    /**
     * @dataProvider tensorProvider
     * @param array<string, mixed> $vector
     */
    public function testFromArrayMatchesVector(array $vector): void
    {
        $t = Tensor::fromArray($vector['values'], $vector['dtype']);
        self::assertSame($vector['hex'], bin2hex($t->bytes()));
        self::assertSame($vector['shape'], $t->shape());
        self::assertSame($vector['dtype'], $t->dtype());
        self::assertSame(DType::fromName($vector['dtype']), $t->dtypeEnum());
    }

    /**
     * @dataProvider tensorProvider
     * @param array<string, mixed> $vector
     */
    public function testFromBytesDecodesVector(array $vector): void
    {
        $t = Tensor::fromBytes((string) hex2bin($vector['hex']), $vector['dtype'], $vector['shape']);
        self::assertSame($vector['values'], $t->toArray());
        self::assertSame($vector['values'], $t->toArray(), 'cached result');
        self::assertSame(strlen((string) hex2bin($vector['hex'])), $t->nbytes());
    }

    public function testRaggedArrayNamesTheRow(): void
    {
        $this->expectException(InvalidInputException::class);
        $this->expectExceptionMessage('ragged array: row 3 at depth 1 has 2 items, expected 3');
        Tensor::fromArray([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 2]]);
    }

    public function testRaggedDeeperLevel(): void
    {
        $this->expectException(InvalidInputException::class);
        $this->expectExceptionMessage('ragged array: row 3 at depth 2 has 1 items, expected 2');
        Tensor::fromArray([[[1, 2], [3, 4]], [[5, 6], [7]]]);
    }

    public function testScalarWhereRowExpected(): void
    {
        $this->expectException(InvalidInputException::class);
        $this->expectExceptionMessage('ragged array: row 1 at depth 1 is a int');
        Tensor::fromArray([[1, 2], 3]);
    }

    public function testArrayWhereScalarExpected(): void
    {
        $this->expectException(InvalidInputException::class);
        $this->expectExceptionMessage('item [1] is an array');
        Tensor::fromArray([1, [2]]);
    }

    /**
     * @return iterable<string, array{mixed, string}>
     */
    public static function badValueProvider(): iterable
    {
        yield 'string in floats' => [[[1.0, 'abc']], 'float32'];
        yield 'numeric string in floats' => [['1.5'], 'float32'];
        yield 'null in floats' => [[1.0, null], 'float64'];
        yield 'bool in floats' => [[true], 'float16'];
        yield 'object in floats' => [[new \stdClass()], 'bfloat16'];
        yield 'float in ints' => [[1.5], 'int64'];
        yield 'string in ints' => [['7'], 'int32'];
        yield 'int8 overflow' => [[128], 'int8'];
        yield 'uint8 negative' => [[-1], 'uint8'];
        yield 'int16 overflow' => [[40000], 'int16'];
        yield 'int32 overflow' => [[2147483648], 'int32'];
        yield 'bool 2' => [[2], 'bool'];
        yield 'bool string' => [['true'], 'bool'];
        yield 'bytes int' => [['a', 1], 'bytes'];
    }

    /**
     * @dataProvider badValueProvider
     */
    public function testBadValuesRejected(mixed $data, string $dtype): void
    {
        $this->expectException(InvalidInputException::class);
        Tensor::fromArray($data, $dtype);
    }

    public function testBadValueMessageGivesIndex(): void
    {
        $this->expectExceptionMessage("item [1, 0] is string 'x', expected a number");
        Tensor::fromArray([[1.0, 2.0], ['x', 3.0]]);
    }

    /**
     * Big rows of floats take the row-by-row path; a stray value anywhere in them is still named.
     *
     * @return iterable<string, array{mixed, string}>
     */
    public static function strayInBigRowsProvider(): iterable
    {
        foreach (['null' => null, 'string' => '0.5', 'nested array' => [0.5], 'bool' => true] as $what => $stray) {
            yield $what => [$stray, $what === 'nested array' ? 'an array' : get_debug_type($stray)];
        }
    }

    /**
     * @dataProvider strayInBigRowsProvider
     */
    public function testStrayValueInBigRowsIsNamed(mixed $stray, string $shown): void
    {
        $image = array_fill(0, 3, array_fill(0, 4, array_fill(0, 100, 0.25)));
        $image[2][3][57] = $stray;
        try {
            Tensor::fromArray($image, 'float32');
            self::fail('expected an InvalidInputException');
        } catch (InvalidInputException $e) {
            self::assertStringContainsString("item [2, 3, 57] is $shown", $e->getMessage());
        }
    }

    public function testBigRowsPackLikeOneList(): void
    {
        $rows = [];
        for ($r = 0; $r < 5; $r++) {
            $rows[] = array_map(static fn (int $i): float => $r * 1000 + $i / 7, range(0, 299));
        }
        $rows[4][299] = 12; // an int among the floats: accepted, takes the merged path
        foreach (['float32' => 'g*', 'float64' => 'e*'] as $dtype => $format) {
            $want = pack($format, ...array_merge(...$rows));
            self::assertSame($want, Tensor::fromArray($rows, $dtype)->bytes());
            $rows[4][299] = 12.0;
            self::assertSame($want, Tensor::fromArray($rows, $dtype)->bytes());
            $rows[4][299] = 12;
        }
        $flat = array_fill(0, 20000, 0.5); // more than one pack() slice
        self::assertSame(pack('g*', ...$flat), Tensor::fromArray($flat)->bytes());
    }

    public function testMoreThanEightDimsRejected(): void
    {
        $nine = [[[[[[[[[1.0]]]]]]]]];
        $eight = $nine[0];
        self::assertSame([1, 1, 1, 1, 1, 1, 1, 1], Tensor::fromArray($eight)->shape());
        $this->expectException(InvalidInputException::class);
        Tensor::fromArray($nine);
    }

    public function testFromBytesRejectsNineDims(): void
    {
        $this->expectException(InvalidInputException::class);
        Tensor::fromBytes('', 'uint8', [1, 1, 1, 1, 1, 1, 1, 1, 0]);
    }

    public function testFromBytesLengthMismatch(): void
    {
        $this->expectException(InvalidInputException::class);
        $this->expectExceptionMessage('byte length 8 does not match shape [1,3] of FP32: expected 12 bytes');
        Tensor::fromBytes(str_repeat("\0", 8), 'float32', [1, 3]);
    }

    public function testFromBytesNegativeDim(): void
    {
        $this->expectException(InvalidInputException::class);
        Tensor::fromBytes('', 'float32', [-1, 3]);
    }

    public function testFromBytesBoolNotZeroOne(): void
    {
        $this->expectException(InvalidInputException::class);
        Tensor::fromBytes("\x00\x02", 'bool', [2]);
    }

    public function testFromBytesBytesItemCount(): void
    {
        $this->expectException(InvalidInputException::class);
        $this->expectExceptionMessage('BYTES data holds 1 items but the shape needs 2');
        Tensor::fromBytes("\x01\x00\x00\x00a", 'bytes', [2]);
    }

    public function testFromBytesBytesTruncated(): void
    {
        $this->expectException(InvalidInputException::class);
        Tensor::fromBytes("\x05\x00\x00\x00ab", 'bytes', [1]);
    }

    public function testScalars(): void
    {
        $f = Tensor::fromArray(2.5);
        self::assertSame([], $f->shape());
        self::assertSame(2.5, $f->toArray());
        self::assertSame(1, $f->size());
        $i = Tensor::fromArray(-3, 'int64');
        self::assertSame(-3, $i->toArray());
        self::assertSame(pack('q', -3), $i->bytes());
        $b = Tensor::fromArray(true, 'bool');
        self::assertTrue($b->toArray());
        $s = Tensor::fromArray('héllo', 'bytes');
        self::assertSame('héllo', $s->toArray());
        self::assertSame("\x06\0\0\0héllo", $s->bytes());
        self::assertSame(3.0, Tensor::fromArray(3, 'float64')->toArray());
    }

    public function testEmptyDimensions(): void
    {
        $t = Tensor::fromArray([[], []], 'float32');
        self::assertSame([2, 0], $t->shape());
        self::assertSame('', $t->bytes());
        self::assertSame([[], []], $t->toArray());
        self::assertSame([], Tensor::fromBytes('', 'int32', [0, 4])->toArray());
        self::assertSame([[[]], [[]]], Tensor::fromBytes('', 'int32', [2, 1, 0])->toArray());
    }

    public function testNonListRowRejected(): void
    {
        $this->expectException(InvalidInputException::class);
        Tensor::fromArray([[1.0, 2.0], ['a' => 1.0, 'b' => 2.0]]);
    }

    public function testDTypeEnumAccepted(): void
    {
        self::assertSame('INT16', Tensor::fromArray([1, 2], DType::INT16)->dtype());
    }

    public function testIntegersRoundTrip(): void
    {
        $values = [PHP_INT_MIN, -1, 0, 1, PHP_INT_MAX];
        self::assertSame($values, Tensor::fromBytes(Tensor::fromArray($values, 'int64')->bytes(), 'int64', [5])->toArray());
        $values = [-2147483648, 2147483647];
        self::assertSame($values, Tensor::fromBytes(Tensor::fromArray($values, 'int32')->bytes(), 'int32', [2])->toArray());
    }

    public function testFp16RoundTripsEveryHalf(): void
    {
        $all = range(0, 0xFFFF);
        $floats = array_map(TensorCodec::halfToFloat(...), $all);
        $finite = array_values(array_filter($all, static fn (int $h): bool => ($h & 0x7C00) !== 0x7C00 || ($h & 0x3FF) === 0));
        $back = array_values(unpack('v*', Tensor::fromArray(array_map(TensorCodec::halfToFloat(...), $finite), 'fp16')->bytes()));
        self::assertSame($finite, $back);
        $nan = Tensor::fromArray([$floats[0x7E00]], 'fp16')->toArray();
        self::assertNan($nan[0]);
    }

    /**
     * @return iterable<string, array{float, int}>
     */
    public static function fp16RoundingProvider(): iterable
    {
        yield 'max' => [65504.0, 0x7BFF];
        yield 'rounds to max' => [65519.0, 0x7BFF];
        yield 'rounds to inf' => [65520.0, 0x7C00];
        yield 'inf' => [INF, 0x7C00];
        yield '-inf' => [-INF, 0xFC00];
        yield 'tie to even down' => [1.0 + 2 ** -11, 0x3C00];
        yield 'tie to even up' => [1.0 + 3 * 2 ** -11, 0x3C02];
        yield 'above tie' => [1.0 + 2 ** -11 + 2 ** -30, 0x3C01];
        yield 'min subnormal' => [2 ** -24, 0x0001];
        yield 'half min subnormal ties to 0' => [2 ** -25, 0x0000];
        yield 'above half min subnormal' => [2 ** -25 * 1.5, 0x0001];
        yield 'max subnormal' => [1023 * 2 ** -24, 0x03FF];
        yield 'subnormal rounds to min normal' => [2 ** -14 - 2 ** -26, 0x0400];
        yield 'min normal' => [2 ** -14, 0x0400];
        yield 'negative zero' => [-0.0, 0x8000];
        yield 'tiny' => [1e-300, 0x0000];
        yield 'third' => [1 / 3, 0x3555];
    }

    /**
     * @dataProvider fp16RoundingProvider
     */
    public function testFp16Rounding(float $value, int $bits): void
    {
        self::assertSame(pack('v', $bits), Tensor::fromArray([$value], 'float16')->bytes());
    }

    /**
     * @return iterable<string, array{float, int}>
     */
    public static function bf16RoundingProvider(): iterable
    {
        yield 'one' => [1.0, 0x3F80];
        yield 'tie to even down' => [1.0 + 2 ** -8, 0x3F80];
        yield 'tie to even up' => [1.0 + 3 * 2 ** -8, 0x3F82];
        yield 'inf' => [INF, 0x7F80];
        yield '-2' => [-2.0, 0xC000];
        yield 'third' => [1 / 3, 0x3EAB];
    }

    /**
     * @dataProvider bf16RoundingProvider
     */
    public function testBf16Rounding(float $value, int $bits): void
    {
        self::assertSame(pack('v', $bits), Tensor::fromArray([$value], 'bfloat16')->bytes());
    }

    public function testBf16NanStaysNan(): void
    {
        $v = Tensor::fromArray([NAN], 'bf16')->toArray();
        self::assertNan($v[0]);
    }

    public function testReshapeKeepsBytesAndChecksCount(): void
    {
        $flat = Tensor::fromArray([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 'float32');
        $t = $flat->reshape([2, 3]);
        self::assertSame([2, 3], $t->shape());
        self::assertSame($flat->bytes(), $t->bytes());
        self::assertSame([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], $t->toArray());
        $this->expectException(InvalidInputException::class);
        $this->expectExceptionMessage('cannot reshape');
        $flat->reshape([4, 2]);
    }
}
