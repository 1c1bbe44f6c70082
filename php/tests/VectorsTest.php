<?php

declare(strict_types=1);

namespace TensorBridge\Tests;

use PHPUnit\Framework\TestCase;
use TensorBridge\DType;
use TensorBridge\ErrorCode;
use TensorBridge\Exception\ProtocolException;
use TensorBridge\Internal\AttachOk;
use TensorBridge\Internal\AttachRequest;
use TensorBridge\Internal\ErrorReply;
use TensorBridge\Internal\FrameType;
use TensorBridge\Internal\InferRequest;
use TensorBridge\Internal\InferResponse;
use TensorBridge\Internal\Spec;
use TensorBridge\Internal\TensorDescriptor;
use TensorBridge\Internal\Wire;

/**
 * Checks the frame codec against the golden vectors of spec/vectors/vectors.json, both directions.
 */
final class VectorsTest extends TestCase
{
    /**
     * @return array<string, mixed>
     */
    public static function vectors(): array
    {
        static $v = null;
        if ($v === null) {
            $v = json_decode(
                (string) file_get_contents(__DIR__ . '/../../spec/vectors/vectors.json'),
                true,
                512,
                JSON_THROW_ON_ERROR | JSON_BIGINT_AS_STRING,
            );
        }
        return $v;
    }

    /**
     * @return iterable<string, array{array<string, mixed>}>
     */
    public static function validProvider(): iterable
    {
        foreach (self::vectors()['valid'] as $vector) {
            yield $vector['name'] => [$vector];
        }
    }

    /**
     * @return iterable<string, array{array<string, mixed>}>
     */
    public static function invalidProvider(): iterable
    {
        foreach (self::vectors()['invalid'] as $vector) {
            yield $vector['name'] => [$vector];
        }
    }

    public function testConstantsMatchTheSpec(): void
    {
        $v = self::vectors();
        self::assertSame($v['magic'], Spec::MAGIC);
        self::assertSame($v['version'], Spec::VERSION);
        self::assertSame($v['types'], array_flip(FrameType::NAMES));
    }

    public function testEveryNumericConstantIsInTheSpecTable(): void
    {
        $spec = self::vectors()['constants'];
        $ours = (new \ReflectionClass(Spec::class))->getConstants();
        unset($ours['MAGIC'], $ours['VERSION']); // checked above, outside the constants table
        ksort($spec);
        ksort($ours);
        self::assertSame($spec, $ours);
    }

    public function testDTypesMatchTheSpecTable(): void
    {
        $v = self::vectors();
        self::assertSame(array_keys($v['dtypes']), array_map(static fn (DType $d): string => $d->name, DType::cases()));
        foreach ($v['dtypes'] as $name => $code) {
            self::assertSame($code, DType::fromName($name)->value);
            self::assertSame($name, DType::from($code)->name());
            self::assertSame($v['itemsizes'][$name], DType::from($code)->itemSize());
        }
    }

    public function testErrorCodesMatchTheSpecTable(): void
    {
        $spec = self::vectors()['errors'];
        $ours = [];
        foreach (ErrorCode::cases() as $case) {
            $ours[$case->name] = $case->value;
        }
        self::assertSame($spec, $ours);
        foreach ($spec as $name => $code) {
            self::assertSame(ErrorCode::from($code), ErrorCode::tryFromName($name));
        }
    }

    public function testCrc32cCheckValue(): void
    {
        $check = self::vectors()['crc32c_check'];
        self::assertSame($check['crc32c'], Wire::crc32c($check['input']));
    }

    /**
     * @dataProvider validProvider
     * @param array<string, mixed> $vector
     */
    public function testValidVectorEncodes(array $vector): void
    {
        $type = self::vectors()['types'][$vector['type']];
        $body = Wire::encodeBody($type, self::message($vector['type'], $vector['body']));
        $frame = Wire::encodeFrame($type, $vector['request_id'], $body, $vector['crc']);
        self::assertSame($vector['hex'], bin2hex($frame));
    }

    /**
     * @dataProvider validProvider
     * @param array<string, mixed> $vector
     */
    public function testValidVectorDecodes(array $vector): void
    {
        $bytes = (string) hex2bin($vector['hex']);
        $header = Wire::decodeHeader(substr($bytes, 0, Spec::HEADER_SIZE));
        self::assertSame(self::vectors()['types'][$vector['type']], $header->type);
        self::assertSame($vector['request_id'], $header->requestId);
        self::assertSame($vector['crc'] ? Spec::FLAG_CRC : 0, $header->flags);
        self::assertSame(strlen($bytes) - Spec::HEADER_SIZE, $header->bodyLen);
        $decoded = Wire::decodeBody($header, substr($bytes, Spec::HEADER_SIZE));
        self::assertEquals(self::message($vector['type'], $vector['body']), $decoded);
    }

