"""The MNIST-scale models of the sparse momentum paper, and a small MLP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
from torch import nn
from torch.nn import functional as F

from .. import schema as S


class LeNet300100(nn.Module):
    """LeNet-300-100: 784-300-100-10 fully connected, ReLU (266,200 weights)."""

    def __init__(self, in_features: int = 784, num_classes: int = 10):
        super().__init__()
        self.in_features = in_features
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise RuntimeError(
                f"LeNet-300-100 takes {self.in_features} input features, got {x.shape[1]}"
            )
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5Caffe(nn.Module):
    """LeNet-5-Caffe: conv20@5 - pool - conv50@5 - pool - fc500 - fc10 (430,500 weights)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc3 = nn.Linear(50 * 4 * 4, 500)
        self.fc4 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc3(x.flatten(1)))
        return self.fc4(x)


class MLP(nn.Module):
    """A small fully connected network (used for the 8x8 digits)."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


MODELS = {
    "lenet300_100": lambda cfg, shape, nc: LeNet300100(in_features=cfg.in_features, num_classes=nc),
    "lenet5_caffe": lambda cfg, shape, nc: LeNet5Caffe(in_channels=shape[0], num_classes=nc),
    "mlp": lambda cfg, shape, nc: MLP(
        in_features=int(torch.Size(shape).numel()),
        hidden=list(cfg.hidden),
        num_classes=nc,
        dropout=cfg.dropout,
    ),
}


@dataclass
class LeNet300Schema(S.ModelSchema):
    in_features: int = S.count(ge=1)


@dataclass
class MLPSchema(S.ModelSchema):
    hidden: List[int] = S.widths(hint="positive widths, e.g. model.hidden=[300,100]")
    dropout: float = S.num(ge=0.0, lt=1.0, hint="e.g. model.dropout=0.1")


for _name, _schema in (("lenet300_100", LeNet300Schema), ("lenet5_caffe", S.ModelSchema), ("mlp", MLPSchema)):
    S.register("model", _name, MODELS[_name], _schema)
