<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

use TensorBridge\Exception\InvalidInputException;
use TensorBridge\Exception\ProtocolException;

/**
 * Pure encoders/decoders for every frame of the wire protocol (spec §3-§7), both directions.
 *
 * Every length and offset is bounds-checked; violations raise ProtocolException.
 *
 * @internal
 */
final class Wire
{
    /** INFER_OK fixed part: n_outputs, batch_size, queue_us, compute_us, preprocess_us, version (spec §6.2) */
    private const INFER_OK_FIXED = 20;

    /**
     * CRC-32C (Castagnoli) of $data as an unsigned int.
     */
    public static function crc32c(string $data): int
    {
        // hash('crc32c', raw) yields the checksum big-endian (checked against spec vector crc32c_check)
        return unpack('N', hash('crc32c', $data, true))[1];
    }

    /**
     * Encodes a whole frame: header + body.
     */
    public static function encodeFrame(int $type, int $requestId, string $body, bool $crc = false): string
    {
        if (!isset(FrameType::NAMES[$type])) {
            throw new \InvalidArgumentException(sprintf('unknown frame type 0x%02X', $type));
        }
        if (strlen($body) > Spec::MAX_BODY) {
            throw new InvalidInputException(sprintf(
                'frame body of %d bytes exceeds MAX_BODY (%d)',
                strlen($body),
                Spec::MAX_BODY,
            ));
        }
        return pack(
            'VCCvPVV',
            Spec::MAGIC,
            Spec::VERSION,
            $type,
            $crc ? Spec::FLAG_CRC : 0,
            $requestId,
            strlen($body),
            $crc ? self::crc32c($body) : 0,
        ) . $body;
    }

    /**
     * Decodes and validates a 24-byte header (magic, version, type, flags, body length).
     */
    public static function decodeHeader(string $header): FrameHeader
    {
        if (strlen($header) !== Spec::HEADER_SIZE) {
            throw new ProtocolException(sprintf(
                'frame header must be %d bytes, got %d',
                Spec::HEADER_SIZE,
                strlen($header),
            ));
        }
        $h = unpack('Vmagic/Cver/Ctype/vflags/Prid/Vlen/Vcrc', $header);
        if ($h['magic'] !== Spec::MAGIC) {
            throw new ProtocolException(sprintf(
                'bad frame magic 0x%08X (expected 0x%08X "TBR1"): the peer does not speak the TensorBridge protocol',
                $h['magic'],
                Spec::MAGIC,
            ));
        }
        if ($h['ver'] !== Spec::VERSION) {
            throw new ProtocolException(sprintf('unsupported protocol version %d (this client speaks 1)', $h['ver']));
        }
        if (!isset(FrameType::NAMES[$h['type']])) {
            throw new ProtocolException(sprintf('unknown frame type 0x%02X', $h['type']));
        }
        if (($h['flags'] & ~Spec::FLAG_CRC) !== 0) {
            throw new ProtocolException(sprintf('unknown frame flags 0x%04X', $h['flags']));
        }
        if ($h['len'] > Spec::MAX_BODY) {
            throw new ProtocolException(sprintf(
                'frame body length %d exceeds MAX_BODY (%d)',
                $h['len'],
                Spec::MAX_BODY,
            ));
        }
        return new FrameHeader($h['type'], $h['flags'], $h['rid'], $h['len'], $h['crc']);
    }

    /**
     * Decodes and validates a body for the header's frame type (spec §6.3 checks included).
     *
     * Returns null for PING/MODELS and the JSON text for PONG/MODELS_OK/ADMIN/ADMIN_OK.
     *
     * @param int|null $regionSize when known, region-located tensors and output areas are checked against it
     */
    public static function decodeBody(
        FrameHeader $header,
        string $body,
        ?int $regionSize = null,
    ): AttachRequest|AttachOk|InferRequest|InferResponse|ErrorReply|string|null {
        if (strlen($body) !== $header->bodyLen) {
            throw new ProtocolException(sprintf(
                'frame body is %d bytes, header says %d',
                strlen($body),
                $header->bodyLen,
            ));
        }
        if (($header->flags & Spec::FLAG_CRC) !== 0 && self::crc32c($body) !== $header->crc) {
            throw new ProtocolException(sprintf(
                'frame checksum mismatch for %s request %d: header says 0x%08X, body has 0x%08X',
                FrameType::NAMES[$header->type] ?? '?',
                $header->requestId,
                $header->crc,
                self::crc32c($body),
            ));
        }
        return match ($header->type) {
            FrameType::ATTACH => self::decodeAttach($body),
            FrameType::ATTACH_OK => self::decodeAttachOk($body),
            FrameType::PING, FrameType::MODELS => self::decodeEmpty($header->type, $body),
            FrameType::PONG, FrameType::MODELS_OK, FrameType::ADMIN, FrameType::ADMIN_OK => $body,
            FrameType::INFER => self::decodeInfer($body, $regionSize),
            FrameType::INFER_OK => self::decodeInferOk($body, $regionSize),
            FrameType::ERROR => self::decodeError($body),
            default => throw new ProtocolException(sprintf('unknown frame type 0x%02X', $header->type)),
        };
    }

