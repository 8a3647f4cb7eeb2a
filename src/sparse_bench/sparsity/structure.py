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
* ``block``: the weight matrix (out x in; a Conv2d's out x in-channels at each kernel position,
  as for nm) is tiled by blocks of ``shape`` = (rows, columns), each wholly active or wholly
  inactive; a layer keeps round(count / block size) blocks (at least 1), the count of
  ``method.init``, so ``density`` holds to within one block per layer.

One mechanism serves every method that keeps a structure: a layer's mask is seen as a matrix of
groups (``groups``: rows of m for nm, one row per output unit for fan_in) with a capacity each
(n; k). Initial masks draw, per group, the capacity at random (``random_masks``). A drop-and-grow
update drops whatever the method drops (fewer active never breaks "at most n" or, once regrown,
"k per unit") and regrows in each group exactly what that group lost, choosing the largest of the
method's own growth scores within the group (``regrow``), so the layer's count and every group's
count come back to what they were. A pruning method (GMP, AC/DC, SNIP, GraSP, SynFlow, lottery)
chooses each layer's count by its own ranking, then keeps in each group its largest scores up to
the group's capacity (``keep``). ``violations`` checks a mask, for the tests and after every
drop-and-grow update (GSE's regrowth draws on its sampled candidates only). Top-KAST chooses both
of its sets through ``keep``; DeepR regrows its dead through ``regrow`` (nm and fan_in; it refuses
blocks).

Blocks are the groups of ``block``, but a group is all or nothing, so there the same four steps
select whole blocks by the mean of the method's scores over each block: initial masks draw
blocks at random; a drop-and-grow update drops, per layer, as many blocks as the method's own drop
took weights (rounded to blocks), those of smallest mean drop score (``whole_drops``), and regrows
as many blocks as it dropped, by the largest mean growth score; a pruning method keeps the
blocks of largest mean score, as many as its per-layer count in blocks.
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
    block: tuple[int, int] = (0, 0)  # (rows, columns) of a block (kind block)

    @classmethod
    def from_config(cls, node) -> Structure:
        if node is None:
            return cls()
        kind = node.get("name", "unstructured")
        if kind == "nm":
            return cls("nm", int(node.n), int(node.m))
        if kind == "block":
            return cls("block", block=(int(node.shape[0]), int(node.shape[1])))
        return cls(kind)

    @property
    def active(self) -> bool:
        """Whether masks must keep a structure (anything but unstructured)."""
        return self.kind != "unstructured"

    def __str__(self) -> str:
        if self.kind == "block":
            return f"block {self.block[0]}x{self.block[1]}"
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind

    @property
    def block_size(self) -> int:
        return self.block[0] * self.block[1]

    # --- checks at the start of a run ------------------------------------------------------------
    def check(self, names: Sequence[str], shapes: Sequence[tuple], density: float) -> None:
        """One line (ConfigError) for a density the structure contradicts or a layer it cannot fit."""
        if self.kind == "block":
            self._check_blocks(names, shapes)
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

    def _check_blocks(self, names: Sequence[str], shapes: Sequence[tuple]) -> None:
        rows, cols = self.block
        for name, shape in zip(names, shapes):
            if len(shape) not in (2, 4):
                raise ConfigError(f"structure=block: {name} has shape {list(shape)}; blocks tile Linear and Conv2d "
                                  f"weights only: leave it dense with prunable.exclude=[{name.rsplit('.', 1)[0]}]")
            if shape[0] % rows or shape[1] % cols:
                what = "input channels" if len(shape) == 4 else "inputs"
                raise ConfigError(f"structure=block: {name} has {shape[0]} outputs and {shape[1]} {what}, not "
                                  f"multiples of structure.shape={[rows, cols]}; leave it dense with "
                                  f"prunable.exclude=[{name.rsplit('.', 1)[0]}] or pick a shape dividing them")

    # --- the group view ---------------------------------------------------------------------------
    def groups(self, t: torch.Tensor) -> torch.Tensor:
        """`t` (a layer's mask or scores) as a (groups, group size) matrix, in group order (a copy
        for convolutions under nm and block and for non-contiguous tensors)."""
        if self.kind == "fan_in":
            return t.reshape(t.shape[0], -1)
        if self.kind == "block":
            rows, cols = self.block
            m = t.permute(2, 3, 0, 1) if t.dim() == 4 else t  # (kh, kw, out, in) for a conv
            o, c = m.shape[-2:]
            return m.reshape(*m.shape[:-2], o // rows, rows, c // cols, cols).transpose(-3, -2).reshape(-1, rows * cols)
        if t.dim() == 4:  # conv: groups along input channels at each kernel position
            return t.permute(0, 2, 3, 1).reshape(-1, self.m)
        return t.reshape(-1, self.m)

    def ungroup(self, g: torch.Tensor, shape: tuple) -> torch.Tensor:
        """The inverse of `groups`: a (groups, group size) matrix back in the layer's shape."""
        if self.kind == "nm" and len(shape) == 4:
            o, c, kh, kw = shape
            return g.reshape(o, kh, kw, c).permute(0, 3, 1, 2).contiguous()
        if self.kind == "block":
            rows, cols = self.block
            o, c = shape[:2]
            lead = tuple(shape[2:])  # a conv's kernel positions lead in the group order
            m = g.reshape(*lead, o // rows, c // cols, rows, cols).transpose(-3, -2).reshape(*lead, o, c)
            return (m.permute(2, 3, 0, 1) if lead else m).contiguous()
        return g.reshape(shape)

    def blocks_for(self, count: int, total: int) -> int:
        """Whole blocks for a layer asked to keep about `count` weights, of `total` blocks."""
        return min(total, max(1, round(count / self.block_size)))

    def _pick_blocks(self, score: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
        """(blocks,) bool: the `k` largest `score`, never a -inf one (ties to the lower index)."""
        k = min(int(k), int((score > float("-inf")).sum()))
        picked = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
        if k > 0:
            order = torch.sort(score, descending=True, stable=True).indices[:k]
            picked[order] = True
        return picked

    def _expand(self, picked: torch.Tensor, shape: tuple) -> torch.Tensor:
        return self.ungroup(picked.unsqueeze(1).expand(-1, self.block_size), shape)

    def _block_means(self, scores: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
        """Each block's mean score; -inf for the blocks `excluded` ((blocks,) bool)."""
        return self.groups(scores.float()).mean(1).masked_fill(excluded, float("-inf"))

    def whole_drops(self, dropped: torch.Tensor, old: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """A drop-and-grow method's drop made whole blocks (``block``; other kinds keep `dropped`,
        which their regrowth repairs): as many blocks as it dropped weights, rounded (never the
        layer's last block), the active blocks of smallest mean drop `scores`."""
        if self.kind != "block":
            return dropped
        active = self.groups(old).all(1)
        k = min(round(int(dropped.sum()) / self.block_size), max(int(active.sum()) - 1, 0))
        picked = self._pick_blocks(self._block_means(-scores, ~active), k)  # the smallest means
        return self._expand(picked, tuple(old.shape))

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
            if self.kind == "block":
                total = probe.shape[0]
                picked = torch.zeros(total, dtype=torch.bool)
                picked[torch.randperm(total, generator=generator)[:self.blocks_for(count, total)]] = True
                masks.append(self._expand(picked, shape))
                continue
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
            if self.kind == "block":  # the blocks of largest mean score among the active ones
                full = self.groups(a).all(1)
                k = self.blocks_for(int(c.sum()), full.numel())
                out.append(self._expand(self._pick_blocks(self._block_means(s, ~full), k), tuple(a.shape)))
                continue
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
        then, where a group has too few of those, among the positions it has just dropped. Under
        ``block``: as many whole blocks as the drop took, the unblocked inactive ones of largest
        mean score, then just-dropped ones."""
        if self.kind == "block":
            was, now = self.groups(old).all(1), self.groups(after).any(1)
            free = ~(self.groups(blocked).any(1) | now)
            deficit = int(was.sum()) - int(self.groups(after).all(1).sum())
            picked = self._pick_blocks(self._block_means(scores, ~free), deficit)
            short = deficit - int(picked.sum())
            if short > 0:
                picked |= self._pick_blocks(self._block_means(scores, ~(was & ~now) | picked), short)
            return self._expand(picked, tuple(old.shape))
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
        if self.kind == "block":  # blocks neither wholly active nor wholly inactive
            return int(((per > 0) & (per < self.block_size)).sum())
        live = per[per > 0] if empty_ok else per
        if live.numel() == 0:
            return 0
        return int((live != live.max()).sum())
