"""Models we do not write ourselves: torchvision's ResNet-50 and a pass-through to any timm model.

Also holds the helpers the other model modules share: the image-input check and the width
scaling (the options themselves are typed and range-checked by the schema, ``sparse_bench.schema``).

Nothing here ever downloads weights: torchvision is called with ``weights=None`` and timm with
``pretrained=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

from omegaconf import MISSING, OmegaConf
from torch import nn

from .. import schema as S
from ..errors import ConfigError


def require_image(name: str, input_shape) -> None:
    """Image models need (C, H, W) inputs; anything else is a one-line ConfigError."""
    if len(input_shape) != 3:
        raise ConfigError(
            f"model={name} takes images (C, H, W), the dataset gives shape {tuple(input_shape)}; pick another model"
        )


def scaled(channels: int, width: float, key: str = "model.width") -> int:
    """``int(channels * width)`` as the GSE code scales widths; at least 1 channel."""
    out = int(channels * width)
    if out < 1:
        raise ConfigError(f"{key}={width} leaves a layer with no channels ({channels} x {width}); use a larger {key}")
    return out


def _resnet50(cfg, input_shape, num_classes: int) -> nn.Module:
    """torchvision's ResNet-50 (no pretrained weights); a non-RGB input gets a matching stem conv."""
    import torchvision

    model = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    if input_shape[0] != 3:
        model.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def _timm(cfg, input_shape, num_classes: int) -> nn.Module:
    """Any timm model by name (``model.arch``), randomly initialised; extra ``model.kwargs`` pass through."""
    import timm

    arch = cfg.arch
    if not timm.is_model(arch):
        raise ConfigError(
            f"model.arch={arch} is not a timm model; pick a name from timm.list_models(), e.g. model.arch=resnet18"
        )
    kwargs = cfg.kwargs
    kwargs = dict(OmegaConf.to_container(kwargs, resolve=True) if OmegaConf.is_config(kwargs) else kwargs)
    for reserved in ("pretrained", "num_classes", "in_chans", "pretrained_cfg_overlay"):
        if reserved in kwargs:
            raise ConfigError(f"model.kwargs.{reserved} is set by sparse_bench itself; remove it from model.kwargs")
    try:
        return timm.create_model(
            arch, pretrained=False, num_classes=num_classes, in_chans=int(input_shape[0]), **kwargs
        )
    except TypeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"model.kwargs do not fit timm model {arch} ({first}); fix or drop model.kwargs") from None


MODELS = {
    "resnet50": _resnet50,
    "timm": _timm,
}


@dataclass
class TimmSchema(S.ModelSchema):
    arch: str = MISSING
    kwargs: Dict[str, Any] = MISSING


S.register("model", "resnet50", _resnet50, S.ModelSchema)
S.register("model", "timm", _timm, TimmSchema)