    /**
     * Encodes a body for $type from its message (null for PING/MODELS, a JSON string for
     * PONG/MODELS_OK/ADMIN/ADMIN_OK).
     */
    public static function encodeBody(
        int $type,
        AttachRequest|AttachOk|InferRequest|InferResponse|ErrorReply|string|null $message,
    ): string {
        return match (true) {
            $type === FrameType::INFER && $message instanceof InferRequest => self::encodeInfer($message),
            $type === FrameType::ATTACH && $message instanceof AttachRequest
                => pack('VVP', $message->options, 0, $message->minRegion),
            $type === FrameType::ATTACH_OK && $message instanceof AttachOk
                => pack('PPVV', $message->regionSize, $message->regionCap, $message->maxBody, 0),
            ($type === FrameType::PING || $type === FrameType::MODELS) && $message === null => '',
            in_array($type, [FrameType::PONG, FrameType::MODELS_OK, FrameType::ADMIN, FrameType::ADMIN_OK], true)
                && is_string($message) => $message,
            $type === FrameType::INFER_OK && $message instanceof InferResponse => self::encodeInferOk($message),
            $type === FrameType::ERROR && $message instanceof ErrorReply
                => pack('vvV', $message->code, 0, strlen($message->message)) . $message->message,
            default => throw new \InvalidArgumentException(sprintf(
                'message %s does not fit frame type 0x%02X',
                get_debug_type($message),
                $type,
            )),
        };
    }

    /**
     * A whole INFER frame for a request laid out in the region (RequestLayout::place()).
     */
    public static function inferFrame(int $id, int $timeoutUs, Target $target, PlannedRequest $plan, bool $crc): string
    {
        $head = self::inferHead(
            $timeoutUs,
            $target->model,
            $plan->inputCount,
            $plan->outOffset,
            $plan->outCapacity,
            $target->version,
            $target->routingKey,
        );
        return self::encodeFrame(FrameType::INFER, $id, $head . $plan->descriptors, $crc);
    }

    private static function encodeInfer(InferRequest $r): string
    {
        $out = self::inferHead(
            $r->timeoutUs,
            $r->model,
            count($r->inputs),
            $r->outOffset,
            $r->outCapacity,
            $r->version,
            $r->routingKey,
        );
        foreach ($r->inputs as $d) {
            $out .= Descriptors::encode($d);
        }
        return $out . $r->inline;
    }

    /**
     * The INFER body up to its descriptors: fixed fields, model name, version and routing key.
     */
    public static function inferHead(
        int $timeoutUs,
        string $model,
        int $n,
        int $outOffset,
        int $outCapacity,
        ?int $version,
        ?string $routingKey,
    ): string {
        $modelLen = strlen($model);
        if ($modelLen < 1 || $modelLen > Spec::MAX_NAME) {
            throw new InvalidInputException(sprintf(
                'model name "%s" must be 1 to %d bytes long',
                $model,
                Spec::MAX_NAME,
            ));
        }
        if ($n < 1 || $n > Spec::MAX_INPUTS) {
            throw new InvalidInputException(sprintf('a request needs 1 to %d inputs, got %d', Spec::MAX_INPUTS, $n));
        }
        if ($version === null && $routingKey === null) {
            return pack('VvCCPP', $timeoutUs, $modelLen, $n, 0, $outOffset, $outCapacity) . $model;
        }
        $options = 0;
        $optional = '';
        if ($version !== null) {
            if ($version < 1 || $version > 0xFFFFFFFF) {
                throw new InvalidInputException(sprintf('model version %d must be 1 or more', $version));
            }
            $options |= Spec::INFER_OPT_VERSION;
            $optional .= pack('V', $version);
        }
        if ($routingKey !== null) {
            $keyLen = strlen($routingKey);
            if ($keyLen < 1 || $keyLen > 255) {
                throw new InvalidInputException(sprintf('a routing key must be 1 to 255 bytes long, got %d', $keyLen));
            }
            $options |= Spec::INFER_OPT_ROUTING_KEY;
            $optional .= chr($keyLen) . $routingKey;
        }
        return pack('VvCCPP', $timeoutUs, $modelLen, $n, $options, $outOffset, $outCapacity) . $model . $optional;
    }

