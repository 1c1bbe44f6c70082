<?php

declare(strict_types=1);

/*
 * The search example's classes (TensorBridge\Examples\Search\*, in src/) and the PHP client.
 */
require_once __DIR__ . '/../../php/autoload.php';

spl_autoload_register(static function (string $class): void {
    $prefix = 'TensorBridge\\Examples\\Search\\';
    if (strncmp($class, $prefix, strlen($prefix)) === 0) {
        $file = __DIR__ . '/src/' . substr($class, strlen($prefix)) . '.php';
        if (is_file($file)) {
            require $file;
        }
    }
});
