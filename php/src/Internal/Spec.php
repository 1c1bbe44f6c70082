<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

/**
 * The numeric constants of spec/protocol.md (section in each comment), written once for PHP and
 * checked against spec/vectors/vectors.json by VectorsTest. Frame types: FrameType; data types:
 * TensorBridge\DType; error codes: TensorBridge\ErrorCode.
 *
 * @internal
 */
final class Spec
{
    /** §3: the bytes "TBR1" read as a little-endian u32 */
    public const MAGIC = 0x31524254;
    /** §3 */
    public const VERSION = 1;
    /** §3 */
    public const HEADER_SIZE = 24;
    /** §3: the largest frame body */
    public const MAX_BODY = 16777216;
    /** §3: header flag, the body and tensors carry CRC-32C */
    public const FLAG_CRC = 0x0001;
    /** §2 */
    public const MAX_DIMS = 8;
    /** §6.1 */
    public const MAX_INPUTS = 64;
    /** §6.1, §6.3: model and tensor names are 1..MAX_NAME bytes */
    public const MAX_NAME = 255;
    /** §5.2: every tensor in the region starts at a multiple of this */
    public const ALIGN = 64;
    /** §5.1: region sizes are multiples of this */
    public const PAGE = 4096;
    /** §5.1: ATTACH option, checksums on this connection */
    public const OPT_CRC = 0x0001;
    /** §5.1: the one byte that carries the region descriptor (SCM_RIGHTS) */
    public const FD_CARRIER = 0xFD;
    /** §6.3: tensor bytes live in the shared region */
    public const LOCATION_REGION = 0;
    /** §6.3: tensor bytes follow the descriptors in the frame body */
    public const LOCATION_INLINE = 1;
    /** §6.1: INFER option bit, a u32 pinned version follows the model name */
    public const INFER_OPT_VERSION = 0x01;
    /** §6.1: INFER option bit, a u8-length routing key follows (after the version, if any) */
    public const INFER_OPT_ROUTING_KEY = 0x02;
}
