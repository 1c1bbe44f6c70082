<?php

// Benchmark launcher: N copies of client.php in worker processes forked from this one, as
// PHP-FPM's workers are forked from its master. The TensorBridge library is compiled here
// first, so the workers share its compiled code (under FPM, opcache's shared memory does the
// same); N PHP processes each compiling their own copy spend most of their CPU on cache misses
// once there are more of them than cores, which no FPM pool does.
// One JSON job on stdin (client.php's, plus "processes": N); one JSON result per worker on
// stdout, one per line. Exits non-zero if any worker failed (its error is on stderr).

declare(strict_types=1);

require __DIR__ . '/../../php/autoload.php';

$job = json_decode(stream_get_contents(STDIN), true, 512, JSON_THROW_ON_ERROR);
$library = new RecursiveIteratorIterator(new RecursiveDirectoryIterator(__DIR__ . '/../../php/src'));
foreach ($library as $file) {
    if (str_ends_with((string) $file, '.php')) {
        require_once (string) $file;
    }
}

$dir = sys_get_temp_dir() . '/tb-bench-workers-' . getmypid();
@mkdir($dir, 0700);
$workers = [];
for ($i = 0; $i < (int) ($job['processes'] ?? 1); $i++) {
    $pid = pcntl_fork();
    if ($pid === -1) {
        fwrite(STDERR, "fork failed\n");
        exit(1);
    }
    if ($pid === 0) {
        $GLOBALS['TB_JOB'] = $job;
        ob_start();
        require __DIR__ . '/client.php';
        file_put_contents("$dir/" . getmypid(), ob_get_clean());
        exit(0);
    }
    $workers[] = $pid;
}
$failed = 0;
foreach ($workers as $pid) {
    pcntl_waitpid($pid, $status);
    $failed += (pcntl_wifexited($status) && pcntl_wexitstatus($status) === 0) ? 0 : 1;
}
foreach ($workers as $pid) {
    $out = @file_get_contents("$dir/$pid");
    @unlink("$dir/$pid");
    if ($out !== false && trim($out) !== '') {
        echo trim($out), "\n";
    }
}
@rmdir($dir);
exit($failed === 0 ? 0 : 1);
