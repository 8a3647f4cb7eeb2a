"""Optimizers and learning-rate schedules.

The LR is a pure function of the optimizer-step counter (`lr_at`), set on every step, so a
resumed run continues the schedule exactly with no scheduler state to restore.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_KINDS = ("step", "multistep", "cosine", "constant")

log = logging.getLogger("sparse_bench")


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    name = str(cfg.name)
    lr = float(cfg.lr)
    wd = float(cfg.get("weight_decay", 0.0))
    params = model.parameters()
    if name == "sgd":
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=float(cfg.get("momentum", 0.9)),
            nesterov=bool(cfg.get("nesterov", False)),
            weight_decay=wd,
        )
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, betas=tuple(cfg.get("betas", (0.9, 0.999))), weight_decay=wd)
    raise ConfigError(f"optimizer={name} is unknown; choose one of: {', '.join(OPTIMIZERS)}")


class LRSchedule:
    """LR at a given step: optional linear warm-up, then step / multistep / cosine / constant.

    ``step``: multiply by ``gamma`` every ``step_size`` iterations (sparse momentum's MNIST recipe).
    ``multistep``: multiply by ``gamma`` at each epoch in ``milestones``.
    ``cosine``: cosine from the base LR to ``min_lr`` over the steps after warm-up.

    ``multiplier`` (schedule.multiplier) stretches the schedule: `epochs` is already multiplied;
    milestones and the step interval are multiplied here. The warm-up is not stretched.
    """

    def __init__(self, cfg, base_lr: float, steps_per_epoch: int, epochs: int, multiplier: float = 1.0):
        lr_cfg = cfg.lr
        self.kind = str(lr_cfg.kind)
        if self.kind not in LR_KINDS:
            raise ConfigError(f"schedule.lr.kind={self.kind} is unknown; choose one of: {', '.join(LR_KINDS)}")
        self.base = base_lr
        self.spe = steps_per_epoch
        self.total = steps_per_epoch * epochs
        self.warmup = int(round(float(cfg.get("warmup_epochs", 0)) * steps_per_epoch))
        self.gamma = float(lr_cfg.get("gamma", 0.1))
        self.step_size = int(round(int(lr_cfg.get("step_size", 0) or 0) * multiplier))
        if self.kind == "step" and self.step_size <= 0:
            raise ConfigError("schedule.lr.step_size must be a positive number of iterations for kind=step")
        self.milestones = [int(round(float(m) * multiplier * steps_per_epoch))
                           for m in lr_cfg.get("milestones", []) or []]
        self.min_lr = float(lr_cfg.get("min_lr", 0.0))
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
