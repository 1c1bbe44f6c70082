"""ResNet-18 (He et al. 2015) for ImageNet, with torchvision's state_dict keys.

torchvision has no CPU build beside torch 2.13.0 and no weights can be downloaded here, so the
architecture is written out below with the same module names as ``torchvision.models.resnet18``
(``conv1``, ``bn1``, ``layer1.0.conv1`` ... ``fc``): torchvision's ImageNet checkpoint
(``resnet18-f37072fd.pth``) loads unchanged with ``weights = "resnet18.pth"`` in the config or
``--model resnet18=tensorbridge.models.resnet:create@resnet18.pth``.

Without that file the weights are random (a fixed seed, so runs repeat): the predictions are
meaningless, and every response says so in its ``notice`` output.

Served as ``--model resnet18=tensorbridge.models.resnet:create``: input ``image`` BYTES [-1]
(JPEG, PNG, WebP or GIF files), preprocessed as torchvision's ImageNet recipe (resize the
shorter side to 256, centre crop 224, scale to 0..1, ImageNet mean/std, CHW FP32); outputs the
top 10 classes with ImageNet names (``imagenet_classes.txt``, torchvision's order).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SEED = 18
#: ImageNet statistics torchvision's weights were trained with.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
LABELS = "tensorbridge.models:imagenet_classes.txt"
RANDOM_NOTICE = ("random weights: untrained ResNet-18, predictions are meaningless; "
                 "set weights = \"resnet18.pth\" for ImageNet weights")

#: Server-side pipeline (docs/models.md lists every key).
PIPELINE: dict[str, dict[str, Any]] = {
    "preprocess": {"input": "image", "mode": "RGB", "exif_transpose": True,
                   "resize_shorter": 256, "center_crop": 224, "scale": 1 / 255,
                   "mean": list(MEAN), "std": list(STD), "layout": "CHW", "dtype": "FP32"},
    "postprocess": {"softmax": True, "top_k": 10, "labels": LABELS},
}


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut (torchvision's ``BasicBlock``, same names)."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                         nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """ImageNet ResNet-18: FP32 [N, 3, 224, 224] (normalised) -> logits FP32 [N, 1000]."""

    tensorbridge_signature = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}],
    }

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(64, 64), BasicBlock(64, 64))
        self.layer2 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128))
        self.layer3 = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256))
        self.layer4 = nn.Sequential(BasicBlock(256, 512, 2), BasicBlock(512, 512))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        #: True until real weights are loaded (``load_state_dict``).
        self.random_weights = True
        self._init_random()

    def _init_random(self) -> None:
        """torchvision's initialisation, from a fixed seed, leaving the global RNG alone."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Linear):
                    m.reset_parameters()

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False
                        ) -> Any:
        """Load weights (e.g. torchvision's checkpoint); the model is then no longer random."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.random_weights = False
        return result

    @property
    def tensorbridge_notice(self) -> str | None:
        """Said in every response while the weights are random."""
        return RANDOM_NOTICE if self.random_weights else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the input's name
        x = self.maxpool(self.relu(self.bn1(self.conv1(input))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def create(weights: str | None = None, top_k: int = 10) -> ResNet18:
    """ResNet-18 behind ImageNet image preprocessing and top-k postprocessing.

    ``weights``: a torchvision ``resnet18`` state_dict (``.pth`` or ``.safetensors``); the
    config's ``weights`` key does the same. Without it the weights are random.
    """
    model = ResNet18()
    if weights:
        from .._backends import load_state_dict

        model.load_state_dict(load_state_dict(weights))
    pipeline = {k: dict(v) for k, v in PIPELINE.items()}
    pipeline["postprocess"]["top_k"] = top_k
    object.__setattr__(model, "tensorbridge_pipeline", pipeline)  # a plain attribute, typed
    return model


def create_tensor(weights: str | None = None) -> ResNet18:
    """Plain ResNet-18: input ``input`` FP32 [-1, 3, 224, 224], output ``logits`` [-1, 1000]."""
    model = ResNet18()
    if weights:
        from .._backends import load_state_dict

        model.load_state_dict(load_state_dict(weights))
    return model
