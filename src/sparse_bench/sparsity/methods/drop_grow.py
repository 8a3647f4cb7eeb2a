"""The drop-and-grow skeleton sparse momentum, SET, RigL, DSR and GSE are written through.

One mask update, split as jaxpruner's sparse-training updaters split it (``DropAndGrow.update``):

1. ``rate(step)``: the fraction to replace now (each method's decay, ``schedules.DECAYS``);
2. ``drop(u)``: which active weights go. By default the ``drop_budget`` (a count per layer, or
   one count over all layers for ``scope: global``) of smallest ``drop_scores``; a method whose
   rule is not "smallest score" (DSR's threshold, SET's and sparse momentum's per-sign splits)
   overrides it;
3. ``grow(u)``: which inactive positions come in. ``grow_budget`` (by default as many as each
   layer dropped; sparse momentum's and DSR's redistributions override it) of largest
   ``grow_scores`` among the positions not blocked (``exclude_pruned``: the ones active before
   the update, so nothing just dropped comes back); random growth is growth by uniform scores
   (``random_scores``);
   Under ``structure=nm|fan_in|block`` every method grows through ``grow_within_structure``: in
   each group (N:M group, output unit) exactly what it lost, by the method's own growth scores
   (``sparsity.structure``), so the structure and each layer's count hold after every update;
   under ``block`` its drop is first made whole blocks (``Structure.whole_drops``), and as many
   whole blocks regrow;
4. ``commit``: one path into ``MaskSet.replace_`` for every method. ``regrown`` says whether a
   weight dropped and grown in the same update restarts at 0 (``"restart"``: SET, DSR; GSE never
   regrows one) or keeps its value (``"keep"``: RigL, sparse momentum); ``reset`` which
   positions' optimizer state is zeroed (``"grown"``, ``"dropped"``).

Selections are exact (``smallest`` / ``largest``): per layer, or over all layers at once with each
layer's ``MaskSet.floor`` largest active entries protected (``ops.guard_layers``). Where the
methods differ their choices are tables (name -> function) that their schemas offer as choices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

import torch

from ..ops import guard_layers, largest_inactive, mask_change_logs, smallest_active
from .base import Method, ScheduledUpdates
from .dense import RandomInitMixin

#: a selection budget: a count per layer (scope: layer) or one count over all layers (scope: global)
Budget = Union[list[int], int]


def _split(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [f.view_as(t) for f, t in zip(torch.split(flat, [t.numel() for t in like]), like)]


def _cat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


@torch.no_grad()
def smallest(scores: Sequence[torch.Tensor], active: Sequence[torch.Tensor] | None, budget: Budget,
             floor: int = 0) -> list[torch.Tensor]:
    """Bool tensors marking the `budget` active entries of smallest score: per layer (a list of
    counts) or over all layers at once (one count; each layer's `floor` largest active entries
    are never taken). `active` None: every entry is active (vectors of active values)."""
    if active is None:
        active = [torch.ones(s.shape, dtype=torch.bool, device=s.device) for s in scores]
    if isinstance(budget, int):
        picked = smallest_active(_cat(guard_layers(scores, active, floor)), _cat(active), budget)
        return _split(picked, active)
    return [smallest_active(s, m, k) for s, m, k in zip(scores, active, budget)]


@torch.no_grad()
def largest(scores: Sequence[torch.Tensor], blocked: Sequence[torch.Tensor] | None, budget: Budget
            ) -> list[torch.Tensor]:
    """Bool tensors marking the `budget` entries of largest score that are not `blocked` (None:
    none is), per layer or over all layers at once; never more than there are unblocked."""
    if blocked is None:
        blocked = [torch.zeros(s.shape, dtype=torch.bool, device=s.device) for s in scores]
    if isinstance(budget, int):
        flat = _cat(blocked)
        picked = largest_inactive(_cat(scores), flat, min(budget, int(flat.numel() - flat.sum())))
        return _split(picked, blocked)
    free = [int(f) for f in torch.stack([torch.count_nonzero(~b) for b in blocked]).cpu().tolist()]
    return [largest_inactive(s, b, min(k, f)) for s, b, k, f in zip(scores, blocked, budget, free)]


def random_scores(like: Sequence[torch.Tensor], scope: str, generator: torch.Generator) -> list[torch.Tensor]:
    """Uniform scores, drawn on the CPU generator (one draw per layer, or one over all layers for
    ``scope: global``): growth by them is uniform random growth."""
    if scope == "global":
        flat = torch.rand(sum(t.numel() for t in like), generator=generator)
        return [s.to(t.device) for s, t in zip(_split(flat, like), like)]
    return [torch.rand(t.shape, generator=generator).to(t.device) for t in like]


def to_indices(picked: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, the flat positions a bool selection marks."""
    return [p.reshape(-1).nonzero().squeeze(1) for p in picked]


@dataclass
class Update:
    """One update in progress: what the steps of ``DropAndGrow.update`` hand each other."""

    step: int
    rate: float
    old: list[torch.Tensor]  # the masks before the update
    nnz: list[int]  # active weights per layer before it
    dropped: list[torch.Tensor] = field(default_factory=list)
    after: list[torch.Tensor] = field(default_factory=list)  # old minus dropped
    grown: list[torch.Tensor] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # a method's own intermediate values (its record)
    scores: list[torch.Tensor] | None = None  # the drop scores, made once (DropAndGrow.scores)


