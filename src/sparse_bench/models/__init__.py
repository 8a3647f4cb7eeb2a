"""Model registry: `build_model(cfg.model, input_shape, num_classes)`."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .lenet import MLP, LeNet5Caffe, LeNet300100

_BUILDERS = {
    "lenet300_100": lambda cfg, shape, nc: LeNet300100(
        in_features=int(cfg.get("in_features", 784)), num_classes=nc
    ),
    "lenet5_caffe": lambda cfg, shape, nc: LeNet5Caffe(in_channels=shape[0], num_classes=nc),
    "mlp": lambda cfg, shape, nc: MLP(
        in_features=int(torch.Size(shape).numel()),
        hidden=list(cfg.get("hidden", [100])),
        num_classes=nc,
        dropout=float(cfg.get("dropout", 0.0)),
    ),
}

MODEL_NAMES = tuple(sorted(_BUILDERS))


def build_model(cfg, input_shape, num_classes: int) -> nn.Module:
    """Build the model named by `cfg.name` and check that it fits the data.

    The fit check runs one forward pass on a batch of two zero inputs, so a model whose
    layers do not match the dataset's shape (or whose output is not `num_classes` wide)
    fails here, before any training, with one line naming both.
    """
    name = cfg.name
    if name not in _BUILDERS:
        raise ConfigError(f"model={name} is unknown; choose one of: {', '.join(MODEL_NAMES)}")
    model = _BUILDERS[name](cfg, tuple(input_shape), int(num_classes))
    shape_txt = "x".join(str(s) for s in input_shape)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(
            f"model={name} does not fit the dataset's input of shape {shape_txt} ({first}); "
            f"pick a model made for this input size"
        ) from None
    model.train(was_training)
    if out.shape != (2, num_classes):
        raise ConfigError(
            f"model={name} gives outputs of shape {tuple(out.shape[1:])} but the dataset has "
            f"{num_classes} classes; set model.num_classes or pick another model"
        )
    return model
