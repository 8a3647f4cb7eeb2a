"""CIFAR ResNets (He et al. 2016, section 4.2) as GSE trains them (ResNet-56).

The GSE code (mikeheddes/guided-stochastic-exploration, models/resnet_cifar.py, itself from
akamaster/pytorch_resnet_cifar10) builds:

- stem: 3x3 conv to 16 channels (no bias), BN, ReLU;
- three stages of n = (depth - 2) / 6 basic blocks with 16, 32, 64 channels, the first block of
  stages 2 and 3 with stride 2; a block is conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, ReLU;
- option-A shortcuts: where shape changes, take every second pixel and zero-pad the new channels
  (no parameters, so nothing to mask);
- head: global average pool, Linear(64, C);
- init: Kaiming-normal (fan-in) for every conv and linear weight.

ResNet-56 has 0.85M parameters (853,018 at C = 10). ``model.width`` multiplies the three widths
as ``int(16 * width)`` etc. (GSE's width experiments).

Differences: the zero padding puts ``(out - in) // 2`` new channels in front and the rest behind,
which equals the reference's ``planes // 4`` on both sides whenever the widths double (always at
width 1) and still fits when ``int()`` rounding makes them not exactly double; the shortcut
subsamples by the block's stride rather than always by 2 (the same in this network).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .. import schema as S
from ..errors import ConfigError
from .zoo import require_image, scaled


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus an option-A (parameter-free) shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad_front = (planes - in_planes) // 2
        self.pad_back = planes - in_planes - self.pad_front
        self.project = stride != 1 or in_planes != planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if not self.project:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images with option-A shortcuts."""

    def __init__(self, depth: int = 56, in_channels: int = 3, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ConfigError(f"model.depth={depth} is not a CIFAR ResNet depth (6n + 2); "
                              "use e.g. model.depth=20, 56 or 110")
        n = (depth - 2) // 6
        widths = [scaled(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        in_planes = widths[0]
        for planes, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)



def _generic(cfg, input_shape, num_classes):
    require_image("resnet_cifar", input_shape)
    return CifarResNet(cfg.depth, input_shape[0], num_classes, cfg.width)


def _resnet56(cfg, input_shape, num_classes):
    """ResNet-56 (its schema has no depth: model=resnet_cifar model.depth=D for other depths)."""
    require_image("resnet56", input_shape)
    return CifarResNet(56, input_shape[0], num_classes, cfg.width)


MODELS = {
    "resnet_cifar": _generic,
    "resnet56": _resnet56,
}


@dataclass
class ResNetCifarSchema(S.WidthSchema):
    depth: int = S.count(ge=8, hint="6n + 2: 20, 32, 44, 56, 110")


S.register("model", "resnet_cifar", _generic, ResNetCifarSchema)
S.register("model", "resnet56", _resnet56, S.WidthSchema)
