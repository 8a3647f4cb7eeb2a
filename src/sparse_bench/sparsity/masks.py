"""MaskSet: bool masks over a model's prunable weights.

Which tensors are prunable is a rule, logged with every run: by default the ``weight`` of every
``nn.Linear`` and ``nn.Conv*`` module; biases and normalisation weights stay dense. ``exclude``
keeps named parameters dense (fnmatch patterns, e.g. ``"fc3.weight"``), ``include`` adds
parameters that are not a module's weight (e.g. ``"*.in_proj_weight"``).

The masks are re-applied after every optimizer step with one grouped ``_foreach_mul_``: no Python
allocation per tensor and no host sync on the per-step path.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..errors import ConfigError

DEFAULT_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d")


def _module_types(names: Iterable[str]) -> tuple[type, ...]:
    types = []
    for n in names:
        t = getattr(nn, str(n), None)
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise ConfigError(f"prunable.types: '{n}' is not a torch.nn module class; use e.g. [Linear, Conv2d]")
        types.append(t)
    return tuple(types)


def prunable_parameters(
    model: nn.Module,
    types: Sequence[str] = DEFAULT_TYPES,
    exclude: Sequence[str] = (),
    include: Sequence[str] = (),
) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs the rule selects, in the model's parameter order."""
    mod_types = _module_types(types)
    chosen: set[str] = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, mod_types) and isinstance(getattr(mod, "weight", None), nn.Parameter):
            chosen.add(f"{mod_name}.weight" if mod_name else "weight")
    out = []
    for name, p in model.named_parameters():
        selected = name in chosen or any(fnmatch.fnmatchcase(name, pat) for pat in include)
        if selected and not any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
            out.append((name, p))
    return out


class MaskSet:
    """Bool masks for a list of parameters, with grouped apply and exact density accounting."""

    def __init__(self, named_params: Sequence[tuple[str, nn.Parameter]]):
        if not named_params:
            raise ConfigError("prunable: the rule selects no parameters in this model; check prunable.types/exclude")
        empty = [n for n, p in named_params if p.numel() == 0]
        if empty:
            raise ConfigError(f"prunable: {empty[0]} has no weights (a layer of width 0?); give every layer a "
                              f"positive width, e.g. model.hidden=[300,100]")
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.masks = [torch.ones_like(p, dtype=torch.bool) for p in self.params]

    @classmethod
    def from_model(cls, model: nn.Module, rule) -> "MaskSet":
        rule = rule or {}
        return cls(
            prunable_parameters(
                model,
                types=list(rule.get("types", DEFAULT_TYPES)),
                exclude=list(rule.get("exclude", [])),
                include=list(rule.get("include", [])),
            )
        )

    def __len__(self) -> int:
        return len(self.masks)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in self.params]

    @property
    def numels(self) -> list[int]:
        return [p.numel() for p in self.params]

    def set_masks(self, masks: Sequence[torch.Tensor]) -> None:
        """Replace all masks (moved to each parameter's device) and apply them."""
        if len(masks) != len(self.params):
            raise ValueError("one mask per prunable parameter expected")
        for i, (m, p) in enumerate(zip(masks, self.params)):
            if m.shape != p.shape:
                raise ValueError(f"mask for {self.names[i]} has shape {tuple(m.shape)}, expected {tuple(p.shape)}")
            self.masks[i] = m.to(device=p.device, dtype=torch.bool)
        self.apply_()

    @torch.no_grad()
    def apply_(self) -> None:
        """Zero every inactive weight: one grouped multiply, no host sync."""
        torch._foreach_mul_([p.data for p in self.params], self.masks)

    @torch.no_grad()
    def nnz(self) -> list[int]:
        """Active weights per layer (one host sync)."""
        counts = torch.stack([m.sum() for m in self.masks]) if self.masks else torch.zeros(0)
        return [int(c) for c in counts.cpu().tolist()]

    def density(self) -> float:
        return sum(self.nnz()) / sum(self.numels)

    def layer_densities(self) -> dict[str, float]:
        return {n: k / m for n, k, m in zip(self.names, self.nnz(), self.numels)}

    @torch.no_grad()
    def weight_density(self) -> float:
        """Fraction of prunable weights that are non-zero in the tensors themselves."""
        nz = sum(int((p != 0).sum()) for p in self.params)
        return nz / sum(self.numels)

    def describe(self) -> dict:
        return {
            "prunable": {n: list(s) for n, s in zip(self.names, self.shapes)},
            "total": sum(self.numels),
        }

    def state_dict(self) -> dict:
        return {"names": list(self.names), "masks": [m.detach().cpu().clone() for m in self.masks]}

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != self.names:
            raise ValueError("checkpoint masks are for different parameters")
        for i, m in enumerate(state["masks"]):
            self.masks[i] = m.to(device=self.params[i].device, dtype=torch.bool)