class DropAndGrow(ScheduledUpdates, RandomInitMixin, Method):
    """Base of the methods that replace a fraction of the active weights at each update."""

    keeps_structure = True
    #: output units left with no active input keep the structure (SRigL's ablated units)
    empty_units = False

    #: a weight dropped and grown in the same update: "restart" (at 0, optimizer state zeroed) or
    #: "keep" (its value and state, as if it had not moved)
    regrown = "restart"
    #: positions whose optimizer state the commit zeroes: "grown" and/or "dropped"
    reset: tuple[str, ...] = ("grown",)
    scope = "layer"
    exclude_pruned = False
    #: prefix of the method's own log keys (``set/...``)
    log_prefix = ""

    # --- the parts a method fills in ------------------------------------------------------------
    def rate(self, step: int) -> float:  # pragma: no cover - every drop-and-grow method has one
        raise NotImplementedError

    def drop_scores(self, u: Update) -> list[torch.Tensor]:
        """What the drop ranks (smallest first): |w| by default."""
        return [p.detach().abs() for p in self.masks.params]

    def drop_budget(self, u: Update) -> Budget:
        """floor(rate * active) per layer, or over all layers for ``scope: global`` (RigL's rounding)."""
        if self.scope == "global":
            return min(int(math.floor(u.rate * sum(u.nnz))), sum(u.nnz))
        return [min(int(math.floor(u.rate * k)), k) for k in u.nnz]

    def scores(self, u: Update) -> list[torch.Tensor]:
        """This update's drop_scores, made once: the drop and, under ``structure=block``, the
        ranking of whole blocks read the same (RigL's drop noise is drawn once)."""
        if u.scores is None:
            u.scores = self.drop_scores(u)
        return u.scores

    def drop(self, u: Update) -> list[torch.Tensor]:
        return smallest(self.scores(u), u.old, self.drop_budget(u), self.masks.floor)

    def grow_scores(self, u: Update) -> list[torch.Tensor]:  # pragma: no cover - every method says
        raise NotImplementedError

    def grow_budget(self, u: Update) -> Budget:
        """As many as were dropped: per layer, or in all for ``scope: global``."""
        counts = [int(c) for c in torch.stack([torch.count_nonzero(d) for d in u.dropped]).cpu().tolist()]
        return sum(counts) if self.scope == "global" else counts

    def grow(self, u: Update) -> list[torch.Tensor]:
        blocked = u.old if self.exclude_pruned else u.after
        if self.structure.active:
            return self.grow_within_structure(u, self.grow_scores(u), blocked)
        return largest(self.grow_scores(u), blocked, self.grow_budget(u))

    def grow_within_structure(self, u: Update, scores: Sequence[torch.Tensor], blocked: Sequence[torch.Tensor]
                              ) -> list[torch.Tensor]:
        """Structured growth (the one mechanism every method's growth takes under ``structure``):
        per layer, each group regains what the drop took from it, at the largest `scores` not
        `blocked` (then at the just-dropped positions where a group has too few). A method that
        moves weights between layers (sparse momentum, DSR) keeps each layer's count here."""
        return [self.structure.regrow(s, o, a, b) for s, o, a, b in zip(scores, u.old, u.after, blocked)]

    def record(self, u: Update) -> dict:
        """What ``last_update`` keeps of the update (the tests and diagnostics read it)."""
        return {"step": u.step, "old_masks": u.old, "pruned": u.dropped, "grown": u.grown, **u.extra}

    def method_logs(self, u: Update) -> dict:
        """The method's own log entries for this update (beside ``ops.mask_change_logs``)."""
        return {}

    def finish(self, u: Update) -> None:
        """After the commit: what the method carries to its next update (DSR's threshold)."""

    def check_structure(self) -> None:
        """Raise if an update left a mask outside `structure` (a bug, never bad input)."""
        bad = self.masks.structure_violations(empty_ok=self.empty_units)
        if bad:
            raise RuntimeError(f"{self.name}: the update broke structure={self.structure} in {bad}")

    # --- the skeleton ---------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, step: int) -> dict:
        ms = self.masks
        with ms.dense_view():  # sparse layers: their weights and masks as dense tensors for the update
            u = Update(step=step, rate=self.rate(step), old=[m.clone() for m in ms.masks], nnz=ms.nnz())
            u.dropped = self.drop(u)
            if self.structure.kind == "block":  # whole blocks, as many as the method's drop took
                u.dropped = [self.structure.whole_drops(d, o, s)
                             for d, o, s in zip(u.dropped, u.old, self.scores(u))]
            u.after = [m & ~d for m, d in zip(u.old, u.dropped)]
            u.grown = self.grow(u)
            self.commit(u.old, u.dropped, u.grown)
            if self.structure.active:
                self.check_structure()
            self.finish(u)
            self.last_update = self.record(u)
            return {**self.method_logs(u), **mask_change_logs(ms.names, u.old, ms.masks)}

    @torch.no_grad()
    def commit(self, old: list[torch.Tensor], dropped: list[torch.Tensor], grown: list[torch.Tensor]) -> None:
        """Install the update: `dropped` leave, `grown` come in, as ``regrown`` and ``reset`` say."""
        if self.regrown == "restart":
            drop, grow = dropped, grown
        else:  # only what changes: a weight dropped and grown again stays as it was
            drop = [d & ~g for d, g in zip(dropped, grown)]
            grow = [g & ~o for g, o in zip(grown, old)]
        self.commit_indices(to_indices(drop), to_indices(grow))

    def commit_indices(self, drop: list[torch.Tensor], grow: list[torch.Tensor]) -> None:
        """The commit at the level of flat positions (an index-level method, GSE, calls it directly)."""
        self.masks.replace_(drop, grow, self.ctx.optimizer, reset=self.reset)
