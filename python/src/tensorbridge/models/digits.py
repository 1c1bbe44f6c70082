"""The bundled demo model: a small CNN that reads 8x8 handwritten digits.

Trained on scikit-learn's ``load_digits`` (1,797 images shipped inside scikit-learn) with a
fixed seed; the weights ship in ``digits.safetensors`` beside this file.
``python -m tensorbridge.models.digits [SAMPLES.json]`` retrains them (a few seconds on CPU),
prints the held-out accuracy and optionally rewrites the sample file the PHP demo reads.

Two factories, one network:

* ``create`` (``digits``): input ``input`` FP32 [-1, 64], pixel values 0..16 row by row,
  output ``logits`` FP32 [-1, 10].
* ``create_image`` (``digits-image``): input ``image`` BYTES [-1], each item an image file of
  one digit, dark ink on a light background; the server decodes it, converts it to gray,
  inverts it, shrinks it to 8x8 with a box filter and scales it to 0..16, then returns the
  top-k classes (``scores``, ``indices``, ``labels``) as described in docs/models.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHTS = Path(__file__).with_name("digits.safetensors")
#: Images in scikit-learn's digits set, and how many of them (after a seeded shuffle) train.
N_IMAGES, N_TRAIN = 1797, 1437
SEED = 0

#: Server-side pipeline of ``create_image`` (docs/models.md lists every key).
IMAGE_PIPELINE: dict[str, dict[str, Any]] = {
    "preprocess": {"input": "image", "mode": "L", "invert": True, "resize": [8, 8],
                   "resample": "box", "scale": 16 / 255, "layout": "flat", "dtype": "FP32"},
    "postprocess": {"softmax": True, "top_k": 3, "labels": [str(d) for d in range(10)]},
}


class DigitsCNN(nn.Module):
    """64 pixel values (0..16, row-major 8x8) -> 10 logits; two 3x3 conv layers and an MLP."""

    tensorbridge_signature = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    }

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2))                                   # -> 32 x 4 x 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(32 * 16, 128), nn.ReLU(),
            nn.Linear(128, 10))

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the input's name
        return self.classifier(self.features(input.reshape(-1, 1, 8, 8) / 16.0))


def create() -> DigitsCNN:
    """The trained model with its bundled weights (tensor input ``input`` FP32 [-1, 64])."""
    from safetensors.torch import load_file

    model = DigitsCNN()
    model.load_state_dict(load_file(str(WEIGHTS)))
    return model


def create_image(top_k: int = 3, invert: bool = True) -> DigitsCNN:
    """The same trained model behind image preprocessing: input ``image`` BYTES [-1].

    ``invert=False`` for light ink on a dark background.
    """
    model = create()
    pipeline = json.loads(json.dumps(IMAGE_PIPELINE))  # a private copy to adjust
    pipeline["preprocess"]["invert"] = invert
    pipeline["postprocess"]["top_k"] = top_k
    model.tensorbridge_pipeline = pipeline
    return model


def split() -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the training and held-out images (the same seeded shuffle every time)."""
    perm = torch.randperm(N_IMAGES, generator=torch.Generator().manual_seed(SEED))
    return perm[:N_TRAIN], perm[N_TRAIN:]


def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    """All of scikit-learn's digits: pixels FP32 [1797, 64] (0..16) and labels INT64."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (torch.tensor(data.data, dtype=torch.float32),
            torch.tensor(data.target, dtype=torch.int64))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of rows of ``x`` that ``model`` labels as ``y``."""
    model.eval()
    with torch.inference_mode():
        return (model(x).argmax(1) == y).float().mean().item()


def train(samples_out: Path | None = None, epochs: int = 30, weights_out: Path = WEIGHTS
          ) -> float:
    """Train on the training split, save the weights to ``weights_out``; return held-out
    accuracy. ``samples_out``: also write ten held-out samples for the PHP demo there."""
    from safetensors.torch import save_file

    torch.manual_seed(SEED)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float sums, so the same weights, on every machine
    try:
        x, y = load_data()
        train_idx, test_idx = split()
        model = DigitsCNN()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        gen = torch.Generator().manual_seed(SEED)
        for _ in range(epochs):
            model.train()
            order = train_idx[torch.randperm(len(train_idx), generator=gen)]
            for batch in order.split(64):
                # One-pixel shifts make the model robust to off-centre drawings.
                xb = x[batch].reshape(-1, 8, 8)
                dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
                xb = torch.roll(xb, (dy, dx), (1, 2)).reshape(-1, 64)
                opt.zero_grad()
                nn.functional.cross_entropy(model(xb), y[batch]).backward()
                opt.step()
        acc = accuracy(model, x[test_idx], y[test_idx])
    finally:
        torch.set_num_threads(threads)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights_out))
    if samples_out is not None:
        from sklearn.datasets import load_digits

        pixels = load_digits().data
        samples = [{"label": int(y[i]), "pixels": [int(v) for v in pixels[i]]}
                   for i in test_idx[:10].tolist()]
        samples_out.write_text(json.dumps(samples) + "\n")
    return acc


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    print(f"held-out accuracy: {train(out):.4f} ({N_IMAGES - N_TRAIN} images); "
          f"weights written to {WEIGHTS}")
