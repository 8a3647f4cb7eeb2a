"""SET: Sparse Evolutionary Training (Mocanu et al. 2018), as the sparse-training baselines use it.

What the reference does, step by step, and what this module does the same way:

* Masks start at the requested density with an Erdos-Renyi layer distribution (``init: er``;
  the paper's epsilon * (n_in + n_out) / (n_in * n_out), here scaled so the global density is
  exact). Weights keep their default init, times the mask.
* Training is ordinary SGD on the masked weights; inactive weights are re-zeroed after every
  optimizer step.
* At the end of every epoch but the last (``update_every: epoch``, or every N steps), per layer:
  1. remove the fraction ``zeta`` (``prune_rate``, 0.3) of the active weights closest to zero:
     ``prune: magnitude`` ranks them by |w| (the RigL/sparse momentum baseline),
     ``prune: set`` is the original SET rule: zeta of the positive weights (the smallest)
     and zeta of the negative weights (the closest to zero), each sign separately;
  2. add as many new connections as were removed, uniformly at random among all positions
     that are inactive after the removal (a just-removed position may be drawn again, unless
     ``exclude_pruned``);
  3. new connections start at exactly 0 (as in the RigL code's SET baseline; the original SET
     code drew small random values) and their optimizer state (momentum, Adam moments) is
     zeroed, so a new connection starts from scratch.
* ``decay`` optionally anneals zeta over the mini-batches to ``prune_rate_min`` (cosine or
  linear, as the RigL baseline does); SET itself keeps it constant (the default). The decay
  runs to ``end`` (a milestone, default null: the end of training), after which the masks stay
  fixed.

Protocols of the comparisons that run SET as a baseline (all options of this module):

* GSE's ``dynamic_sparse_training.py --prune magnitude --grow random``: ER densities with the
  sparse fan-in re-initialisation (``init: er``, ``reinit: fan_in``); every 1000 steps until
  epoch 120 (``update_every: 1000``, ``end: {unit: epoch, value: 120}``) the fraction
  0.1 (1 + cos(pi t / T_end)) of the active weights (``prune_rate: 0.2``, ``decay: cosine``,
  ``prune_rate_min: 0``) is pruned by magnitude over all layers at once and as many are grown
  uniformly at random among all layers' inactive positions (``scope: global``), never one pruned
  in the same update (``exclude_pruned: true``: GSE sets their growth score to -inf).
* The DSR code in sparse_learning (``--rewire --rewire-fraction 0.138``): per layer, the fraction
  0.138 (WRN-28-2 at 90%; ImageNet 0.14) of the active weights with the smallest |w| is pruned and
  as many grown at random in the same layer, never a just-pruned position; on DSR's period
  schedule (``update_every``: 100/200/400/800 iterations from epochs 0/25/80/140) until epoch 190.

Exactness: layer l removes k_l = floor(zeta * nnz_l) weights (the RigL convention) and regrows
exactly k_l, so every layer's count, and the global density, never change (``scope: global``:
floor(zeta * total active) over all layers and as many regrown, so only the total is fixed; the
references round slightly differently: GSE keeps int(N d (1 - zeta)), the DSR code prunes
int(zeta nnz_l) + 1). With
``prune: set`` the k_l removals are split between the signs in proportion to how many active
weights each sign has (largest-remainder rounding), which is the paper's per-sign fraction made
exact. A position removed and drawn again in the same update is re-initialised like any new
connection (weight 0, optimizer state zeroed), as in the paper, where the removed weight is gone
and the new one is a fresh connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from omegaconf import MISSING

from ... import schema as S
from ...errors import ConfigError
from ..distributions import allocate
from ..ops import smallest_active
from ..schedules import DECAYS, decay
from .base import cadence_from, register
from .drop_grow import DropAndGrow, Update, random_scores
from .schemas import Milestone, fraction, init, interval, milestone, reinit, scope


@torch.no_grad()
def prune_by_sign(w: torch.Tensor, m: torch.Tensor, k: int) -> torch.Tensor:
    """SET's removal: k active weights, split between the signs in proportion to their counts.

    Within the positive weights (w >= 0, so an active exact zero counts as the smallest positive)
    the smallest go; within the negative weights those closest to zero go.
    """
    pos = m & (w >= 0)
    neg = m & (w < 0)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    total = n_pos + n_neg
    if k <= 0 or total == 0:
        return torch.zeros_like(m)
    k_pos, k_neg = allocate([k * n_pos / total, k * n_neg / total], [n_pos, n_neg], min(k, total))
    return smallest_active(w, pos, k_pos) | smallest_active(-w, neg, k_neg)


#: ``method.prune``: how a layer picks its k weights to remove (weights, mask, k) -> bool tensor
PRUNES = {
    "magnitude": lambda w, m, k: smallest_active(w.abs(), m, k),  # the RigL / sparse momentum baseline
    "set": prune_by_sign,  # the SET paper's rule
}


@dataclass
class SETSchema:
    """The options of ``method=set`` (their values: ``conf/method/set.yaml``)."""

    name: str = MISSING
    init: str = init()
    reinit: str = reinit()
    prune_rate: float = fraction(open_low=True, hint="zeta, e.g. method.prune_rate=0.3")
    prune_rate_min: float = fraction()
    decay: str = S.choice(DECAYS)
    update_every: Any = interval()
    end: Optional[Milestone] = milestone()
    prune: str = S.choice(PRUNES)
    scope: str = scope()
    exclude_pruned: bool = MISSING


@register("set", schema=SETSchema)
class SET(DropAndGrow):
    """Prune the smallest-magnitude fraction per layer, regrow as many at random (at zero)."""

    sparse_execution = True  # updates read |w| and the mask through dense views
    regrown = "restart"  # a removed weight drawn again is a new connection
    reset = ("grown",)

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.prune_mode = cfg.prune
        self.decay_kind = cfg.decay
        self.p0 = cfg.prune_rate
        self.p_min = cfg.prune_rate_min
        self.scope = cfg.scope
        if self.scope == "global" and self.prune_mode != "magnitude":  # two keys: not the schema's business
            raise ConfigError("method.scope=global ranks |w| over all layers: use it with method.prune=magnitude")
        self.exclude_pruned = cfg.exclude_pruned
        self.cadence = cadence_from(cfg, ctx)
        self.last_update: dict = {}

    def prune_rate(self, step: int) -> float:
        """zeta at `step`: decayed over the updates' span, from step 0 to ``end``."""
        return decay(self.decay_kind, self.p0, self.p_min, step, self.cadence.end)

    rate = prune_rate

    def drop(self, u: Update) -> list[torch.Tensor]:
        if self.prune_mode == "magnitude":
            return super().drop(u)
        rule = PRUNES[self.prune_mode]
        return [rule(p.data, m, k) for p, m, k in zip(self.masks.params, u.old, self.drop_budget(u))]

    def grow_scores(self, u: Update) -> list[torch.Tensor]:
        return random_scores(u.old, self.scope, self.ctx.generator)

    def record(self, u: Update) -> dict:
        counts = [int(c) for c in torch.stack([torch.count_nonzero(d) for d in u.dropped]).cpu().tolist()]
        return {"step": u.step, "prune_rate": u.rate, "counts": counts, "old_masks": u.old,
                "pruned": u.dropped, "grown": u.grown}

    def method_logs(self, u: Update) -> dict:
        return {"set/prune_rate": u.rate, "set/rewired": int(sum(torch.count_nonzero(d) for d in u.dropped))}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        # a checkpoint loaded with map_location=cuda carries the generator state on the device
        state["generator"] = state["generator"].detach().to("cpu", torch.uint8)
        super().load_state_dict(state)
