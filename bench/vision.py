"""The seed's image scenario for the benchmark: ResNet-18 and JPEG preprocessing.

ResNet-18 is built here (torchvision has no CPU build beside torch 2.13.0) with fixed random
weights: no weights can be downloaded, and the timing does not depend on their values. The
labels are therefore class numbers, not ImageNet names.

Models for ``tensorbridge serve`` (with ``bench/`` on PYTHONPATH):
* ``vision:resnet18``       input ``input`` FP32 [-1, 3, 224, 224] -> top-5 ``index``/``prob``
* ``vision:jpeg_resnet18``  input ``image`` BYTES [1] (a JPEG file) -> the same
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import nn

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
TOP5 = [{"name": "index", "datatype": "INT64", "shape": [-1, 5]},
        {"name": "prob", "datatype": "FP32", "shape": [-1, 5]}]


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                   nn.BatchNorm2d(cout)) if stride != 1 or cin != cout
                     else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


class ResNet18(nn.Module):
    """The ResNet-18 architecture (He et al. 2015), 1000 classes, ending in top-5 softmax."""

    tensorbridge_signature = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
        "outputs": TOP5}

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(18)
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, 1000)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.layers(self.stem(x))
        logits = self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
        prob, index = torch.softmax(logits, 1).topk(5)
        return index, prob


def preprocess(jpeg: bytes) -> torch.Tensor:
    """JPEG bytes -> [1, 3, 224, 224] FP32: resize to 224x224, ImageNet mean/std, CHW."""
    image = Image.open(io.BytesIO(jpeg))
    image.draft("RGB", (224, 224))  # let the JPEG decoder downscale (DCT scaling) first
    pixels = np.asarray(image.convert("RGB").resize((224, 224), Image.BILINEAR),
                        dtype=np.float32)
    chw = ((pixels / 255.0 - MEAN) / STD).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(chw))[None]


class JpegResNet18(nn.Module):
    """ResNet-18 behind server-side JPEG preprocessing (Pillow)."""

    tensorbridge_signature = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}],
                              "outputs": TOP5}

    def __init__(self) -> None:
        super().__init__()
        self.net = ResNet18()

    def forward(self, image: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(preprocess(image[0]))


def resnet18() -> ResNet18:
    """Factory for ``--model resnet=vision:resnet18``."""
    return ResNet18().eval()


def jpeg_resnet18() -> JpegResNet18:
    """Factory for ``--model jpeg=vision:jpeg_resnet18``."""
    return JpegResNet18().eval()


def make_jpeg(path: str, width: int = 1024, height: int = 768) -> bytes:
    """A synthetic photo-like 1024x768 JPEG (gradients, shapes, noise), written to ``path``."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / width * 255, y / height * 255, (x + y) % 256], axis=2)
    rgb += rng.normal(0, 18, rgb.shape)
    rgb[200:500, 300:700] = [30, 160, 90]
    data = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    data.save(buf, "JPEG", quality=90)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return buf.getvalue()
