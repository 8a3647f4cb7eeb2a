"""Weight re-initialisation (``method.reinit``): by the (sparse) fan-in of each output unit, as
GSE's code does it (``fan_in``), or torch's default layer initialisation (``default``).

GSE (mikeheddes/guided-stochastic-exploration, ``layers.py``, ``init_masked_params``) replaces
every Linear and Conv2d of the model by a masked layer and draws, for output unit i with
fan_in_i active inputs (a conv's input unit is an (input channel, kernel row, kernel column)
triple), ``w_ij ~ U(-1, 1) * sqrt(3 / max(fan_in_i, 1))`` on the active connections (0 elsewhere)
and the unit's bias from the same bound, so every unit's pre-activation has unit variance. Its
baselines use it two ways, and so do the methods here (``reinit: fan_in``):

* after drawing the sparse mask (static, SET, RigL, GSE: ``sparsify(model, sparsity, ...)``): the
  fan-in is the *sparse* one;
* on the dense model before pruning starts (GMP, lottery, SNIP, GraSP, SynFlow:
  ``sparsify(model, 0.0, "uniform")``): every mask is all ones and the fan-in is the dense one.

``default`` is what a Linear or ConvNd built afresh holds (``reset_parameters``: Kaiming-uniform
with a = sqrt(5), i.e. ``w ~ U(-1, 1) / sqrt(fan_in)`` with the dense fan-in, and the bias from the
same bound). GSE's Top-KAST (``topkast_training.py``) trains that: its ``sparsify`` replaces every
Linear and Conv2d by a new masked layer without copying the old weight, so a model's own
initialisation (ResNet-56's Kaiming-normal) is discarded there.

Both draw from the run's seeded generator, on CPU in float64 (so a run is the same on every
device), then copy to each parameter's device and dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError

#: the choices of ``method.reinit``: the model's own initialisation, GSE's fan-in draw, torch's default
REINITS = ("none", "fan_in", "default")


def owning_modules(model: nn.Module, names: Sequence[str], params: Sequence[torch.Tensor]) -> list[nn.Module | None]:
    """The module whose ``.weight`` each parameter (or its ``.data``) is (None for a parameter that is
    no module's weight)."""
    owner: dict[tuple, nn.Module] = {}
    for _, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, nn.Parameter):
            owner.setdefault(_where(w), mod)
    return [owner.get(_where(p)) for p in params]


def _where(t: torch.Tensor) -> tuple:
    """A tensor's memory and shape: the same for a parameter and its ``.data``."""
    return t.data_ptr(), tuple(t.shape), t.device


def unit_bounds(kind: str, active_fan_in: torch.Tensor, dense_fan_in: int) -> torch.Tensor:
    """The bound of each output unit's uniform draw (float64, one per unit): ``sqrt(3 / active
    fan-in)`` for ``fan_in``, ``1 / sqrt(dense fan-in)`` for ``default``."""
    if kind == "fan_in":
        return (3.0 / active_fan_in.clamp_min(1).to(torch.float64)).sqrt()
    return torch.full(active_fan_in.shape, 1.0 / math.sqrt(max(dense_fan_in, 1)), dtype=torch.float64)


@torch.no_grad()
def reinit_(kind: str, model: nn.Module, names: Sequence[str], params: Sequence[torch.Tensor],
            masks: Sequence[torch.Tensor], generator: torch.Generator) -> None:
    """Re-draw every prunable weight by `kind` (:data:`REINITS`; ``none`` does nothing): active
    weights ``U(-1, 1) * bound`` of their output unit (:func:`unit_bounds`), inactive ones 0, the
    owning module's bias (if any) from the same per-unit bound."""
    if kind == "none":
        return
    modules = owning_modules(model, names, params)
    for name, mod, p, m in zip(names, modules, params, masks):
        if p.dim() < 2:
            raise ConfigError(f"method.reinit={kind}: {name} has shape {tuple(p.shape)}, not (out, in, ...); "
                              f"set method.reinit=none or drop it from prunable.include")
        if kind == "default" and not isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
            raise ConfigError(f"method.reinit=default: {name} is not the weight of a Linear or Conv layer, whose "
                              f"default initialisation this draws; set method.reinit=none or fan_in")
        n_out, fan_in = p.shape[0], math.prod(p.shape[1:])
        m2 = m.reshape(n_out, fan_in).to("cpu")
        bound = unit_bounds(kind, m2.sum(1, keepdim=True), fan_in)
        u = torch.rand((n_out, fan_in), generator=generator, dtype=torch.float64) * 2 - 1
        p.copy_((u * bound * m2).view_as(p).to(device=p.device, dtype=p.dtype))
        bias = getattr(mod, "bias", None) if mod is not None else None
        if isinstance(bias, torch.Tensor):
            ub = torch.rand((n_out,), generator=generator, dtype=torch.float64) * 2 - 1
            bias.copy_((ub * bound.squeeze(1)).to(device=bias.device, dtype=bias.dtype))
