"""Wide ResNets (WRN-d-k) of the sparse momentum paper.

As in the official sparse_learning code (TimDettmers/sparse_learning, models.py, WideResNet):

- stem: 3x3 conv to 16 channels (no bias);
- three groups of n = (d - 4) / 6 pre-activation basic blocks with 16k, 32k, 64k channels, the
  first block of groups 2 and 3 with stride 2. A block computes BN-ReLU-conv3x3-BN-ReLU-
  dropout(0.3)-conv3x3 and adds the shortcut. Where the block changes the channel count the
  shortcut is a 1x1 conv (no bias, masked like every conv) applied to the *activated* input
  BN-ReLU(x), and the first conv reads that same activated input; otherwise the shortcut is x.
- head: BN-ReLU, global average pool, Linear(64k, C).
- init: conv weights N(0, sqrt(2 / (k*k*out_channels))), BN weight 1 / bias 0, linear bias 0
  (linear weight keeps PyTorch's default).

Masked weights at C = 10: WRN-16-8 10.95M, WRN-16-10 17.11M, WRN-22-8 17.15M, WRN-28-2 1.46M
(the paper's numbers; the tests pin them).

Differences: the reference returns log-softmax, we return logits (same loss under
cross-entropy); it pools with a fixed 8x8 window, we pool globally (identical on 32x32 inputs);
a block also gets the 1x1 shortcut when only its stride changes (never happens for valid d, k).

Options: ``model.depth`` (d, 6n + 4) and ``model.widen_factor`` (k, an integer), ``model.dropout``.
The named variants (``wrn16_8``...) fix d and k: change them with ``model=wrn`` instead, so the
run folder name says which network ran.

``wrn28_10_acdc`` (and ``wrn_acdc`` for other sizes) is the WRN of the AC/DC code
(IST-DASLab/ACDC, ``models/wide_resnet_cifar.py``, after meliketoy/wide-resnet.pytorch), which
its CIFAR-100 WRN-28-10 numbers come from. It differs from the one above in four places:

- every conv has a bias (the stem too);
- a block computes BN-ReLU-conv3x3 (stride 1)-dropout(0.3)-BN-ReLU-conv3x3 (*stride here*), so the
  dropout sits right after the first conv and the second conv downsamples;
- the 1x1 shortcut conv (with bias) reads the *raw* block input x, not BN-ReLU(x);
- the final BN uses momentum 0.9 (PyTorch convention: the running statistics take 90% of each
  batch's), and every layer keeps PyTorch's default initialisation (the file's ``conv_init`` is
  never called).
Masked weights: the same tensors as ``wrn28_10`` (36.46M at C = 10); biases stay dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .. import schema as S
from ..errors import ConfigError
from .zoo import require_image


class WideBasicBlock(nn.Module):
    """Pre-activation basic block with dropout between its two convolutions."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut = None
        if in_planes != out_planes or stride != 1:
            self.shortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(act))


def _widths(depth: int, widen_factor: int, depth_example: str, widen_example: int) -> list[int]:
    """The stem's and the three groups' channel counts of WRN-depth-widen_factor (sizes checked)."""
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ConfigError(f"model.depth={depth} is not a WRN depth (6n + 4, n >= 1); "
                          f"use e.g. model.depth={depth_example}")
    if widen_factor < 1:
        raise ConfigError(f"model.widen_factor={widen_factor} must be a positive integer; "
                          f"use e.g. model.widen_factor={widen_example}")
    return [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]


def _groups(block, depth: int, widths: list[int], dropout: float) -> list[nn.Sequential]:
    """The three groups of (depth - 4) / 6 blocks each; the first block of groups 2 and 3 has stride 2."""
    n = (depth - 4) // 6
    groups, in_planes = [], widths[0]
    for g, stride in enumerate((1, 2, 2)):
        blocks = []
        for i in range(n):
            blocks.append(block(in_planes, widths[g + 1], stride if i == 0 else 1, dropout))
            in_planes = widths[g + 1]
        groups.append(nn.Sequential(*blocks))
    return groups


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for small images."""

    def __init__(self, depth: int = 16, widen_factor: int = 8, in_channels: int = 3, num_classes: int = 10,
                 dropout: float = 0.3):
        super().__init__()
        widths = _widths(depth, widen_factor, "16, 22 or 28", 8)
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1, self.block2, self.block3 = _groups(WideBasicBlock, depth, widths, dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class ACDCBasicBlock(nn.Module):
    """The AC/DC code's wide block: BN-ReLU-conv(stride 1)-dropout-BN-ReLU-conv(stride), raw-input shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, padding=1, bias=True)
        self.dropout = nn.Dropout(p=dropout)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=True)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + (x if self.shortcut is None else self.shortcut(x))


class WideResNetACDC(nn.Module):
    """WRN-depth-widen_factor as the AC/DC code builds it (see the module docstring)."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, in_channels: int = 3, num_classes: int = 100,
                 dropout: float = 0.3):
        super().__init__()
        widths = _widths(depth, widen_factor, "28", 10)
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=True)
        self.layer1, self.layer2, self.layer3 = _groups(ACDCBasicBlock, depth, widths, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3], momentum=0.9)
        self.linear = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _generic(cfg, input_shape, num_classes):
    require_image("wrn", input_shape)
    return WideResNet(cfg.depth, cfg.widen_factor, input_shape[0], num_classes, cfg.dropout)


def _fixed_size(cfg, name: str, depth: int, k: int, generic: str) -> None:
    """A model named by its size (wrn16_8, wrn28_10_acdc) refuses other depth / widen_factor values."""
    for key, fixed in (("depth", depth), ("widen_factor", k)):
        if cfg[key] != fixed:
            raise ConfigError(f"model.{key}={cfg[key]} contradicts model={name} (WRN-{depth}-{k}); "
                              f"use model={generic} model.depth=D model.widen_factor=K for other sizes")


def _named(depth: int, k: int):
    name = f"wrn{depth}_{k}"

    def build(cfg, input_shape, num_classes):
        require_image(name, input_shape)
        _fixed_size(cfg, name, depth, k, "wrn")
        return WideResNet(depth, k, input_shape[0], num_classes, cfg.dropout)

    return name, build


def _acdc(cfg, input_shape, num_classes):
    require_image("wrn_acdc", input_shape)
    return WideResNetACDC(cfg.depth, cfg.widen_factor, input_shape[0], num_classes, cfg.dropout)


def _acdc_28_10(cfg, input_shape, num_classes):
    _fixed_size(cfg, "wrn28_10_acdc", 28, 10, "wrn_acdc")
    return _acdc(cfg, input_shape, num_classes)


#: the WRNs named by their size (wrn16_8 is WRN-16-8)
NAMED = ((16, 8), (16, 10), (22, 8), (28, 2), (28, 10))
MODELS = {"wrn": _generic, "wrn_acdc": _acdc, "wrn28_10_acdc": _acdc_28_10}
MODELS.update(_named(d, k) for d, k in NAMED)


@dataclass
class WRNSchema(S.ModelSchema):
    depth: int = S.count(ge=10, hint="6n + 4, e.g. 16, 22, 28")
    widen_factor: int = S.count(ge=1)
    dropout: float = S.num(ge=0.0, lt=1.0)


for _name in MODELS:
    S.register("model", _name, MODELS[_name], WRNSchema)
