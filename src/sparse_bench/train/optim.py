"""Optimizers and learning-rate schedules.

The LR is a pure function of the optimizer-step counter (`lr_at`), set on every step, so a
resumed run continues the schedule exactly with no scheduler state to restore. Both builders
check their group (``optimizer``, ``schedule``) with its schema (``sparse_bench.schema``) first,
so a direct call gets a run's checks and the YAML's defaults.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..errors import ConfigError
from ..schema import check_option

log = logging.getLogger("sparse_bench")


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """SGD, Adam or AdamW from the ``optimizer`` group (sgd | adam | adamw, checked by the schema),
    stepping all parameters with grouped (foreach) kernels, not a Python loop over them."""
    cfg = check_option("optimizer", cfg)
    params = model.parameters()
    if cfg.name == "sgd":
        if cfg.nesterov and cfg.momentum == 0:  # two keys: checked here
            raise ConfigError("optimizer.nesterov=true needs optimizer.momentum > 0; set optimizer.momentum=0.9 "
                              "or optimizer.nesterov=false")
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, foreach=True)
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, foreach=True)


class LRSchedule:
    """LR at a given step: optional linear warm-up, then step / multistep / cosine / constant.

    ``step``: multiply by ``gamma`` every ``step_size`` iterations (sparse momentum's MNIST recipe).
    ``multistep``: multiply by ``gamma`` at each epoch in ``milestones``.
    ``cosine``: cosine from the base LR to ``min_lr`` over the steps after warm-up.

    ``multiplier`` (schedule.multiplier) stretches the schedule: `epochs` is already multiplied;
    milestones and the step interval are multiplied here. The warm-up is not stretched.
    """

    def __init__(self, cfg, base_lr: float, steps_per_epoch: int, epochs: int, multiplier: float = 1.0):
        cfg = check_option("schedule", cfg)
        lr_cfg = cfg.lr
        self.kind = lr_cfg.kind
        self.base = base_lr
        self.spe = steps_per_epoch
        self.total = steps_per_epoch * epochs
        self.warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
        self.gamma = lr_cfg.gamma
        self.step_size = int(round(lr_cfg.step_size * multiplier))
        if self.kind == "step" and self.step_size <= 0:  # two keys: checked here
            raise ConfigError("schedule.lr.step_size must be a positive number of iterations for kind=step")
        self.milestones = [int(round(m * multiplier * steps_per_epoch)) for m in lr_cfg.milestones]
        self.min_lr = lr_cfg.min_lr
        for warning in self.warnings():
            log.warning(warning)

    def warnings(self) -> list[str]:
        """Settings that are legal but almost surely a mistake (milestones the run never reaches)."""
        out = []
        if self.kind == "multistep":
            late = [m for m in self.milestones if m >= self.total]
            if late:
                out.append(f"schedule.lr.milestones: {len(late)} of the LR drops come at or after the last "
                           f"step ({self.total}), so they never happen; scale them to schedule.epochs")
        if self.kind == "step" and self.step_size >= self.total:
            out.append(f"schedule.lr.step_size={self.step_size} iterations is not shorter than the run "
                       f"({self.total} steps), so the LR never drops")
        if self.warmup >= self.total > 0:
            out.append(f"schedule.warmup_epochs covers the whole run ({self.total} steps); the LR never "
                       f"reaches its base value after warm-up")
        return out

    def __call__(self, step: int) -> float:
        """LR used for optimizer step number `step` (0-based)."""
        if step < self.warmup:
            return self.base * (step + 1) / self.warmup
        if self.kind == "step":
            return self.base * self.gamma ** (step // self.step_size)
        if self.kind == "multistep":
            return self.base * self.gamma ** sum(step >= m for m in self.milestones)
        if self.kind == "cosine":
            span = max(self.total - self.warmup, 1)
            frac = min((step - self.warmup) / span, 1.0)
            return self.min_lr + (self.base - self.min_lr) * (1 + math.cos(math.pi * frac)) / 2
        return self.base


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
