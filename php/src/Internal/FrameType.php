<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

/**
 * Frame types (spec §4), written once for PHP and checked against spec/vectors by VectorsTest.
 *
 * @internal
 */
final class FrameType
{
    public const ATTACH = 0x01;
    public const ATTACH_OK = 0x81;
    public const PING = 0x02;
    public const PONG = 0x82;
    public const MODELS = 0x03;
    public const MODELS_OK = 0x83;
    public const INFER = 0x04;
    public const INFER_OK = 0x84;
    public const ADMIN = 0x05;
    public const ADMIN_OK = 0x85;
    public const ERROR = 0xFF;

    /** type => spec name, for messages and validation */
    public const NAMES = [
        self::ATTACH => 'ATTACH', self::ATTACH_OK => 'ATTACH_OK', self::PING => 'PING', self::PONG => 'PONG',
        self::MODELS => 'MODELS', self::MODELS_OK => 'MODELS_OK', self::INFER => 'INFER',
        self::INFER_OK => 'INFER_OK', self::ADMIN => 'ADMIN', self::ADMIN_OK => 'ADMIN_OK',
        self::ERROR => 'ERROR',
    ];
}
