<?php

declare(strict_types=1);

namespace TensorBridge\Tests;

use PHPUnit\Framework\TestCase;
use TensorBridge\BatchResult;
use TensorBridge\Exception\InvalidInputException;

/**
 * One batch item's outcome.
 */
final class BatchResultTest extends TestCase
{
    public function testSuccess(): void
    {
        $r = BatchResult::success(['label' => 'cat']);
        self::assertTrue($r->ok());
        self::assertNull($r->error());
        self::assertSame(['label' => 'cat'], $r->value());
    }

    public function testFailureRethrowsTheItemsOwnException(): void
    {
        $e = new InvalidInputException('item 2: not an image', 'INVALID_INPUT');
        $r = BatchResult::failure($e);
        self::assertFalse($r->ok());
        self::assertSame($e, $r->error());
        try {
            $r->value();
            self::fail('expected the item exception');
        } catch (InvalidInputException $thrown) {
            self::assertSame($e, $thrown);
        }
    }

    public function testIsAFinalValueObject(): void
    {
        $class = new \ReflectionClass(BatchResult::class);
        self::assertTrue($class->isFinal());
        foreach ($class->getProperties() as $p) {
            self::assertTrue($p->isReadOnly(), $p->getName());
        }
    }
}
