"""AlexNet-s and AlexNet-b, the CIFAR-10 AlexNets of the sparse momentum paper.

Layout as in the official sparse_learning code (TimDettmers/sparse_learning, models.py):
five convolutions, every one of stride 2 and each followed by BatchNorm and ReLU

    96@11x11 p2, 256@5x5 p2, 384@3x3 p1, 384@3x3 p1, 256@3x3 p1

(a 32x32 input shrinks 32 -> 13 -> 7 -> 4 -> 2 -> 1, so the flattened feature is 256), then the
classifier Linear(256, 1024f) - BN1d - ReLU - Linear(1024f, 1024f) - BN1d - ReLU - Linear(., C)
with f = 1 (s) or 2 (b). Convolutions and linears keep their biases and PyTorch's default
initialisation. Masked weights on CIFAR-10: 5,066,784 (s) and 8,484,896 (b), the paper's
5.07M / 8.48M.

Differences: the reference returns log-softmax; we return logits (the trainer's cross-entropy
gives the same loss). The flattened width is computed from the input size, so other image sizes
build too; at 32x32 it is the reference's 256.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import schema as S
from ..errors import ConfigError
from .zoo import require_image

# (out_channels, kernel, stride, padding) of the five convolutions
CONVS = ((96, 11, 2, 2), (256, 5, 2, 2), (384, 3, 2, 1), (384, 3, 2, 1), (256, 3, 2, 1))


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class AlexNet(nn.Module):
    """Sparse momentum's CIFAR AlexNet; ``factor`` = 1 (AlexNet-s) or 2 (AlexNet-b)."""

    def __init__(self, factor: int = 1, in_channels: int = 3, num_classes: int = 10, image_size=(32, 32)):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        h, w = image_size
        for out, k, s, p in CONVS:
            layers += [nn.Conv2d(channels, out, kernel_size=k, stride=s, padding=p), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True)]
            channels = out
            h, w = _conv_out(h, k, s, p), _conv_out(w, k, s, p)
        if h < 1 or w < 1:
            raise ConfigError(f"AlexNet needs images of at least 8x8 pixels, got {image_size[0]}x{image_size[1]}; "
                              "pick another model")
        self.features = nn.Sequential(*layers)
        hidden = 1024 * factor
        self.classifier = nn.Sequential(
            nn.Linear(channels * h * w, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _builder(factor: int, name: str):
    def build(cfg, input_shape, num_classes):
        require_image(name, input_shape)
        return AlexNet(factor, input_shape[0], num_classes, tuple(input_shape[1:]))

    return build


MODELS = {
    "alexnet_s": _builder(1, "alexnet_s"),
    "alexnet_b": _builder(2, "alexnet_b"),
}

for _name in MODELS:
    S.register("model", _name, MODELS[_name], S.ModelSchema)
