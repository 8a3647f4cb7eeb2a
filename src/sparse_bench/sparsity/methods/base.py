"""The method interface the trainer calls, and the registry.

``@register("rigl", schema=RigLSchema)`` registers a method under its config name together with the
dataclass of its options (defined beside it in its module) into ``sparse_bench.schema``, which
checks the ``method`` group with it.

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

Each call goes through :func:`call_hook`, which runs the trainer's hooks around it: objects with
``before(name, *args)`` and ``after(name, logs, *args) -> logs`` (the execution engine,
``sparsity.execution.Execution``, is one: it converts layers after ``setup`` and keeps sparse
layers in step), so a method never sees them and they never stand in for the method.

Cost: ``step_passes(step)`` says what a training step computes (forward, input-gradient and
weight-gradient passes, each over the active weights or all of them) and ``update_cost(step)``
what a mask update adds on top; ``sparsity/flops.py`` turns that into FLOPs by RigL's
convention. A method overrides them next to its algorithm when it differs from the default
(every pass over the active weights; all dense for a method without masks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from omegaconf import OmegaConf
from torch import nn

from ... import schema as S
from ...confdir import option_values
from ...errors import ConfigError
from ...plugins import target_of
from ..flops import DENSE_STEP, SPARSE_STEP, Extra, Passes
from ..masks import MaskSet
from ..schedules import Timeline, UpdateCadence
from ..structure import Structure

#: method name -> class: every ``@register``-ed method (the registry ``sparse_bench.schema`` checks by)
METHODS: dict[str, type[Method]] = S.IMPLEMENTATIONS["method"]

log = logging.getLogger("sparse_bench")


def register(name: str, schema=None):
    """Class decorator: the method `name` (``method=name``), its options checked and typed by
    `schema` (a dataclass built with ``sparse_bench.schema``'s ``num``, ``count``, ``choice``, ...,
    defined beside the method). A user's method registered without one is checked by its class
    attribute ``schema`` when it has one, else its keys are its own business."""

    def deco(cls):
        cls.name = name
        S.register("method", name, cls, schema)
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
    # (n, key) -> n statistics batches (x, y): drawn from their own seeded stream for `key` (the
    # step), the same on resume, never touching the epoch in progress (DeviceLoader.draw)
    batches: Optional[Callable[[int, int], list]] = None
    loss_fn: Optional[Callable] = None
    multiplier: float = 1.0  # schedule.multiplier: scale every epoch-based milestone by it
    structure: Structure = field(default_factory=Structure)  # the shape masks keep (structure=)
    extra: dict = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def timeline(self) -> Timeline:
        """Milestones ({unit: fraction|epoch|step, value}) -> optimizer steps for this run."""
        return Timeline(self.epochs, self.steps_per_epoch, self.multiplier)


class Method:
    """Base class: holds the masks; subclasses override the hooks they need."""

    name = "base"
    sparse = True
    rounds = 1  # training schedules run back to back (iterative pruning runs several)
    #: execution=sparse/auto: True if the method runs with sparse layers (its per-step hooks use
    #: only MaskSet calls, and its updates dense views or index-level calls), else the one-line
    #: reason it runs masked
    sparse_execution: Union[bool, str] = "it does not declare that its hooks work on sparse layers"
    #: execution=sparse: the dense optimizer state (momentum) of inactive weights matters to the
    #: method, so the engine keeps it up to date from dense gradients (see wants_dense_grad)
    keeps_inactive_state = False
    #: execution=sparse: the method's setup or updates open dense views of sparse layers (so it
    #: cannot train a layer too big to hold densely); False for index-level-only methods (GSE)
    needs_dense_views = True
    #: its masks keep ``structure=nm|fan_in|block`` (drawn and regrown through ``sparsity.structure``)
    keeps_structure = False

    def wants_dense_grad(self, step: int) -> bool:
        """execution=sparse: must the backward of optimizer step `step` form the gradient of the
        whole dense weight of sparse layers (one dense GEMM per layer)? Only a method whose rule
        reads it says yes (RigL before an update, sparse momentum every step)."""
        return False

    def __init__(self, cfg, ctx: MethodContext):
        self.cfg = cfg
        self.ctx = ctx
        self.masks = MaskSet.from_model(ctx.model, ctx.prunable) if self.sparse else None
        self.structure = ctx.structure
        if self.structure.active:
            self._check_structure()
        # a method that draws per-layer counts from a distribution (`init`) refuses such a density
        # itself, with the distribution's own smallest usable density (distributions.layer_counts)
        if self.masks is not None and self.masks.floor > 0 and not cfg.get("init"):
            total, layers = sum(self.masks.numels), len(self.masks)
            if int(round(ctx.density * total)) < layers * self.masks.floor:
                # the run would have to empty a layer: refused at start, whatever the method
                raise ConfigError(f"density={ctx.density:g} keeps {int(round(ctx.density * total))} of {total} "
                                  f"prunable weights, fewer than one per prunable layer ({layers}); use density >= "
                                  f"{layers / total:.3g}, or prunable.allow_empty=true to let a layer empty")

    def _check_structure(self) -> None:
        if not self.keeps_structure:
            keepers = sorted(n for n, impl in S.IMPLEMENTATIONS["method"].items()
                             if getattr(impl, "keeps_structure", False))
            raise ConfigError(f"structure={self.structure.kind}: method={self.name} does not keep a structure; use "
                              f"structure=unstructured, or one of method={', '.join(keepers)}")
        self.structure.check(self.masks.names, self.masks.shapes, self.ctx.density)
        self.masks.structure = self.structure

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

    # --- cost (sparsity/flops.py counts it) ----------------------------------------------------
    def step_passes(self, step: int) -> Passes:
        """The passes training step `step` (0-based, as `before_optimizer_step`) runs."""
        return SPARSE_STEP if self.masks is not None else DENSE_STEP

    def update_cost(self, step: int) -> list[Extra]:
        """Passes a mask update after `step` steps ran beyond the training step (none by default;
        RigL's convention leaves the drop/grow bookkeeping itself uncounted)."""
        return []

    def weight_set(self, name: str) -> list[float]:
        """Per-layer densities of a weight set this method names in `step_passes`."""
        raise KeyError(f"method={self.name} names no weight set '{name}'")

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


def call_hook(method: Method, hooks, name: str, *args):
    """The method's hook `name` with `args`, each of the trainer's `hooks` run before and after it
    (``hook.before(name, *args)``, ``logs = hook.after(name, logs, *args)``); returns the logs."""
    for hook in hooks:
        hook.before(name, *args)
    logs = getattr(method, name)(*args)
    for hook in hooks:
        logs = hook.after(name, logs, *args)
    return logs


def update_interval(cfg, ctx: MethodContext):
    """`method.update_every` (its form checked by the schema): 'epoch', a number of steps, or a
    period schedule ``{unit, points: [[at, steps], ...]}`` (DSR's reallocation periods) in steps."""
    every = cfg.update_every
    if OmegaConf.is_config(every) or isinstance(every, dict):
        return ctx.timeline.piecewise(every, "method.update_every", cast=int)
    return every


def end_step(cfg, ctx: MethodContext, key: str = "end") -> int:
    """`method.<key>`: the milestone from which a method stops changing its masks (null: the end
    of training)."""
    step = ctx.timeline.step(cfg.get(key), f"method.{key}", allow_none=True)
    return ctx.total_steps if step is None else step


def cadence_from(cfg, ctx: MethodContext, warn: bool = True) -> UpdateCadence:
    """The update cadence from `method.update_every` and the end milestone `method.end`; with
    `warn`, one warning line when no update can happen in this run."""
    cadence = UpdateCadence(update_interval(cfg, ctx), ctx.total_steps, end=end_step(cfg, ctx))
    if warn:
        warn_if_never_updated(cadence, ctx)
    return cadence


def warn_if_never_updated(cadence: UpdateCadence, ctx: MethodContext) -> str | None:
    """Log (and return) one warning line when `cadence` has no update in this run: an update
    interval longer than the steps before the method stops updating. Legal, but the run then
    trains a static mask, which is almost surely not what was meant."""
    if cadence.first_update(ctx.steps_per_epoch, ctx.epochs) is not None:
        return None
    if cadence.per_epoch:
        every = "epoch (after every epoch but the last)"
    elif cadence.schedule is not None:
        every = f"a period schedule starting at {cadence.period(1)} steps"
    else:
        every = f"{cadence.every} steps"
    until = (f"method.end (step {cadence.end})" if cadence.end < ctx.total_steps
             else f"the end of the run (step {ctx.total_steps})")
    line = (f"method.update_every={every}: no mask update comes before {until} of the {ctx.epochs}-epoch run of "
            f"{ctx.total_steps} steps, so the masks never change; lower method.update_every"
            + (" or move method.end later" if cadence.end < ctx.total_steps else " or lengthen schedule.epochs"))
    log.warning(line)
    return line


class ScheduledUpdates:
    """Mixin: a mask update, `self.update(step)`, whenever `self.cadence` says so."""

    cadence: UpdateCadence

    def update(self, step: int) -> dict:  # pragma: no cover - every user overrides it
        raise NotImplementedError

    def on_step_end(self, step):
        return self.update(step) if self.cadence.at_step(step) else None

    def on_epoch_end(self, epoch, step):
        return self.update(step) if self.cadence.at_epoch_end(epoch, self.ctx.epochs, step) else None


def _with_builtin_defaults(cls, cfg):
    """A user's method without a schema: its config as given, over the values of the built-in
    method it extends (if any; its YAML), unchecked."""
    for k in cls.__mro__:
        name = k.__dict__.get("name")
        if name in S.METHODS and METHODS.get(name) is k:
            return OmegaConf.merge(option_values("method", name) or {}, cfg)
    return cfg


def build_method(cfg, ctx: MethodContext) -> Method:
    """The method `cfg` (the ``method`` group) names, its options checked and typed by its schema
    (registered beside it by ``@register``), so a direct call gets the checks a run gets. A user's
    method (``_target_``, or ``@register``-ed without a schema) is checked with its ``schema``
    attribute when it has one; otherwise it gets its config as given over the defaults of the
    built-in it extends."""
    cls = target_of(cfg, "method")  # a user's method, named by method._target_
    if cls is not None:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise ConfigError(f"method._target_={cfg._target_} is not a subclass of sparse_bench's Method")
    else:
        name = cfg.get("name")
        if name not in METHODS:
            raise ConfigError(f"method={name} is unknown; choose one of: {', '.join(sorted(METHODS))}")
        cls = METHODS[name]
    if S.schema_for("method", cfg) is None:
        return cls(_with_builtin_defaults(cls, cfg), ctx)
    return cls(S.check_option("method", cfg), ctx)
