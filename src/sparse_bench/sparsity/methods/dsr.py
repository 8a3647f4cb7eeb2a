"""DSR: dynamic sparse reparameterization (Mostafa & Wang 2019).

What the reference does, step by step, and what this module does the same way:

* Masks start at the requested density, the same in every layer (``init: uniform``, as the
  reference thins every sparse tensor to one sparsity). Weights keep their default init.
* Training is ordinary SGD on the masked weights; inactive weights are re-zeroed after every step.
* Every ``update_every`` optimizer steps (the reference's base period is 100 iterations):
  1. prune every active weight with |w| < H, where H is one threshold for the whole network
     (``init_threshold``: H(0) = 0.001); K = number pruned, R_l = weights surviving in layer l;
  2. adapt the threshold for the next update towards pruning N_p weights per update:
     H <- 2H if K < (1 - delta) N_p, H <- H/2 if K > (1 + delta) N_p, else unchanged
     (``delta``: the fractional tolerance, 0.1; N_p = ``np_target`` x the active weights);
  3. regrow K weights, layer l getting the share R_l / sum(R) of them (layers that kept more
     weights get more back), at uniformly random positions among the layer's inactive ones
     (a just-pruned position may be drawn again); new weights start at exactly 0.
* The optimizer state (momentum, Adam moments) of regrown weights is zeroed, so a new
  connection starts from scratch.

Where this differs from the reference and why:

* The reference turns the shares into counts approximately (via per-tensor target sparsities),
  so the total drifts by a few weights. Here the counts are integers by largest-remainder rounding
  (``allocate``), capped at each layer's free slots, summing to exactly K: the number of active
  weights, and the density, never change.
* N_p is a fraction of the active weights (``np_target``), not an absolute count: the reference
  code's default prunes 1% of all model parameters per update, which at its 90% sparsity is about
  10% of the active weights, the default here; the paper's absolute N_p values (e.g. 20,000 of
  WRN-28-2's ~150k active weights at 90% sparsity) are of the same order.
* The reference lengthens the period during training (x2 at epochs 40, 80, 120 and no updates
  after epoch 160 of 200 on CIFAR). Here the same happens at fractions of training:
  ``period_doublings`` ([0.2, 0.4, 0.6]) and ``end_fraction`` (0.8), so the schedule follows
  the run's length (``schedule.multiplier`` included); ``period_doublings: []`` and
  ``end_fraction: 1.0`` give a fixed period.
* If every weight of the network fell under H (sum(R) = 0), regrowth is spread over the layers in
  proportion to their free slots instead (the reference would divide by zero).
"""

from __future__ import annotations

import math

import torch

from ...errors import ConfigError
from ..distributions import allocate
from ..ops import mask_change_logs
from ..schedules import StepList, lengthening_steps
from .base import Method, ScheduledUpdates, cadence_from, register
from .dense import RandomInitMixin


def _number(cfg, key: str, default: float) -> float:
    try:
        value = float(cfg.get(key, default))
    except (TypeError, ValueError):
        raise ConfigError(f"method.{key}={cfg.get(key)} is not a number; pass e.g. method.{key}={default}") from None
    if not math.isfinite(value):
        raise ConfigError(f"method.{key}={value} must be finite; the default is {default}")
    return value


@register("dsr")
class DSR(ScheduledUpdates, RandomInitMixin, Method):
    """Global adaptive magnitude threshold; regrowth shared by the layers' surviving counts."""

    sparse_execution = True  # updates read |w| and the mask through dense views

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.threshold = _number(cfg, "init_threshold", 1e-3)
        if self.threshold <= 0:
            raise ConfigError(f"method.init_threshold={self.threshold} must be > 0; the paper uses 0.001")
        self.np_target = _number(cfg, "np_target", 0.1)
        if not 0.0 < self.np_target < 1.0:
            raise ConfigError(f"method.np_target={self.np_target} must be in (0, 1): a fraction of the active weights")
        self.delta = _number(cfg, "delta", 0.1)
        if not 0.0 <= self.delta < 1.0:
            raise ConfigError(f"method.delta={self.delta} must be in [0, 1); the paper uses 0.1")
        self.cadence = self._cadence(cfg, ctx)
        self.last_update: dict = {}

    @staticmethod
    def _cadence(cfg, ctx):
        every = cfg.get("update_every", 100)
        doublings = list(cfg.get("period_doublings", []) or [])
        end_fraction = float(cfg.get("end_fraction", 1.0))
        if not 0.0 < end_fraction <= 1.0 or any(not 0.0 <= float(d) <= 1.0 for d in doublings):
            raise ConfigError("method.end_fraction must be in (0, 1] and method.period_doublings fractions "
                              "of training in [0, 1], e.g. [0.2, 0.4, 0.6]")
        if str(every) == "epoch":
            if doublings:
                raise ConfigError("method.period_doublings needs a step interval: set method.update_every to "
                                  "a number of steps or method.period_doublings=[]")
            return cadence_from(cfg, ctx, "epoch", end=int(round(end_fraction * ctx.total_steps)))
        try:
            period = int(every)
            steps = lengthening_steps(period, ctx.total_steps,
                                      [round(float(d) * ctx.total_steps) for d in doublings],
                                      end=int(round(end_fraction * ctx.total_steps)))
        except (TypeError, ValueError):
            raise ConfigError("method.update_every must be 'epoch' or a positive number of steps") from None
        return StepList(steps)

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

    @torch.no_grad()
    def update(self, step: int) -> dict:
        masks = self.masks
        old = [m.clone() for m in masks.masks]
        weights = [p.data for p in masks.params]
        nnz = masks.nnz()
        h = self.threshold

        # 1. prune every active weight under the global threshold
        pruned = [m & (w.abs() < h) for w, m in zip(weights, old)]
        after = [m & ~d for m, d in zip(old, pruned)]
        removed = [int(c) for c in torch.stack([d.sum() for d in pruned]).cpu().tolist()]
        k_total = sum(removed)
        surviving = [k - r for k, r in zip(nnz, removed)]
        free = [n - s for n, s in zip(masks.numels, surviving)]

        # 2. adapt the threshold for the next update
        target = self.np_target * sum(nnz)
        self.threshold = self.adjust_threshold(h, k_total, target, self.delta)

        # 3. regrow exactly k_total, shared by the surviving counts, at random positions, at 0
        regrow = self.regrowth_counts(surviving, free, k_total)
        grown = self.grow_random(after, regrow)

        self.last_update = {
            "step": step,
            "threshold_used": h,
            "threshold_next": self.threshold,
            "removed": removed,
            "surviving": surviving,
            "regrow": regrow,
            "old_masks": old,
            "pruned": pruned,
            "grown": grown,
        }
        logs = {
            "dsr/threshold": self.threshold,
            "dsr/pruned": k_total,
            "dsr/np_target": target,
            **mask_change_logs(masks.names, old, masks.masks),
        }
        for name, g in zip(masks.names, regrow):
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
