"""Model registry: `build_model(cfg.model, input_shape, num_classes)`.

Every module in this package may define ``MODELS = {name: builder}`` where
``builder(cfg, input_shape, num_classes) -> nn.Module``; they are merged here, so adding a model
is one module entry plus one YAML in conf/model/ (and its option schema, registered in the same
module: ``schema.register("model", name, builder, schema)``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..plugins import package_modules, target_of
from ..schema import check_option

_BUILDERS: dict = {}
for _mod in package_modules(__name__, __path__):
    _BUILDERS.update(getattr(_mod, "MODELS", {}))

MODEL_NAMES = tuple(sorted(_BUILDERS))


def build_model(cfg, input_shape, num_classes: int) -> nn.Module:
    """Build the model named by `cfg.name` and check that it fits the data.

    `cfg` (the ``model`` group) is checked and typed by its schema first (``sparse_bench.schema``;
    a key not given takes the model's YAML value), so the builders read typed values. The fit
    check runs one forward pass on a batch of two zero inputs, so a model whose layers do not
    match the dataset's shape (or whose output is not `num_classes` wide) fails here, before any
    training, with one line naming both.
    """
    builder = target_of(cfg, "model")  # a user's model, named by model._target_
    cfg = check_option("model", cfg)
    name = cfg.name
    model = (builder or _BUILDERS[name])(cfg, tuple(input_shape), int(num_classes))
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