    private static function encodeInferOk(InferResponse $r): string
    {
        $out = pack(
            'vvVVVV',
            count($r->outputs),
            $r->batchSize,
            $r->queueUs,
            $r->computeUs,
            $r->preprocessUs,
            $r->version,
        );
        foreach ($r->outputs as $d) {
            $out .= Descriptors::encode($d);
        }
        return $out . $r->inline;
    }

    private static function decodeEmpty(int $type, string $body): ?string
    {
        if ($body !== '') {
            throw new ProtocolException(sprintf(
                '%s frame must have an empty body, got %d bytes',
                FrameType::NAMES[$type],
                strlen($body),
            ));
        }
        return null;
    }

    private static function decodeAttach(string $body): AttachRequest
    {
        self::expectLength('ATTACH', $body, 16);
        $b = unpack('Vopt/Vres/Pmin', $body);
        if (($b['opt'] & ~Spec::OPT_CRC) !== 0) {
            throw new ProtocolException(sprintf('ATTACH has unknown option bits 0x%08X', $b['opt']));
        }
        self::expectZero('ATTACH reserved field', $b['res']);
        self::expectNonNegative('ATTACH min_region', $b['min']);
        return new AttachRequest($b['opt'], $b['min']);
    }

    private static function decodeAttachOk(string $body): AttachOk
    {
        self::expectLength('ATTACH_OK', $body, 24);
        $b = unpack('Psize/Pcap/Vmax/Vres', $body);
        self::expectZero('ATTACH_OK reserved field', $b['res']);
        self::expectNonNegative('ATTACH_OK region_size', $b['size']);
        self::expectNonNegative('ATTACH_OK region_cap', $b['cap']);
        return new AttachOk($b['size'], $b['cap'], $b['max']);
    }

    private static function decodeError(string $body): ErrorReply
    {
        if (strlen($body) < 8) {
            throw new ProtocolException(sprintf('ERROR body must be at least 8 bytes, got %d', strlen($body)));
        }
        $b = unpack('vcode/vres/Vlen', $body);
        self::expectZero('ERROR reserved field', $b['res']);
        if ($b['len'] !== strlen($body) - 8) {
            throw new ProtocolException(sprintf(
                'ERROR message_len %d does not match the %d bytes that follow',
                $b['len'],
                strlen($body) - 8,
            ));
        }
        return new ErrorReply($b['code'], substr($body, 8));
    }