    /**
     * @dataProvider invalidProvider
     * @param array<string, mixed> $vector
     */
    public function testInvalidVectorIsRejected(array $vector): void
    {
        self::assertSame('PROTOCOL_ERROR', $vector['error']);
        $bytes = (string) hex2bin($vector['hex']);
        if ($vector['stage'] === 'header') {
            $this->expectException(ProtocolException::class);
            Wire::decodeHeader(substr($bytes, 0, Spec::HEADER_SIZE));
            return;
        }
        self::assertSame('body', $vector['stage']);
        $header = Wire::decodeHeader(substr($bytes, 0, Spec::HEADER_SIZE));
        $this->expectException(ProtocolException::class);
        Wire::decodeBody($header, substr($bytes, Spec::HEADER_SIZE));
    }

    public function testHeaderRejectsWrongLength(): void
    {
        $this->expectException(ProtocolException::class);
        Wire::decodeHeader(str_repeat("\0", 23));
    }

    public function testRegionBoundsAreCheckedWhenTheRegionSizeIsKnown(): void
    {
        foreach (self::vectors()['valid'] as $v) {
            if ($v['name'] === 'infer_ok') {
                $bytes = (string) hex2bin($v['hex']);
                $header = Wire::decodeHeader(substr($bytes, 0, 24));
                self::assertInstanceOf(InferResponse::class, Wire::decodeBody($header, substr($bytes, 24), 4096 + 80));
                $this->expectException(ProtocolException::class);
                Wire::decodeBody($header, substr($bytes, 24), 4096 + 79);
            }
        }
        self::fail('vector infer_ok is missing');
    }

    public function testMisalignedRegionOffsetIsRejected(): void
    {
        $r = new InferResponse(0, 0, [new TensorDescriptor('y', DType::FP32, [1], 0, 64, 4)]);
        $ok = Wire::encodeFrame(FrameType::INFER_OK, 1, Wire::encodeBody(FrameType::INFER_OK, $r));
        self::assertInstanceOf(InferResponse::class, Wire::decodeBody(Wire::decodeHeader(substr($ok, 0, 24)), substr($ok, 24)));
        $bad = new InferResponse(0, 0, [new TensorDescriptor('y', DType::FP32, [1], 0, 32, 4)]);
        $frame = Wire::encodeFrame(FrameType::INFER_OK, 1, Wire::encodeBody(FrameType::INFER_OK, $bad));
        $this->expectException(ProtocolException::class);
        Wire::decodeBody(Wire::decodeHeader(substr($frame, 0, 24)), substr($frame, 24));
    }

    public function testDuplicateNamesAreRejected(): void
    {
        $d = new TensorDescriptor('x', DType::UINT8, [1], 0, 0, 1);
        $r = new InferRequest(0, 'm', 0, 0, [$d, $d]);
        $frame = Wire::encodeFrame(FrameType::INFER, 1, Wire::encodeBody(FrameType::INFER, $r));
        $this->expectException(ProtocolException::class);
        Wire::decodeBody(Wire::decodeHeader(substr($frame, 0, 24)), substr($frame, 24));
    }

    public function testErrorMessageLengthMustMatch(): void
    {
        $body = pack('vvV', 1, 0, 10) . 'short';
        $frame = Wire::encodeFrame(FrameType::ERROR, 1, $body);
        $this->expectException(ProtocolException::class);
        Wire::decodeBody(Wire::decodeHeader(substr($frame, 0, 24)), substr($frame, 24));
    }

    /**
     * Builds the message object a vector's "body" describes.
     *
     * @param array<string, mixed> $b
     */
    private static function message(string $type, array $b): AttachRequest|AttachOk|InferRequest|InferResponse|ErrorReply|string|null
    {
        $errors = self::vectors()['errors'];
        return match ($type) {
            'ATTACH' => new AttachRequest($b['options'], $b['min_region']),
            'ATTACH_OK' => new AttachOk($b['region_size'], $b['region_cap'], $b['max_body']),
            'PING', 'MODELS' => null,
            'PONG', 'MODELS_OK', 'ADMIN', 'ADMIN_OK' => $b['json'],
            'ERROR' => new ErrorReply($errors[$b['code']], $b['message']),
            'INFER' => new InferRequest(
                $b['timeout_us'],
                $b['model'],
                $b['out_offset'],
                $b['out_capacity'],
                array_map(self::descriptor(...), $b['inputs']),
                (string) hex2bin($b['inline_hex']),
                $b['version'],
                $b['routing_key'],
            ),
            'INFER_OK' => new InferResponse(
                $b['queue_us'],
                $b['compute_us'],
                array_map(self::descriptor(...), $b['outputs']),
                (string) hex2bin($b['inline_hex']),
                $b['preprocess_us'],
                $b['batch_size'],
                $b['version'],
            ),
            default => throw new \LogicException("unknown vector type $type"),
        };
    }

    /**
     * @param array<string, mixed> $t
     */
    private static function descriptor(array $t): TensorDescriptor
    {
        return new TensorDescriptor(
            $t['name'],
            DType::fromName($t['dtype']),
            $t['shape'],
            ['region' => 0, 'inline' => 1][$t['location']],
            $t['offset'],
            $t['nbytes'],
            $t['crc32c'],
        );
    }
}
