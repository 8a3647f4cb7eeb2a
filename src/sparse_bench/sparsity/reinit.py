"""Weight re-initialisation by the (sparse) fan-in of each output unit, as GSE's code does it.

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

``fan_in_reinit`` draws from the run's seeded generator, on CPU in float64 (so a run is the same
on every device), then copies to each parameter's device and dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError


def owning_modules(model: nn.Module, names: Sequence[str], params: Sequence[torch.Tensor]) -> list[nn.Module | None]:
    """The module whose ``.weight`` each parameter is (None for a parameter that is no module's weight)."""
    owner: dict[int, nn.Module] = {}
    for _, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, nn.Parameter):
            owner.setdefault(id(w), mod)
    return [owner.get(id(p)) for p in params]


@torch.no_grad()
def fan_in_reinit(model: nn.Module, names: Sequence[str], params: Sequence[torch.Tensor],
                  masks: Sequence[torch.Tensor], generator: torch.Generator) -> None:
    """Active weights ~ U(-1, 1) * sqrt(3 / active fan-in of their output unit); inactive ones 0;
    the owning module's bias (if any) drawn with the same per-unit bound."""
    modules = owning_modules(model, names, params)
    for name, mod, p, m in zip(names, modules, params, masks):
        if p.dim() < 2:
            raise ConfigError(f"method.reinit=fan_in: {name} has shape {tuple(p.shape)}, not (out, in, ...); "
                              f"set method.reinit=none or drop it from prunable.include")
        n_out, fan_in = p.shape[0], math.prod(p.shape[1:])
        m2 = m.reshape(n_out, fan_in).to("cpu")
        bound = (3.0 / m2.sum(1, keepdim=True).clamp_min(1).to(torch.float64)).sqrt()
        u = torch.rand((n_out, fan_in), generator=generator, dtype=torch.float64) * 2 - 1
        p.copy_((u * bound * m2).view_as(p).to(device=p.device, dtype=p.dtype))
        bias = getattr(mod, "bias", None) if mod is not None else None
        if isinstance(bias, torch.Tensor):
            ub = torch.rand((n_out,), generator=generator, dtype=torch.float64) * 2 - 1
            bias.copy_((ub * bound.squeeze(1)).to(device=bias.device, dtype=bias.dtype))
