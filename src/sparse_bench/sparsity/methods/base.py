"""The method interface the trainer calls, and the registry.

A method owns a MaskSet and decides when and how masks change. It knows nothing about data
loading or logging: every hook returns a dict of metrics (or None) for the trainer to log.

The trainer calls, per optimizer step::

    method.before_forward(step)
    loss = loss_fn(model(x), y); loss.backward()
    method.before_optimizer_step(step)
    optimizer.step()
    method.after_optimizer_step(step)      # re-apply masks
    logs = method.on_step_end(step)        # step-cadence mask updates

and after each epoch ``method.on_epoch_end(epoch, step)``. ``setup()`` runs once on a fresh
run (not on resume) to draw the initial masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ...errors import ConfigError
from ..masks import MaskSet
from ..ops import random_inactive
from ..schedules import UpdateCadence

METHODS: dict[str, type["Method"]] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


@dataclass
class MethodContext:
    """What a method may use: the model, its optimizer, the schedule's length, a seeded RNG."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    density: float
    epochs: int  # epochs of one training schedule, after schedule.multiplier
    steps_per_epoch: int
    device: torch.device
    generator: torch.Generator  # CPU generator owned by the method (saved in its state)
    prunable: Any = None  # the prunable rule (types/exclude/include)
    batches: Callable[[int], list] | None = None  # n -> list of (x, y) training batches
    loss_fn: Callable | None = None
    multiplier: float = 1.0  # schedule.multiplier: scale every epoch-based milestone by it
    extra: dict = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


class Method:
    """Base class: holds the masks; subclasses override the hooks they need."""

    name = "base"
    sparse = True
    rounds = 1  # training schedules run back to back (iterative pruning runs several)
    #: execution=sparse/auto: True if the method runs with sparse layers (its per-step hooks use
    #: only MaskSet calls, and its updates dense views or index-level calls), else the one-line
    #: reason it runs masked
    sparse_execution: bool | str = "it does not declare that its hooks work on sparse layers"
    #: execution=sparse: the dense optimizer state (momentum) of inactive weights matters to the
    #: method, so the engine keeps it up to date from dense gradients (see wants_dense_grad)
    keeps_inactive_state = False
    #: execution=sparse: the method's setup or updates open dense views of sparse layers (so it
    #: cannot train a layer too big to hold densely); False for index-level-only methods (GSE)
    needs_dense_views = True

    def wants_dense_grad(self, step: int) -> bool:
        """execution=sparse: must the backward of optimizer step `step` form the gradient of the
        whole dense weight of sparse layers (one dense GEMM per layer)? Only a method whose rule
        reads it says yes (RigL before an update, sparse momentum every step)."""
        return False

    def __init__(self, cfg, ctx: MethodContext):
        self.cfg = cfg
        self.ctx = ctx
        self.masks = MaskSet.from_model(ctx.model, ctx.prunable) if self.sparse else None

    # --- life cycle -------------------------------------------------------------------------
    def setup(self) -> dict | None:
        """Draw the initial masks (fresh runs only)."""
        return None

    def before_forward(self, step: int) -> None:
        """Called before each training forward pass (e.g. Top-KAST swaps in its forward set)."""

    def before_optimizer_step(self, step: int) -> None:
        """Called after backward, before the optimizer step (gradients are available)."""

    def after_optimizer_step(self, step: int) -> None:
        if self.masks is not None:
            self.masks.apply_()

    def on_step_end(self, step: int) -> dict | None:
        return None

    def on_epoch_end(self, epoch: int, step: int) -> dict | None:
        return None

    def schedule_step(self, step: int) -> int:
        """The step the LR schedule sees: it restarts every round (one round by default)."""
        return step % self.ctx.total_steps if self.rounds > 1 else step

    # --- helpers ----------------------------------------------------------------------------
    def optimizer_momentum(self, param: torch.Tensor) -> torch.Tensor | None:
        """The optimizer's first-moment estimate for `param` (SGD momentum, or Adam's m/sqrt(v))."""
        state = self.ctx.optimizer.state.get(param, {})
        if "exp_avg" in state:
            return state["exp_avg"] / (state["exp_avg_sq"].sqrt() + 1e-8)
        if "momentum_buffer" in state and state["momentum_buffer"] is not None:
            return state["momentum_buffer"]
        return None

    @torch.no_grad()
    def commit_masks(self, new: list[torch.Tensor], grown: list[torch.Tensor]) -> None:
        """Install `new` masks: grown weights start at exactly 0 with zeroed optimizer state."""
        for i, (p, g) in enumerate(zip(self.masks.params, grown)):
            self.masks.masks[i] = new[i]
            p.data.masked_fill_(g, 0.0)
        self.masks.apply_()
        self.reset_optimizer_state(grown)

    @torch.no_grad()
    def grow_random(self, after: list[torch.Tensor], counts: list[int]) -> list[torch.Tensor]:
        """Grow `counts[l]` random inactive positions per layer on top of `after`, commit them
        (at 0, optimizer state zeroed) and return the grown positions."""
        grown = [random_inactive(m, k, self.ctx.generator) for m, k in zip(after, counts)]
        self.commit_masks([a | g for a, g in zip(after, grown)], grown)
        return grown

    @torch.no_grad()
    def reset_optimizer_state(self, positions: list[torch.Tensor]) -> None:
        """Zero the optimizer's per-weight state (momentum, Adam moments) at `positions`.

        `positions` holds one bool tensor per prunable parameter (e.g. the weights just grown).
        """
        for p, where in zip(self.masks.params, positions):
            for value in self.ctx.optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    value.masked_fill_(where, 0)

    def density_logs(self) -> dict:
        if self.masks is None:
            return {"density/achieved": 1.0}
        nnz, numels = self.masks.nnz(), self.masks.numels
        logs = {"density/achieved": sum(nnz) / sum(numels)}
        for n, k, m in zip(self.masks.names, nnz, numels):
            logs[f"density/{n}"] = k / m
        return logs

    def state_dict(self) -> dict:
        return {
            "masks": self.masks.state_dict() if self.masks is not None else None,
            "generator": self.ctx.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if self.masks is not None and state.get("masks") is not None:
            self.masks.load_state_dict(state["masks"])
            self.masks.apply_()
        # a checkpoint loaded with map_location=cuda carries the CPU generator's state on the GPU
        self.ctx.generator.set_state(state["generator"].cpu())


def cadence_from(cfg, ctx: MethodContext, default, end: int | None = None) -> UpdateCadence:
    """The update cadence from `method.update_every` ('epoch' or a number of steps)."""
    try:
        return UpdateCadence(cfg.get("update_every", default), ctx.total_steps, end=end)
    except (TypeError, ValueError):
        raise ConfigError("method.update_every must be 'epoch' or a positive number of steps") from None


class ScheduledUpdates:
    """Mixin: a mask update, `self.update(step)`, whenever `self.cadence` says so."""

    cadence: UpdateCadence

    def update(self, step: int) -> dict:  # pragma: no cover - every user overrides it
        raise NotImplementedError

    def on_step_end(self, step):
        return self.update(step) if self.cadence.at_step(step) else None

    def on_epoch_end(self, epoch, step):
        return self.update(step) if self.cadence.at_epoch_end(epoch, self.ctx.epochs, step) else None


def build_method(cfg, ctx: MethodContext) -> Method:
    name = cfg.name
    if name not in METHODS:
        raise ConfigError(f"method={name} is unknown; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name](cfg, ctx)
