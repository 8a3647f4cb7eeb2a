"""Lottery tickets: iterative magnitude pruning with rewinding (Frankle & Carbin 2019;
Frankle, Dziugaite, Roy & Carbin 2020, "Linear mode connectivity and the lottery ticket
hypothesis"; facebookresearch/open_lth).

What the papers and open_lth do, step by step:

1. Level 0: train the dense network for the full schedule, saving the weights at the rewind
   point: initialisation (Frankle & Carbin 2019) or an early iteration k (rewinding, 2020).
2. At the end of each level, prune a fixed fraction (20%) of the REMAINING weights with the
   smallest magnitude, ranked over all prunable layers at once (open_lth ``sparse_global``;
   Frankle & Carbin 2019 prune layer by layer).
3. Rewind: reset every weight (prunable or not, including biases, BN parameters and BN running
   statistics, i.e. the whole state dict) to the rewind checkpoint, apply the new mask (pruned
   weights are 0 and stay 0).
4. Train again with a NEW optimizer (no momentum carried over) and the full LR schedule.
5. Repeat until the target sparsity; report the last level.

This module runs all levels inside ONE run (``rounds`` = prune steps + 1 training schedules
back to back; the trainer runs ctx.epochs epochs per round and restarts the LR schedule every
round through ``Method.schedule_step``):

* Density sequence: ``densities`` (an explicit list of the levels after the dense round, which
  must contain the run's density; the levels below it are not trained, so one list serves every
  density of a sweep) or a geometric sequence from 1.0 to ``density`` in ``n_rounds`` prune
  steps, d_r = density^(r / n_rounds).
  With ``n_rounds: null`` the number of steps is the fewest for which every step keeps at
  least ``keep_per_round`` (0.8) of the previous density, n = ceil(log(density) /
  log(keep_per_round)); when density is a power of keep_per_round this is exactly "prune 20% of
  what remains" every round. The count after round r is round(d_r * total) (exact), the last
  is exactly round(density * total).
* Rewind checkpoint: the model's state dict at ``rewind_epoch`` (epochs of the base schedule,
  times ``schedule.multiplier``; 0 = initialisation, taken in ``setup``; otherwise after the
  optimizer step that completes that point of round 1, rounded to whole steps).
* At the end of every round but the last (epoch % ctx.epochs == 0): keep the round(d_r * total)
  currently active weights of largest |w| (``scope: global``, or ``layer``: every layer at the
  same density), load the rewind state dict into the model (parameters and buffers), apply the
  new mask, and clear the optimizer state (a fresh optimizer: SGD's first step after the
  boundary starts its momentum buffer from that step's gradient, Adam restarts its step count).
  Logs: ``lottery/round`` (the round that starts), ``lottery/target_density`` and the mask
  change logs (``mask/pruned`` ...).
* The state dict holds the masks, the round, the density sequence and the rewind weights, so a
  run killed at any epoch resumes bit-identically.
* ``reinit: fan_in`` re-initialises the dense model by its fan-in before the rewind point is
  taken (GSE's ``sparsify(model, 0.0, "uniform")``), so every round rewinds to those weights.

The lottery ticket as GSE's comparison runs it (``lottery_training.py``): prune by global
magnitude through the sparsities [0, 0.5, 0.75, 0.9, 0.95, 0.98] (``densities: [0.5, 0.25, 0.1,
0.05, 0.02]``: six trainings of 200 epochs at 98%, four at 90%), each level rewound to the
initialisation (``rewind_epoch: 0``) with a new optimizer and the full LR schedule, the dense model
re-initialised by fan-in first (``reinit: fan_in``).

Differences from open_lth: with rewinding to step k > 0, open_lth trains each later level from
step k to the end of the schedule (T - k steps, the LR schedule and data order resuming at k);
here every round is a full schedule of ctx.epochs epochs with the LR schedule restarted at step
0, because the trainer runs equal rounds. Frankle & Carbin's (2019) per-layer rates (e.g. the
output layer pruned at half the rate) are not modelled: ``scope: layer`` uses one density for
all layers. open_lth rounds each step's count up (ceil of 20% of the remaining); here counts
come from the density sequence, so the final density is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
from omegaconf import MISSING

from ... import schema as S
from ...errors import ConfigError
from ..ops import mask_change_logs
from ..reinit import reinit_
from ..saliency import keep_top
from .base import Method, register
from .schemas import fraction, reinit, scope


def _check_non_increasing(value, key: str) -> None:
    if value is not None and any(b > a for a, b in zip(value, value[1:])):
        raise ConfigError(f"{key}={list(value)} must not increase: each level is at most as dense as the one "
                          f"before")


@dataclass
class LotterySchema:
    """The options of ``method=lottery`` (their values: ``conf/method/lottery.yaml``)."""

    name: str = MISSING
    densities: Optional[List[float]] = S.numbers(items_gt=0.0, items_le=1.0, check=_check_non_increasing,
                                                 hint="non-increasing densities in (0, 1], e.g. [0.5, 0.25, 0.1]")
    n_rounds: Optional[int] = S.count(ge=1, nullable=True, hint="a number of prune steps, or null")
    keep_per_round: float = fraction(open_low=True, hint="the papers keep 0.8 (prune 20%)")
    scope: str = scope()
    rewind_epoch: float = S.num(ge=0.0, hint="0 rewinds to the initialisation")
    reinit: str = reinit()


@register("lottery", schema=LotterySchema)
class Lottery(Method):
    keeps_structure = True  # every round's pruning goes through keep_top with the structure
    sparse_execution = "its first round trains the dense network"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.scope = cfg.scope
        self.reinit = cfg.reinit
        self.densities = self._density_sequence()
        self.rounds = len(self.densities) + 1
        rewind_epoch = cfg.rewind_epoch
        self.rewind_step = int(round(rewind_epoch * ctx.multiplier * ctx.steps_per_epoch))
        if self.rounds > 1 and self.rewind_step >= ctx.total_steps:  # needs the run's length: checked here
            raise ConfigError(f"method.rewind_epoch={rewind_epoch} must lie in [0, schedule.epochs) "
                              f"(it is a point early in round 1; 0 rewinds to the initialisation)")
        self.round = 1
        self.rewind_state: dict | None = None

    def _density_sequence(self) -> list[float]:
        d = float(self.ctx.density)
        explicit = self.cfg.densities  # non-increasing, in (0, 1]: the schema checked it
        if explicit is not None:
            seq = [float(x) for x in explicit]
            hit = [i for i, x in enumerate(seq) if abs(x - d) <= 1e-9]
            if not hit:
                raise ConfigError(f"method.densities={seq} does not contain the run's density {d}; add it to the "
                                  f"list or pick density from it")
            seq = seq[:hit[0] + 1]
            seq[-1] = d
            return seq
        n = self.cfg.n_rounds
        if n is None:
            keep = self.cfg.keep_per_round
            n = 0 if d >= 1.0 else max(1, math.ceil(math.log(d) / math.log(keep) - 1e-9))
        seq = [d ** (r / n) for r in range(1, n + 1)]
        if seq:
            seq[-1] = d
        return seq

    # --- life cycle -------------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {k: v.detach().clone() for k, v in self.ctx.model.state_dict().items()}

    def setup(self):
        self.masks.set_masks([torch.ones_like(m) for m in self.masks.masks])
        # the dense model (all-ones masks): fan_in by its dense fan-in (GSE's baselines)
        reinit_(self.reinit, self.ctx.model, self.masks.names, [p.data for p in self.masks.params],
                self.masks.masks, self.ctx.generator)
        self.round = 1
        if self.rewind_step == 0:
            self.rewind_state = self.snapshot()
        return {"lottery/rounds": self.rounds, "lottery/densities": [round(x, 6) for x in self.densities],
                "lottery/rewind_step": self.rewind_step}

    def on_step_end(self, step):
        if self.rewind_state is None and step == self.rewind_step:
            self.rewind_state = self.snapshot()
        return None

    def target_count(self, density: float) -> int:
        return int(round(density * sum(self.masks.numels)))

    def on_epoch_end(self, epoch, step):
        done, rest = divmod(epoch, self.ctx.epochs)
        if rest != 0 or done >= self.rounds:
            return None
        return self.next_round(done)

    @torch.no_grad()
    def next_round(self, done: int) -> dict:
        """Prune after round `done` (1-based), rewind, apply the mask, reset the optimizer."""
        if self.rewind_state is None:
            raise RuntimeError("lottery: no rewind checkpoint was saved before the end of round 1")
        target = self.densities[done - 1]
        old = [m.clone() for m in self.masks.masks]
        n_keep = min(self.target_count(target), sum(int(m.sum()) for m in old))
        new = keep_top([p.detach().abs() for p in self.masks.params], n_keep, self.scope, active=old,
                       floor=self.masks.floor, structure=self.structure)
        self.ctx.model.load_state_dict(self.rewind_state)
        self.masks.set_masks(new)
        self.ctx.optimizer.state.clear()
        self.ctx.optimizer.zero_grad(set_to_none=True)
        self.round = done + 1
        return {"lottery/round": self.round, "lottery/target_density": target,
                **mask_change_logs(self.masks.names, old, self.masks.masks)}

    # --- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["lottery"] = {"round": self.round, "densities": list(self.densities),
                            "rewind_step": self.rewind_step, "rewind": self.rewind_state}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        lot = state["lottery"]
        if [float(x) for x in lot["densities"]] != self.densities or int(lot["rewind_step"]) != self.rewind_step:
            raise ValueError("lottery: the checkpoint was made with another density sequence or rewind point")
        self.round = int(lot["round"])
        self.rewind_state = lot["rewind"]
