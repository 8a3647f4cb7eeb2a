"""The VGG16s of the papers.

Sparse momentum (after the SNIP paper's CIFAR variants; official code TimDettmers/sparse_learning,
models.py): 13 convolutions with padding 1, each followed by BatchNorm and ReLU, max-pool after
each of the five blocks (64,64 | 128,128 | 256x3 | 512x3 | 512x3):

- ``vgg16_d``: all 3x3; classifier Linear(512, 512) - ReLU - BN1d - Linear(512, 512) - ReLU -
  BN1d - Linear(512, C) (BatchNorm where VGG had dropout): 15,239,872 masked weights at C = 10,
  the paper's 15.24M.
- ``vgg16_c``: as D but the third convolution of blocks 3-5 is 1x1 (still padding 1, so it grows
  the map by 2 pixels): a 32x32 input ends at 512x2x2, a flattened feature of 2048; 11,307,712
  masked weights, as the reference code builds it.
- ``vgg16_like``: D's features, classifier Linear(512, 512) - ReLU - BN1d - Linear(512, C):
  14,977,728 masked weights.

GSE (mikeheddes/guided-stochastic-exploration, models/vgg_cifar.py), ``vgg16_small``: VGG16-BN
with every convolution's width divided by 4 (16,16 | 32,32 | 64x3 | 128x3 | 128x3), conv-BN-ReLU,
then Linear(128, 512) - ReLU - Dropout(0.5) - Linear(512, 512) - ReLU - Dropout(0.5) -
Linear(512, C) (1,252,528 masked weights at C = 10). ``model.width`` multiplies every width,
conv and linear, as ``int(w * width)`` (the GSE width experiments).

All layers keep their biases and PyTorch's default initialisation, as both references do.
Differences: the sparse momentum reference returns log-softmax, we return logits (same loss under
cross-entropy); the flattened width is computed from the input size, so at 32x32 it is the
reference's and other sizes still build.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import schema as S
from ..errors import ConfigError
from .zoo import require_image, scaled

# numbers are 3x3 convolutions, (k, n) a k x k convolution with n channels, "M" a 2x2 max-pool
PLANS = {
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "C": [64, 64, "M", 128, 128, "M", 256, 256, (1, 256), "M", 512, 512, (1, 512), "M", 512, 512, (1, 512), "M"],
    "small": [16, 16, "M", 32, 32, "M", 64, 64, 64, "M", 128, 128, 128, "M", 128, 128, 128, "M"],
}


def make_features(plan, in_channels: int, image_size, width: float = 1.0):
    """conv-BN-ReLU stack of a plan; returns (features, channels, height, width) of its output."""
    layers: list[nn.Module] = []
    c = in_channels
    h, w = image_size
    for item in plan:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            h, w = h // 2, w // 2
            continue
        k, n = item if isinstance(item, tuple) else (3, item)
        n = scaled(n, width)
        layers += [nn.Conv2d(c, n, kernel_size=k, padding=1), nn.BatchNorm2d(n), nn.ReLU(inplace=True)]
        c = n
        h, w = h + 2 - k + 1, w + 2 - k + 1
        if h < 1 or w < 1:
            break
    if h < 1 or w < 1:
        raise ConfigError(f"VGG16 needs images of at least 32x32 pixels, got {image_size[0]}x{image_size[1]}; "
                          "pick another model")
    return nn.Sequential(*layers), c, h, w


class VGG16(nn.Module):
    """Sparse momentum's VGG16 variant ``config`` in {"C", "D", "like"}."""

    def __init__(self, config: str = "D", in_channels: int = 3, num_classes: int = 10, image_size=(32, 32)):
        super().__init__()
        plan = PLANS["C" if config == "C" else "D"]
        self.features, c, h, w = make_features(plan, in_channels, image_size)
        flat = c * h * w
        if config in ("C", "D"):
            self.classifier = nn.Sequential(
                nn.Linear(flat, 512), nn.ReLU(inplace=True), nn.BatchNorm1d(512),
                nn.Linear(512, 512), nn.ReLU(inplace=True), nn.BatchNorm1d(512),
                nn.Linear(512, num_classes),
            )
        else:
            self.classifier = nn.Sequential(
                nn.Linear(flat, 512), nn.ReLU(inplace=True), nn.BatchNorm1d(512),
                nn.Linear(512, num_classes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class VGG16Small(nn.Module):
    """GSE's VGG-16-small: VGG16-BN at a quarter width, classifier 128-512-512-C with dropout."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size=(32, 32), width: float = 1.0,
                 dropout: float = 0.5):
        super().__init__()
        self.features, c, h, w = make_features(PLANS["small"], in_channels, image_size, width)
        hidden = scaled(512, width)
        self.classifier = nn.Sequential(
            nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))



def _sm_builder(config: str, name: str):
    def build(cfg, input_shape, num_classes):
        require_image(name, input_shape)
        return VGG16(config, input_shape[0], num_classes, tuple(input_shape[1:]))

    return build


def _small(cfg, input_shape, num_classes):
    require_image("vgg16_small", input_shape)
    return VGG16Small(input_shape[0], num_classes, tuple(input_shape[1:]), cfg.width, cfg.dropout)


MODELS = {
    "vgg16_c": _sm_builder("C", "vgg16_c"),
    "vgg16_d": _sm_builder("D", "vgg16_d"),
    "vgg16_like": _sm_builder("like", "vgg16_like"),
    "vgg16_small": _small,
}


@dataclass
class VGGSmallSchema(S.WidthSchema):
    dropout: float = S.num(ge=0.0, lt=1.0)


for _name in MODELS:
    S.register("model", _name, MODELS[_name], VGGSmallSchema if _name == "vgg16_small" else S.ModelSchema)