    private static function decodeInfer(string $body, ?int $regionSize): InferRequest
    {
        $len = strlen($body);
        if ($len < 24) {
            throw new ProtocolException(sprintf('INFER body must be at least 24 bytes, got %d', $len));
        }
        $b = unpack('Vtimeout/vmodel_len/Cn/Copt/Pout_off/Pout_cap', $body);
        if (($b['opt'] & ~(Spec::INFER_OPT_VERSION | Spec::INFER_OPT_ROUTING_KEY)) !== 0) {
            throw new ProtocolException(sprintf('INFER has unknown option bits 0x%02X', $b['opt']));
        }
        if ($b['model_len'] < 1 || $b['model_len'] > Spec::MAX_NAME) {
            throw new ProtocolException(sprintf('INFER model_len %d is not in 1..%d', $b['model_len'], Spec::MAX_NAME));
        }
        if ($b['n'] < 1 || $b['n'] > Spec::MAX_INPUTS) {
            throw new ProtocolException(sprintf('INFER n_inputs %d is not in 1..%d', $b['n'], Spec::MAX_INPUTS));
        }
        self::checkArea('INFER output area', $b['out_off'], $b['out_cap'], $regionSize);
        if ($len < 24 + $b['model_len']) {
            throw new ProtocolException('INFER body is truncated inside the model name');
        }
        $model = substr($body, 24, $b['model_len']);
        self::expectUtf8('INFER model name', $model);
        $pos = 24 + $b['model_len'];
        $version = null;
        $routingKey = null;
        if (($b['opt'] & Spec::INFER_OPT_VERSION) !== 0) {
            if ($len - $pos < 4) {
                throw new ProtocolException('INFER body is truncated inside the model version');
            }
            $version = unpack('V', $body, $pos)[1];
            $pos += 4;
            if ($version === 0) {
                throw new ProtocolException('INFER asks for model version 0; versions start at 1');
            }
        }
        if (($b['opt'] & Spec::INFER_OPT_ROUTING_KEY) !== 0) {
            $keyLen = $len > $pos ? ord($body[$pos]) : -1;
            if ($keyLen < 1 || $len - $pos - 1 < $keyLen) {
                throw new ProtocolException('INFER routing key is empty or truncated');
            }
            $routingKey = substr($body, $pos + 1, $keyLen);
            $pos += 1 + $keyLen;
        }
        $inputs = Descriptors::decode($body, $pos, $b['n'], 'input', $regionSize);
        $inline = substr($body, $pos);
        return new InferRequest(
            $b['timeout'],
            $model,
            $b['out_off'],
            $b['out_cap'],
            $inputs,
            $inline,
            $version,
            $routingKey,
        );
    }

    private static function decodeInferOk(string $body, ?int $regionSize): InferResponse
    {
        if (strlen($body) < self::INFER_OK_FIXED) {
            throw new ProtocolException(sprintf(
                'INFER_OK body must be at least %d bytes, got %d',
                self::INFER_OK_FIXED,
                strlen($body),
            ));
        }
        $b = unpack('vn/vbatch/Vqueue/Vcompute/Vpre/Vversion', $body);
        $pos = self::INFER_OK_FIXED;
        $outputs = Descriptors::decode($body, $pos, $b['n'], 'output', $regionSize);
        $inline = $pos === strlen($body) ? '' : substr($body, $pos);
        return new InferResponse(
            $b['queue'],
            $b['compute'],
            $outputs,
            $inline,
            $b['pre'],
            $b['batch'],
            $b['version'],
        );
    }

    private static function checkArea(string $what, int $offset, int $capacity, ?int $regionSize): void
    {
        self::expectNonNegative("$what offset", $offset);
        self::expectNonNegative("$what capacity", $capacity);
        if ($offset % Spec::ALIGN !== 0) {
            throw new ProtocolException(sprintf('%s offset %d is not a multiple of %d', $what, $offset, Spec::ALIGN));
        }
        if ($regionSize !== null && ($offset > $regionSize || $capacity > $regionSize - $offset)) {
            throw new ProtocolException(sprintf(
                '%s [%d, +%d) lies outside the %d-byte region',
                $what,
                $offset,
                $capacity,
                $regionSize,
            ));
        }
    }

    private static function expectLength(string $what, string $body, int $len): void
    {
        if (strlen($body) !== $len) {
            throw new ProtocolException(sprintf('%s body must be %d bytes, got %d', $what, $len, strlen($body)));
        }
    }

    private static function expectZero(string $what, int $value): void
    {
        if ($value !== 0) {
            throw new ProtocolException(sprintf('%s must be 0, got %d', $what, $value));
        }
    }

    /**
     * @throws ProtocolException when a u64 field read as negative (2^63 or more)
     */
    public static function expectNonNegative(string $what, int $value): void
    {
        // u64 values >= 2^63 unpack as negative PHP ints: no real size or offset is that large
        if ($value < 0) {
            throw new ProtocolException(sprintf('%s %u is out of range', $what, $value));
        }
    }

    /**
     * @throws ProtocolException when $value is not valid UTF-8
     */
    public static function expectUtf8(string $what, string $value): void
    {
        if (preg_match('//u', $value) !== 1) {
            throw new ProtocolException(sprintf('%s is not valid UTF-8', $what));
        }
    }
}
