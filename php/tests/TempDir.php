<?php

declare(strict_types=1);

namespace TensorBridge\Tests;

/**
 * Private temporary directories for breaker state, so that tests leave nothing in /tmp.
 */
final class TempDir
{
    public static function create(string $prefix): string
    {
        $dir = sys_get_temp_dir() . '/' . $prefix . '-' . getmypid() . '-' . bin2hex(random_bytes(4));
        mkdir($dir, 0700);
        return $dir;
    }

    public static function remove(string $dir): void
    {
        if ($dir === '' || !is_dir($dir)) {
            return;
        }
        foreach (scandir($dir) ?: [] as $f) {
            if ($f !== '.' && $f !== '..') {
                unlink($dir . '/' . $f);
            }
        }
        rmdir($dir);
    }
}
