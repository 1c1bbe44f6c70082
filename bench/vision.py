"""The seed's image scenario for the benchmark: ResNet-18 and JPEG preprocessing.

ResNet-18 is the package's (``tensorbridge.models.resnet``: torchvision's layout, fixed random
weights; the timing does not depend on their values). These benchmark models return class
numbers; ``tensorbridge.models.resnet:create`` is the served model with ImageNet names.

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

from tensorbridge.models import resnet

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
TOP5 = [{"name": "index", "datatype": "INT64", "shape": [-1, 5]},
        {"name": "prob", "datatype": "FP32", "shape": [-1, 5]}]


class ResNet18(nn.Module):
    """The package's ResNet-18 (torchvision layout, fixed random weights), ending in top-5."""

    tensorbridge_signature = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
        "outputs": TOP5}

    def __init__(self) -> None:
        super().__init__()
        self.net = resnet.ResNet18()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prob, index = torch.softmax(self.net(x), 1).topk(5)
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


def make_jpeg(path: str | None, width: int = 1024, height: int = 768) -> bytes:
    """A synthetic photo-like JPEG (gradients, shapes, noise), written to ``path`` if given."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / width * 255, y / height * 255, (x + y) % 256], axis=2)
    rgb += rng.normal(0, 18, rgb.shape)
    rgb[200:500, 300:700] = [30, 160, 90]
    data = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    data.save(buf, "JPEG", quality=90)
    if path is not None:
        with open(path, "wb") as f:
            f.write(buf.getvalue())
    return buf.getvalue()


def preprocess_costs(repeats: int = 200) -> dict[str, float]:
    """Median milliseconds per image of the package's server-side preprocessing, on one
    thread (the numbers in docs/models.md)."""
    import statistics
    import time

    from tensorbridge._pipeline import ImagePreprocess
    from tensorbridge.models import digits, resnet

    x, _ = digits.load_data()
    gray = np.round(255 - x[digits.split()[1][0]].numpy().reshape(8, 8) * 255 / 16)
    canvas = Image.fromarray(gray.astype(np.uint8), "L").resize((256, 256), Image.NEAREST)
    buf = io.BytesIO()
    canvas.convert("RGBA").save(buf, "PNG")  # as a browser's canvas.toBlob() sends it
    cases = {
        "resnet18, 640x480 JPEG": (resnet.PIPELINE["preprocess"], make_jpeg(None, 640, 480)),
        "resnet18, 4032x3024 JPEG": (resnet.PIPELINE["preprocess"],
                                     make_jpeg(None, 4032, 3024)),
        "resnet18, 4032x3024 JPEG, draft off": ({**resnet.PIPELINE["preprocess"],
                                                 "draft": False}, make_jpeg(None, 4032, 3024)),
        "digits-image, 256x256 canvas PNG": (digits.IMAGE_PIPELINE["preprocess"],
                                             buf.getvalue()),
    }
    torch.set_num_threads(1)
    out = {}
    for name, (config, data) in cases.items():
        pre = ImagePreprocess.parse(config)
        n = repeats if len(data) < 1_000_000 else max(5, repeats // 20)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            pre([data])
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times) * 1000
    return out


if __name__ == "__main__":
    for case, ms in preprocess_costs().items():
        print(f"{case}: {ms:.2f} ms")
