<?php

// The models the web demo offers (server model name => label in the menu); scripts/web.sh loads them.

declare(strict_types=1);

return [
    'digits-image' => 'Digits 0-9 (trained, 8x8)',
    'resnet18' => 'ResNet-18 (random weights)',
];
