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

from ... import schema as S
from ..distributions import allocate
from ..flops import DENSE_GRADIENT_STEP, SPARSE_STEP
from ..ops import floored, guard_layers, largest_inactive, mask_change_logs, random_inactive, smallest_active
from ..schedules import DECAYS, decay
from .base import Method, ScheduledUpdates, cadence_from, register
from .dense import RandomInitMixin
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


@dataclass
class SparseMomentumSchema:
    """The options of ``method=sparse_momentum`` (``conf/method/sparse_momentum.yaml`` holds the same values)."""

    name: str = "sparse_momentum"
    init: str = init()
    reinit: str = reinit()
    prune_rate: float = fraction(0.5, open_low=True, hint="p0, e.g. method.prune_rate=0.5")
    prune_rate_min: float = fraction(0.005)
    decay: str = S.choice("cosine", DECAYS)
    update_every: Any = interval("epoch")
    end: Optional[Milestone] = milestone()
    prune: str = S.choice("magnitude", ("magnitude", "set", "negativity", "global_magnitude"))
    growth: str = S.choice("momentum", ("momentum", "random", "momentum_neuron", "global_momentum"))
    redistribution: str = S.choice("momentum", ("momentum", "magnitude", "nonzero", "none"))
    dense_guard: float = fraction(0.8, open_low=True, closed_high=True)
    regrow_cap: float = fraction(0.99, open_low=True, closed_high=True)
    nonzero_threshold: float = S.num(0.0, ge=0.0)


@register("sparse_momentum", schema=SparseMomentumSchema)
class SparseMomentum(ScheduledUpdates, RandomInitMixin, Method):
    # execution=sparse: growth by momentum reads the momentum of inactive weights, i.e. a dense
    # gradient every step; sparse layers then form it (one dense GEMM per layer per step) and the
    # engine keeps the inactive weights' momentum. Random growth needs neither.
    sparse_execution = True

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
        if self.redistribution == "none":
            raw = [1.0] * len(masks)
        else:  # one stacked tensor, one host sync for all layers
            per = []
            for m, w, g, k in zip(masks, weights, signals, nnz):
                if self.redistribution == "momentum":
                    per.append(torch.where(m, g.abs(), 0).sum() / max(k, 1))
                elif self.redistribution == "magnitude":
                    per.append(torch.where(m, w.abs(), 0).sum() / max(k, 1))
                else:
                    per.append(torch.count_nonzero(w.abs() > self.nonzero_threshold).to(w.dtype))
            raw = [0.0 if (k == 0 and self.redistribution != "nonzero") or math.isnan(v) else v
                   for v, k in zip(torch.stack(per).double().cpu().tolist(), nnz)]
        total = sum(raw)
        if total <= 0:
            return [1.0 / len(raw)] * len(raw)
        return [r / total for r in raw]

    def prune_layer(self, w: torch.Tensor, m: torch.Tensor, k: int) -> torch.Tensor:
        if self.prune_mode == "magnitude":
            return smallest_active(w.abs(), m, k)
        half = math.ceil(k / 2)
        pos = m & (w > 0)
        neg = m & (w < 0)
        small_pos = smallest_active(w, pos, min(half, int(pos.sum())))
        if self.prune_mode == "set":  # SET: the negative weights closest to zero
            far_neg = smallest_active(-w, neg, min(half, int(neg.sum())))
        else:  # "negativity", as the reference code: the most negative weights
            far_neg = smallest_active(w, neg, min(half, int(neg.sum())))
        return small_pos | far_neg

    def grow_layer(self, g: torch.Tensor, m: torch.Tensor, k: int) -> torch.Tensor:
        if self.growth_mode == "random":
            return random_inactive(m, k, self.ctx.generator)
        if self.growth_mode == "momentum_neuron" and m.dim() >= 2 and k > 0:
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
        return largest_inactive(g.abs(), m, k)

    @torch.no_grad()
    def update(self, step: int) -> dict:
        masks = self.masks
        old = [m.clone() for m in masks.masks]
        weights = [p.data for p in masks.params]
        signals = [self.growth_signal(p) for p in masks.params]
        numels = masks.numels
        nnz = masks.nnz()
        n_layers = len(old)
        p = self.prune_rate(step)
        shares = self.layer_shares(old, weights, signals, nnz)

        rates = []
        for k, n, s in zip(nnz, numels, shares):
            sparsity = (n - k) / n
            r = p
            if k / n > self.guard_density and s > 1.0 / n_layers:
                r = min(sparsity, p)
            rates.append(r)

        # 1. prune
        if self.prune_mode == "global_magnitude":
            k_total = min(math.ceil(p * sum(nnz)), sum(nnz))
            flat_w = torch.cat([w.flatten() for w in guard_layers([w.abs() for w in weights], old, masks.floor)])
            flat_m = torch.cat([m.flatten() for m in old])
            dead = smallest_active(flat_w, flat_m, k_total)
            pruned = [d.view_as(m) for d, m in zip(torch.split(dead, numels), old)]
        else:
            counts = floored([math.ceil(r * k) for r, k in zip(rates, nnz)], nnz, masks.floor)
            pruned = [self.prune_layer(w, m, c) for w, m, c in zip(weights, old, counts)]
        removed = [int(c) for c in torch.stack([torch.count_nonzero(x) for x in pruned]).cpu().tolist()]
        after_prune = [m & ~d for m, d in zip(old, pruned)]
        total_removed = sum(removed)
        free = [n - (k - r) for n, k, r in zip(numels, nnz, removed)]

        # 2. redistribute and grow
        if self.growth_mode == "global_momentum":
            flat_g = torch.cat([g.abs().flatten() for g in signals])
            flat_m = torch.cat([m.flatten() for m in after_prune])
            born = largest_inactive(flat_g, flat_m, total_removed)
            grown = [b.view_as(m) for b, m in zip(torch.split(born, numels), old)]
            regrow = [int(b.sum()) for b in grown]
        else:
            if self.redistribution == "none":
                regrow = list(removed)
            else:
                caps = [self.regrow_cap * f for f in free]
                targets = spread_budget([s * total_removed for s in shares], caps)
                int_caps = [int(math.floor(c)) for c in caps]
                if sum(int_caps) < total_removed:
                    int_caps = list(free)
                regrow = allocate(targets, int_caps, min(total_removed, sum(int_caps)))
            grown = [self.grow_layer(g, m, k) for g, m, k in zip(signals, after_prune, regrow)]

        new = [a | g for a, g in zip(after_prune, grown)]
        grown_counts = torch.stack([torch.count_nonzero(n & ~o) for n, o in zip(new, old)])
        net_grown = [int(c) for c in grown_counts.cpu().tolist()]
        for i, m in enumerate(new):
            masks.masks[i] = m
        masks.apply_()

        self.last_update = {
            "step": step,
            "prune_rate": p,
            "layer_rates": rates,
            "shares": shares,
            "removed": removed,
            "regrow": regrow,
            "free": free,
            "nnz_before": nnz,
            "old_masks": old,
            "pruned": pruned,
            "grown": grown,
            "net_grown": net_grown,
        }
        logs = {"sm/prune_rate": p, **mask_change_logs(masks.names, old, new)}
        for name, s in zip(masks.names, shares):
            logs[f"sm/share/{name}"] = s
        return logs
