"""Structured sparsity: the shape a layer's mask must keep (``structure=`` config group).

* ``unstructured``: any positions (the default; no code below runs for it).
* ``nm``: in every group of ``m`` consecutive weights along the input dimension at most ``n``
  are active (2:4 for sparse tensor cores). A Linear's groups run along its inputs; a Conv2d's
  along its input channels at one kernel position (weight[o, c:c+m, i, j]), the grouping of
  NVIDIA's ASP and of cuSPARSELt's convolutions, so a conv needs in_channels divisible by m.
  Every layer then has density n/m, so ``density`` must be n/m.
* ``fan_in``: every output unit (a Linear's row, a conv's filter) has the same number of active
  inputs, k = floor(layer count / units), at least 1: the layer counts of ``method.init``
  (uniform / ER / ERK) rounded down to whole fan-ins, as SRigL's code does
  (calgaryml/condensed-sparsity, src/rigl_torch/utils/rigl_utils.py, get_fan_in_after_ablation).

One mechanism serves every method that keeps a structure: a layer's mask is seen as a matrix of
groups (``groups``: rows of m for nm, one row per output unit for fan_in) with a capacity each
(n; k). Initial masks draw, per group, the capacity at random (``random_masks``). A drop-and-grow
update drops whatever the method drops (fewer active never breaks "at most n" or, once regrown,
"k per unit") and regrows in each group exactly what that group lost, choosing the largest of the
method's own growth scores within the group (``regrow``), so the layer's count and every group's
count come back to what they were. A pruning method (GMP, AC/DC, SNIP, GraSP, SynFlow, lottery)
chooses each layer's count by its own ranking, then keeps in each group its largest scores up to
the group's capacity (``keep``). ``violations`` checks a mask, for the tests and after every
drop-and-grow update. GSE, DeepR and Top-KAST keep no structure (they refuse one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class Structure:
    kind: str = "unstructured"
    n: int = 0
    m: int = 0

    @classmethod
    def from_config(cls, node) -> Structure:
        if node is None:
            return cls()
        kind = node.get("name", "unstructured")
        if kind == "nm":
            return cls("nm", int(node.n), int(node.m))
        return cls(kind)

    @property
    def active(self) -> bool:
        """Whether masks must keep a structure (anything but unstructured)."""
        return self.kind != "unstructured"

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind

    # --- checks at the start of a run ------------------------------------------------------------
    def check(self, names: Sequence[str], shapes: Sequence[tuple], density: float) -> None:
        """One line (ConfigError) for a density the structure contradicts or a layer it cannot fit."""
        if self.kind != "nm":
            return
        if self.n >= self.m:
            raise ConfigError(f"structure.n={self.n} must be below structure.m={self.m} (n of every m weights stay "
                              f"active), e.g. structure.n=2 structure.m=4")
        if abs(density - self.n / self.m) > 1e-9:
            raise ConfigError(f"density={density:g} contradicts structure=nm with n={self.n}, m={self.m}, which keeps "
                              f"every layer at density n/m = {self.n / self.m:g}; pass density={self.n / self.m:g}")
        for name, shape in zip(names, shapes):
            span = shape[1] if len(shape) > 1 else shape[0]
            if span % self.m:
                what = "input channels" if len(shape) == 4 else "inputs"
                raise ConfigError(f"structure=nm: {name} has {span} {what}, not a multiple of m={self.m}; leave it "
                                  f"dense with prunable.exclude=[{name.rsplit('.', 1)[0]}] or pick an m dividing it")

    # --- the group view ---------------------------------------------------------------------------
    def groups(self, t: torch.Tensor) -> torch.Tensor:
        """`t` (a layer's mask or scores) as a (groups, group size) matrix, in group order (a copy
        for convolutions under nm and for non-contiguous tensors)."""
        if self.kind == "fan_in":
            return t.reshape(t.shape[0], -1)
        if t.dim() == 4:  # conv: groups along input channels at each kernel position
            return t.permute(0, 2, 3, 1).reshape(-1, self.m)
        return t.reshape(-1, self.m)

    def ungroup(self, g: torch.Tensor, shape: tuple) -> torch.Tensor:
        """The inverse of `groups`: a (groups, group size) matrix back in the layer's shape."""
        if self.kind == "nm" and len(shape) == 4:
            o, c, kh, kw = shape
            return g.reshape(o, kh, kw, c).permute(0, 3, 1, 2).contiguous()
        return g.reshape(shape)

    def capacity(self, shape: tuple, count: int) -> int:
        """Active weights per group for a layer of `shape` asked to keep about `count`."""
        if self.kind == "nm":
            return self.n
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        return min(max(1, count // shape[0]), fan_in)  # floor, as SRigL's get_fan_in_after_ablation

    # --- drawing and regrowing within the structure -----------------------------------------------
    def random_masks(self, shapes: Sequence[tuple], counts: Sequence[int], generator: torch.Generator
                     ) -> list[torch.Tensor]:
        """Per layer, `capacity` positions of every group at random (CPU bool masks)."""
        masks = []
        for shape, count in zip(shapes, counts):
            shape = tuple(shape)
            probe = self.groups(torch.empty(shape, dtype=torch.bool))
            keep = torch.rand(probe.shape, generator=generator).argsort(dim=1)[:, :self.capacity(shape, count)]
            g = torch.zeros(probe.shape, dtype=torch.bool).scatter_(1, keep, True)
            masks.append(self.ungroup(g, shape))
        return masks

    def fill(self, scores: torch.Tensor, blocked: torch.Tensor, deficit: torch.Tensor) -> torch.Tensor:
        """Bool mask (layer shape) of, in each group, its `deficit` largest-`scores` positions that
        are not `blocked` (fewer where the group has fewer unblocked)."""
        s = self.groups(scores.float()).masked_fill(self.groups(blocked), float("-inf"))
        order = s.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
        picked = (rank < deficit.unsqueeze(1)) & torch.isfinite(s)
        return self.ungroup(picked, tuple(scores.shape))

    def keep(self, scores: Sequence[torch.Tensor], active: Sequence[torch.Tensor], chosen: Sequence[torch.Tensor],
             fraction: float) -> list[torch.Tensor]:
        """A pruning method's selection made structured (the one mechanism of SNIP, GraSP, SynFlow,
        lottery, GMP and AC/DC under a structure): per layer, in each group the largest `scores`
        among the `active` weights, as many as the group's capacity. fan_in: the layer's count as
        the method chose it (`chosen`, by its own global or per-layer ranking), per unit; nm: n per
        group once the method reaches its final density (`fraction` = n/m), round(m x fraction)
        (at least n) at the higher densities a gradual method passes through."""
        out = []
        for s, a, c in zip(scores, active, chosen):
            if self.kind == "nm":
                cap = torch.full((a.numel() // self.m,), min(self.m, max(self.n, round(self.m * fraction))))
            else:
                cap = torch.full((a.shape[0],), self.capacity(tuple(a.shape), int(c.sum())))
            out.append(self.fill(s, ~a, cap.to(a.device)))
        return out

    def regrow(self, scores: torch.Tensor, old: torch.Tensor, after: torch.Tensor, blocked: torch.Tensor
               ) -> torch.Tensor:
        """The positions a drop-and-grow update grows so that every group of `after` (the mask
        after the drop) has as many active as it had in `old`: the largest `scores` not `blocked`,
        then, where a group has too few of those, among the positions it has just dropped."""
        deficit = self.groups(old).sum(1) - self.groups(after).sum(1)
        grown = self.fill(scores, blocked, deficit)
        short = deficit - self.groups(grown).sum(1)
        if bool((short > 0).any()):
            grown |= self.fill(scores, after | grown, short)
        return grown

    def violations(self, mask: torch.Tensor, empty_ok: bool = False) -> int:
        """Groups of `mask` that break the structure (0 when it holds): nm, over n active; fan_in,
        a unit whose count differs from the others' (`empty_ok`: units with none, SRigL's ablated
        neurons, do not count)."""
        if not self.active:
            return 0
        per = self.groups(mask).sum(1)
        if self.kind == "nm":
            return int((per > self.n).sum())
        live = per[per > 0] if empty_ok else per
        if live.numel() == 0:
            return 0
        return int((live != live.max()).sum())
