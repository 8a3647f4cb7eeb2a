"""DSR: dynamic sparse reparameterization (Mostafa & Wang 2019).

What the reference does (the DSR code shipped in TimDettmers/sparse_learning,
``imagenet/baseline/main.py`` and ``parameterized_tensors.py``, with its run scripts
``experiments/wrnet_experiments.yaml``, ``resnet_experiments.yaml`` and ``learning_schedules/``),
step by step, and what this module does the same way:

* Masks start at the requested density, the same in every layer (``init: uniform``, as the
  reference thins every sparse tensor to one sparsity). Weights keep their default init.
* Training is ordinary SGD on the masked weights; inactive weights are re-zeroed after every step.
* At a reallocation (``update_every``, a period schedule; ``end``, when they stop):
  1. prune every active weight with |w| < H, where H is one threshold for the whole network
     (``init_threshold``: H(0) = 0.001); K = number pruned, R_l = weights surviving in layer l;
  2. regrow K weights, layer l getting the share R_l / sum(R) of them (``--rewire-scaling``:
     layers that kept more weights get more back), at uniformly random positions among the
     layer's inactive ones, never one pruned in this same reallocation (``exclude_pruned``: the
     reference removes the just-pruned indices from the candidates); new weights start at 0;
  3. adapt the threshold for the next reallocation towards pruning N_p weights:
     H <- 2H if K < (1 - delta) N_p, H <- H/2 if K > (1 + delta) N_p, else unchanged
     (``delta``: the fractional tolerance, 0.1). N_p is ``np_count`` weights when given (the run
     scripts' ``--n-prune-params``: 20,000 on WRN-28-2, 400,000 on ResNet-50), else ``np_target``
     x the active weights.
* The reallocation period grows during training: the reference's schedule files give
  100/200/400/800 iterations from epochs 0/25/80/140 and no reallocation from epoch 190
  (``wrnet_schedule.yaml``, ``--stop-rewire-epoch 190``, 200 epochs), and 1000/2000/4000/8000
  from epochs 0/25/50/75 with a stop at 95 (``resnet_schedule.yaml``, 100 epochs). A
  reallocation happens after an iteration whose global count is a multiple of the period in
  force (the reference tests ``iteration % period == 0``). The default here is the WRN schedule
  as fractions of the run (0, 0.125, 0.4, 0.7; end 0.95), so it fits any length; the experiment
  files give the reference's epochs.
* The optimizer state (momentum, Adam moments) of regrown weights is zeroed, so a new
  connection starts from scratch.

Where this differs from the reference and why:

* The reference turns the shares into counts by rounding and hands the rounding discrepancy to a
  random layer, so the total drifts by a few weights. Here the counts are integers by
  largest-remainder rounding (``allocate``), capped at each layer's free slots, summing to
  exactly K: the number of active weights, and the density, never change.
* The reference compares with ``(i + current_iteration) % period == 0`` for the 0-based index of
  the iteration just done; here the count of steps done is used (one step later).
* The reference keeps the momentum buffers of pruned and regrown weights; here the regrown
  weights' state is zeroed (their leftover momentum decayed for at least one period).
* If every weight of the network fell under H (sum(R) = 0), regrowth is spread over the layers in
  proportion to their free slots instead (the reference keeps one weight per tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from omegaconf import MISSING

from ... import schema as S
from ..distributions import allocate
from ..ops import guard_layers
from .base import cadence_from, register
from .drop_grow import DropAndGrow, Update, largest, random_scores
from .schemas import Milestone, fraction, init, interval, milestone, reinit

#: DSR's reallocation periods: the reference's WRN schedule (TimDettmers/sparse_learning,
#: learning_schedules/wrnet_schedule.yaml: 100/200/400/800 iterations from epochs 0/25/80/140 of 200)
#: as fractions of the run
DSR_PERIODS = {"unit": "fraction", "points": [[0, 100], [0.125, 200], [0.4, 400], [0.7, 800]]}


@dataclass
class DSRSchema:
    """The options of ``method=dsr`` (their values: ``conf/method/dsr.yaml``)."""

    name: str = MISSING
    init: str = init()
    reinit: str = reinit()
    init_threshold: float = S.num(gt=0.0, hint="the paper uses 0.001")
    np_target: float = fraction(open_low=True, hint="a fraction of the active weights")
    np_count: Optional[int] = S.count(ge=1, nullable=True, hint="a number of weights, or null for np_target x "
                                                                      "the active weights")
    delta: float = fraction(hint="the paper uses 0.1")
    update_every: Any = interval()
    end: Optional[Milestone] = milestone()
    exclude_pruned: bool = MISSING


@register("dsr", schema=DSRSchema)
class DSR(DropAndGrow):
    """Global adaptive magnitude threshold; regrowth shared by the layers' surviving counts."""

    sparse_execution = True  # updates read |w| and the mask through dense views
    regrown = "restart"
    reset = ("grown",)

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.threshold = cfg.init_threshold
        self.np_target = cfg.np_target
        self.np_count = cfg.np_count  # null: np_target x the active weights
        self.delta = cfg.delta
        self.exclude_pruned = cfg.exclude_pruned
        self.cadence = cadence_from(cfg, ctx)
        self.last_update: dict = {}

    @staticmethod
    def adjust_threshold(threshold: float, pruned: int, target: float, delta: float) -> float:
        """H <- 2H if too few were pruned, H/2 if too many, else H (tolerance delta)."""
        if pruned < (1.0 - delta) * target:
            return threshold * 2.0
        if pruned > (1.0 + delta) * target:
            return threshold / 2.0
        return threshold

    @staticmethod
    def regrowth_counts(surviving: list[int], free: list[int], total: int) -> list[int]:
        """`total` regrowths shared in proportion to `surviving`, capped at `free`, exact sum.

        A layer whose share exceeds its free slots gets them all; the excess is shared by the
        other layers, again in proportion to their surviving counts (water filling), then the
        real-valued shares are rounded by largest remainder.
        """
        weights = [float(s) for s in surviving] if sum(surviving) > 0 else [float(f) for f in free]
        targets = [0.0] * len(weights)
        open_ = [i for i, w in enumerate(weights) if w > 0]
        left = float(total)
        while open_ and left > 1e-9:
            norm = sum(weights[i] for i in open_)
            share = {i: left * weights[i] / norm for i in open_}
            over = [i for i in open_ if targets[i] + share[i] > free[i]]
            if not over:
                for i in open_:
                    targets[i] += share[i]
                break
            for i in over:
                left -= free[i] - targets[i]
                targets[i] = float(free[i])
            open_ = [i for i in open_ if i not in over]
        return allocate(targets, free, total)

    def rate(self, step: int) -> float:
        """DSR prunes by a threshold, not a fraction: the threshold H in force."""
        return self.threshold

    def drop(self, u: Update) -> list[torch.Tensor]:
        """1. every active weight under the global threshold goes (a layer's largest stays)."""
        guarded = guard_layers(self.scores(u), u.old, self.masks.floor)
        return [m & (w < u.rate) for w, m in zip(guarded, u.old)]

    def grow(self, u: Update) -> list[torch.Tensor]:
        """2. regrow exactly as many as were pruned, shared by the surviving counts, at random
        positions (a layer cannot regrow into the slots it has just freed, unless nothing else is)."""
        removed = [int(c) for c in torch.stack([d.sum() for d in u.dropped]).cpu().tolist()]
        k_total = sum(removed)
        surviving = [k - r for k, r in zip(u.nnz, removed)]
        if self.structure.active:  # no reallocation between layers: each group regrows what it lost
            u.extra.update(removed=removed, surviving=surviving, regrow=removed, k_total=k_total)
            return self.grow_within_structure(u, random_scores(u.old, "layer", self.ctx.generator), u.after)
        free = [n - s for n, s in zip(self.masks.numels, surviving)]
        exclude = self.exclude_pruned and sum(free) - k_total >= k_total
        if exclude:
            free = [f - r for f, r in zip(free, removed)]
        regrow = self.regrowth_counts(surviving, free, k_total)
        u.extra.update(removed=removed, surviving=surviving, regrow=regrow, k_total=k_total)
        scores = random_scores(u.old, "layer", self.ctx.generator)
        return largest(scores, u.old if exclude else u.after, regrow)

    def finish(self, u: Update) -> None:
        """3. adapt the threshold for the next update."""
        target = float(self.np_count) if self.np_count is not None else self.np_target * sum(u.nnz)
        u.extra["target"] = target
        self.threshold = self.adjust_threshold(u.rate, u.extra["k_total"], target, self.delta)

    def record(self, u: Update) -> dict:
        x = u.extra
        return {"step": u.step, "threshold_used": u.rate, "threshold_next": self.threshold, "removed": x["removed"],
                "surviving": x["surviving"], "regrow": x["regrow"], "old_masks": u.old, "pruned": u.dropped,
                "grown": u.grown}

    def method_logs(self, u: Update) -> dict:
        logs = {"dsr/threshold": self.threshold, "dsr/pruned": u.extra["k_total"], "dsr/np_target": u.extra["target"]}
        for name, g in zip(self.masks.names, u.extra["regrow"]):
            logs[f"dsr/regrow/{name}"] = g
        return logs

    # --- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["threshold"] = self.threshold
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        state["generator"] = state["generator"].detach().to("cpu", torch.uint8)
        super().load_state_dict(state)
        self.threshold = float(state["threshold"])
