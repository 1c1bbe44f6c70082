<?php

declare(strict_types=1);

/*
 * Autoloader for projects that do not use Composer: require this one file.
 */
spl_autoload_register(static function (string $class): void {
    $prefix = 'TensorBridge\\';
    if (strncmp($class, $prefix, strlen($prefix)) !== 0) {
        return;
    }
    $file = __DIR__ . '/src/' . str_replace('\\', '/', substr($class, strlen($prefix))) . '.php';
    if (is_file($file)) {
        require $file;
    }
});
