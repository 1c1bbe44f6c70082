"""The bundled demo model: a small MLP that reads 8x8 handwritten digits.

Trained on scikit-learn's ``load_digits`` (1,797 images shipped inside scikit-learn), with
pixel values 0..16 as input. The weights ship in ``digits.safetensors`` beside this file;
``python -m tensorbridge.models.digits`` retrains them and rewrites the sample file the
PHP demo reads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

WEIGHTS = Path(__file__).with_name("digits.safetensors")


class DigitsMLP(nn.Module):
    """64 pixel values (0..16) -> 10 logits."""

    tensorbridge_signature = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    }

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / 16.0)


def create() -> DigitsMLP:
    """The trained model with its bundled weights."""
    from safetensors.torch import load_file

    model = DigitsMLP()
    model.load_state_dict(load_file(str(WEIGHTS)))
    return model


def train(samples_out: Path | None = None) -> float:
    """Train on 80% of scikit-learn's digits, save the weights; return test accuracy."""
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x))
    train_idx, test_idx = perm[:1437], perm[1437:]
    model = DigitsMLP()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(300):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[train_idx]), y[train_idx])
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (model(x[test_idx]).argmax(1) == y[test_idx]).float().mean().item()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(WEIGHTS))
    if samples_out is not None:
        picks = test_idx[:10].tolist()
        samples = [{"label": int(y[i]), "pixels": [int(v) for v in data.data[i]]}
                   for i in picks]
        samples_out.write_text(json.dumps(samples) + "\n")
    return acc


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    print(f"test accuracy: {train(out):.3f}; weights written to {WEIGHTS}")
