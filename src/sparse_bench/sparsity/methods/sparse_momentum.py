"""Sparse momentum (Dettmers & Zettlemoyer 2019, "Sparse Networks from Scratch").

What the reference code does, step by step, and what this module does the same way:

* Masks start at the requested density (``init``: exact ``uniform`` by default, ``er``,
  ``erk``, or the reference's ``bernoulli``). Weights keep their default init, times the mask
  (``reinit: fan_in`` re-initialises them by their sparse fan-in instead).
* After every optimizer step the weights are re-masked. Gradients and momentum buffers are
  NOT masked: inactive weights keep accumulating momentum, which is the growth signal.
* The prune rate decays with the mini-batch counter: ``p(t) = p_min + (p0 - p_min)(1 +
  cos(pi t / T)) / 2`` (``decay: cosine``) or linearly (``decay: linear``).
* At the end of every epoch but the last (``update_every: epoch``, or every N steps; none from
  the ``end`` milestone on, default null: the end of training):
  1. layer share s_l = mean |momentum| over the layer's active weights, normalised
     (``redistribution``: momentum | magnitude | nonzero | none);
  2. a layer more than 80% dense whose share exceeds 1/#layers is pruned at
     min(its sparsity, p) (the dense-layer guard);
  3. each layer loses ceil(p_l * nnz_l) active weights of smallest |w| (``prune``:
     magnitude | set | negativity | global_magnitude);
  4. the regrowth budget s_l * total_removed is capped at ``regrow_cap`` (0.99) of the layer's
     free slots, the overflow spread evenly over the other layers until it fits;
  5. each layer regrows the inactive positions of largest |momentum| (``growth``: momentum |
     random | momentum_neuron | global_momentum);
  6. grown weights start at exactly 0 (they were masked to 0 while inactive).

Where the reference is only approximately exact (threshold searches, Bernoulli growth, an
exponentially smoothed correction of the total), this module is exact: integer budgets are
rounded by largest remainder so the total number of active weights never changes.
A weight pruned and regrown in the same cycle keeps its value, as in the reference (it is
counted as neither pruned nor grown).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from omegaconf import MISSING

from ... import schema as S
from ..distributions import allocate
from ..flops import DENSE_GRADIENT_STEP, SPARSE_STEP
from ..ops import floored, largest_inactive, random_inactive, smallest_active
from ..schedules import DECAYS, decay
from .base import cadence_from, register
from .drop_grow import DropAndGrow, Update, largest, random_scores, smallest
from .schemas import Milestone, fraction, init, interval, milestone, reinit


def spread_budget(targets: list[float], caps: list[float], iterations: int = 1000) -> list[float]:
    """Cap each target; spread the overflow evenly over the layers below their cap; repeat."""
    alloc = list(targets)
    for _ in range(iterations):
        overflow = 0.0
        for i, (a, c) in enumerate(zip(alloc, caps)):
            if a > c:
                overflow += a - c
                alloc[i] = c
        if overflow <= 1e-9:
            break
        open_ = [i for i, (a, c) in enumerate(zip(alloc, caps)) if a < c - 1e-12]
        if not open_:
            break
        for i in open_:
            alloc[i] += overflow / len(open_)
    return alloc


def _prune_magnitude(w: torch.Tensor, m: torch.Tensor, k: int) -> torch.Tensor:
    return smallest_active(w.abs(), m, k)


def _prune_signs(w: torch.Tensor, m: torch.Tensor, k: int, far_negative: bool) -> torch.Tensor:
    """ceil(k/2) of the smallest positive weights, and as many negative weights: those closest to
    zero (SET's rule) or, `far_negative`, the most negative ones (the reference's negativity)."""
    half = math.ceil(k / 2)
    pos = m & (w > 0)
    neg = m & (w < 0)
    small_pos = smallest_active(w, pos, min(half, int(pos.sum())))
    scores = w if far_negative else -w
    return small_pos | smallest_active(scores, neg, min(half, int(neg.sum())))


#: ``method.prune``: how each layer picks its k weights to remove (weights, mask, k) -> bool tensor;
#: ``global_magnitude`` is magnitude over all layers at once
PRUNES = {
    "magnitude": _prune_magnitude,
    "set": lambda w, m, k: _prune_signs(w, m, k, far_negative=False),
    "negativity": lambda w, m, k: _prune_signs(w, m, k, far_negative=True),
    "global_magnitude": None,
}


def _grow_neurons(g: torch.Tensor, m: torch.Tensor, k: int, generator) -> torch.Tensor:
    """k positions shared by the output units in proportion to their mean |momentum|, the largest
    |momentum| within each unit; what rounding leaves over goes to the largest anywhere."""
    if m.dim() < 2 or k <= 0:
        return largest_inactive(g.abs(), m, k)
    a = g.abs()
    rows = a.flatten(1)
    v = rows.mean(1)
    v = v / v.sum() if float(v.sum()) > 0 else torch.full_like(v, 1.0 / len(v))
    free = (~m).flatten(1).sum(1)
    per = torch.minimum(torch.floor(v * k).long(), free).tolist()
    grown = torch.zeros_like(m)
    gflat, mflat = grown.flatten(1), m.flatten(1)
    for i, kk in enumerate(per):
        if kk > 0:
            gflat[i] = largest_inactive(rows[i], mflat[i], kk)
    rest = k - int(grown.sum())
    return grown | largest_inactive(a, m | grown, rest)


#: ``method.growth``: how each layer picks its regrowth (signal, mask after pruning, k, generator) ->
#: bool tensor; ``global_momentum`` is momentum over all layers at once
GROWTHS = {
    "momentum": lambda g, m, k, gen: largest_inactive(g.abs(), m, k),
    "random": lambda g, m, k, gen: random_inactive(m, k, gen),
    "momentum_neuron": _grow_neurons,
    "global_momentum": None,
}


def _mean_active(values: torch.Tensor, m: torch.Tensor, k: int, threshold: float) -> torch.Tensor:
    return torch.where(m, values.abs(), 0).sum() / max(k, 1)


#: ``method.redistribution``: a layer's raw share (mask, weights, growth signal, active count,
#: nonzero threshold) -> 0-d tensor; ``none`` shares nothing (each layer regrows what it lost)
REDISTRIBUTIONS = {
    "momentum": lambda m, w, g, k, thr: _mean_active(g, m, k, thr),
    "magnitude": lambda m, w, g, k, thr: _mean_active(w, m, k, thr),
    "nonzero": lambda m, w, g, k, thr: torch.count_nonzero(w.abs() > thr).to(w.dtype),
    "none": None,
}


@dataclass
class SparseMomentumSchema:
    """The options of ``method=sparse_momentum`` (their values: ``conf/method/sparse_momentum.yaml``)."""

    name: str = MISSING
    init: str = init()
    reinit: str = reinit()
    prune_rate: float = fraction(open_low=True, hint="p0, e.g. method.prune_rate=0.5")
    prune_rate_min: float = fraction()
    decay: str = S.choice(DECAYS)
    update_every: Any = interval()
    end: Optional[Milestone] = milestone()
    prune: str = S.choice(PRUNES)
    growth: str = S.choice(GROWTHS)
    redistribution: str = S.choice(REDISTRIBUTIONS)
    dense_guard: float = fraction(open_low=True, closed_high=True)
    regrow_cap: float = fraction(open_low=True, closed_high=True)
    nonzero_threshold: float = S.num(ge=0.0)


@register("sparse_momentum", schema=SparseMomentumSchema)
class SparseMomentum(DropAndGrow):
    # execution=sparse: growth by momentum reads the momentum of inactive weights, i.e. a dense
    # gradient every step; sparse layers then form it (one dense GEMM per layer per step) and the
    # engine keeps the inactive weights' momentum. Random growth needs neither.
    sparse_execution = True
    regrown = "keep"  # a weight pruned and regrown in the same cycle keeps its value (the reference)
    reset = ()  # inactive weights keep their momentum: it is the growth signal

    def wants_dense_grad(self, step):
        return self.keeps_inactive_state

    @property
    def keeps_inactive_state(self) -> bool:
        if self.growth_mode != "random":
            return True
        opt = self.ctx.optimizer  # no momentum: the redistribution falls back to the gradient
        return not any(g.get("momentum", 0) or "betas" in g for g in opt.param_groups)

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.prune_mode = cfg.prune
        self.growth_mode = cfg.growth
        self.redistribution = cfg.redistribution
        self.decay_kind = cfg.decay
        self.p0 = cfg.prune_rate
        self.p_min = cfg.prune_rate_min
        self.guard_density = cfg.dense_guard
        self.regrow_cap = cfg.regrow_cap
        self.nonzero_threshold = cfg.nonzero_threshold
        self.cadence = cadence_from(cfg, ctx)
        self.last_update: dict = {}

    def prune_rate(self, step: int) -> float:
        return decay(self.decay_kind, self.p0, self.p_min, step, self.ctx.total_steps)

    rate = prune_rate

    def step_passes(self, step):
        """SNFS: 2 f_S + f_D every step, since growth reads the momentum of inactive weights, i.e.
        a dense weight gradient; with ``growth: random`` nothing outside the mask is read."""
        return SPARSE_STEP if self.growth_mode == "random" else DENSE_GRADIENT_STEP

    # --- one prune / redistribute / grow cycle (the update) ---------------------------------
    def growth_signal(self, param: torch.Tensor) -> torch.Tensor:
        m = self.optimizer_momentum(param)
        if m is None:  # no momentum (plain SGD): fall back to the last gradient
            m = param.grad if param.grad is not None else torch.zeros_like(param)
        return m

    def layer_shares(self, masks, weights, signals, nnz) -> list[float]:
        share = REDISTRIBUTIONS[self.redistribution]
        if share is None:
            raw = [1.0] * len(masks)
        else:  # one stacked tensor, one host sync for all layers
            per = [share(m, w, g, k, self.nonzero_threshold) for m, w, g, k in zip(masks, weights, signals, nnz)]
            raw = [0.0 if (k == 0 and self.redistribution != "nonzero") or math.isnan(v) else v
                   for v, k in zip(torch.stack(per).double().cpu().tolist(), nnz)]
        total = sum(raw)
        if total <= 0:
            return [1.0 / len(raw)] * len(raw)
        return [r / total for r in raw]

    def drop(self, u: Update) -> list[torch.Tensor]:
        """1. each layer's rate (the dense-layer guard), then the prune rule, per layer or global."""
        masks = self.masks
        weights = [p.data for p in masks.params]
        signals = [self.growth_signal(p) for p in masks.params]
        numels, nnz, p = masks.numels, u.nnz, u.rate
        shares = self.layer_shares(u.old, weights, signals, nnz)
        rates = []
        for k, n, s in zip(nnz, numels, shares):
            r = p
            if k / n > self.guard_density and s > 1.0 / len(nnz):
                r = min((n - k) / n, p)
            rates.append(r)
        u.extra.update(signals=signals, shares=shares, rates=rates)
        rule = PRUNES[self.prune_mode]
        if rule is None:  # global magnitude
            return smallest([w.abs() for w in weights], u.old, min(math.ceil(p * sum(nnz)), sum(nnz)), masks.floor)
        counts = floored([math.ceil(r * k) for r, k in zip(rates, nnz)], nnz, masks.floor)
        return [rule(w, m, c) for w, m, c in zip(weights, u.old, counts)]

    def grow(self, u: Update) -> list[torch.Tensor]:
        """2. the regrowth budget shared by the layers' shares, capped; growth per layer or global."""
        numels, nnz, shares, signals = self.masks.numels, u.nnz, u.extra["shares"], u.extra["signals"]
        removed = [int(c) for c in torch.stack([torch.count_nonzero(x) for x in u.dropped]).cpu().tolist()]
        total_removed = sum(removed)
        free = [n - (k - r) for n, k, r in zip(numels, nnz, removed)]
        u.extra.update(removed=removed, free=free)
        if self.structure.active:  # no redistribution: each group regrows what it lost
            u.extra["regrow"] = removed
            scores = (random_scores(u.old, "layer", self.ctx.generator) if self.growth_mode == "random"
                      else [g.abs() for g in signals])
            return self.grow_within_structure(u, scores, u.after)
        rule = GROWTHS[self.growth_mode]
        if rule is None:  # global momentum
            grown = largest([g.abs() for g in signals], u.after, total_removed)
            u.extra["regrow"] = [int(b.sum()) for b in grown]
            return grown
        if self.redistribution == "none":
            regrow = list(removed)
        else:
            caps = [self.regrow_cap * f for f in free]
            targets = spread_budget([s * total_removed for s in shares], caps)
            int_caps = [int(math.floor(c)) for c in caps]
            if sum(int_caps) < total_removed:
                int_caps = list(free)
            regrow = allocate(targets, int_caps, min(total_removed, sum(int_caps)))
        u.extra["regrow"] = regrow
        return [rule(g, m, k, self.ctx.generator) for g, m, k in zip(signals, u.after, regrow)]

    def record(self, u: Update) -> dict:
        x = u.extra
        grown_counts = torch.stack([torch.count_nonzero(n & ~o) for n, o in zip(self.masks.masks, u.old)])
        return {"step": u.step, "prune_rate": u.rate, "layer_rates": x["rates"], "shares": x["shares"],
                "removed": x["removed"], "regrow": x["regrow"], "free": x["free"], "nnz_before": u.nnz,
                "old_masks": u.old, "pruned": u.dropped, "grown": u.grown,
                "net_grown": [int(c) for c in grown_counts.cpu().tolist()]}

    def method_logs(self, u: Update) -> dict:
        logs = {"sm/prune_rate": u.rate}
        for name, s in zip(self.masks.names, u.extra["shares"]):
            logs[f"sm/share/{name}"] = s
        return logs
