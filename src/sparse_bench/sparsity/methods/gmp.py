"""Gradual magnitude pruning (GMP; Zhu & Gupta 2017, "To prune, or not to prune").

What the references do (Zhu & Gupta's TensorFlow pruning library; the magnitude pruners of
IST-DASLab's AC/DC / WoodFisher code that Kuznedelev et al. build on), step by step:

* Training starts dense: every mask is all True.
* Pruning events happen every ``f`` epochs (or steps) from ``t0`` to ``t1``. At an event at time
  ``t`` the target sparsity is the cubic schedule
  ``s(t) = s_f - (s_f - s_i) (1 - (t - t0) / (t1 - t0))^3`` (``s_f = 1 - density``).
* At an event the weights are ranked by magnitude among the weights still active (the reference
  scores ``(|w| + 1e-4) * mask``, so pruned weights always rank last) and the smallest are
  dropped until the sparsity is ``s(t)``: either with one threshold over all prunable weights
  (``scope: global``, the reference's ``UnstructuredMagnitudePruner``) or layer by layer
  (``scope: layer``, its ``MagnitudePruner``). Pruned weights never come back.
* Between events the masks are applied to the gradients (the reference's gradient hooks) and to
  the weights after every optimizer step. Momentum is left alone: pruned weights never return,
  so their (masked, decaying) momentum has no effect.

Options (``conf/method/gmp.yaml`` in the package): ``start``, ``end`` and ``frequency`` are
milestones (``{unit: fraction|epoch|step, value}``, see ``sparsity/schedules.py``); events fall
after the optimizer step ``start, start + frequency, ... < end`` and ``end``. Defaults: from
10% to 80% of the run every 2% (10..80 of a 100-epoch ImageNet ResNet-50 run every 2 epochs, the
common GMP recipe; STR's GMP uses 20-79), initial sparsity 0, ``curve: polynomial`` with power 3
(cubic), global scope. ``curve: cosine`` ramps the sparsity as
``s_f + (s_i - s_f) (1 + cos(pi progress)) / 2``. ``reinit: fan_in`` re-initialises the dense
model by its fan-in before training (GSE's ``sparsify(model, 0.0, "uniform")``).

GMP as GSE's comparison runs it (``gradual_sparse_training.py --prune magnitude``): the dense
model re-initialised by fan-in, then every 1000 steps (``frequency: {unit: step, value: 1000}``)
from step 0 to epoch 120 (``start: {unit: epoch, value: 0}``, ``end: {unit: epoch, value: 120}``)
global magnitude pruning to ``s_f (1 - cos(pi t / T)) / 2`` (``curve: cosine``). Its pruning
window ends at T = 120 x len(train_loader) = 120 x 390 = 46,800 (its loader drops the last partial
batch: ``dataset.drop_last: true``), and its last event is the last step index of the form 1000k - 1
at or before T (45,999), where the cosine has not quite reached s_f (density about 0.0207 at 98%);
here ``end`` is always an event, so the run ends at the target density exactly.

Where this implementation differs from the references, and why:

* Counts are exact: after an event the number of active weights is ``round((1 - s(t)) * N)``
  (global) or, for ``scope: layer``, every layer keeps ``(1 - s(t)) * n_l`` weights rounded by
  largest remainder so the total is the same exact number (the reference thresholds at a
  percentile, so ties and rounding move the count by a few weights). The final event uses the
  run's ``density`` directly, so the run ends at ``round(density * N)`` active weights.
* ``t1`` is always an event, even when ``f`` does not divide ``t1 - t0`` (the reference's
  ``range(t0, t1, f)`` then stops short of ``s_f``).
* Events fall after optimizer step ``t`` (an epoch milestone is the last step of that epoch, so
  the event runs before that epoch's evaluation); an event at ``t = 0`` (``start`` at 0) runs in
  ``setup()`` on the initial weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import MISSING

from ... import schema as S
from ...errors import ConfigError
from ..distributions import allocate
from ..ops import guard_layers, lifted, mask_change_logs, smallest_active
from ..pruning_schedules import gmp_events, gmp_sparsity
from ..reinit import reinit_
from .base import Method, register
from .schemas import Milestone, fraction, reinit, scope


def layer_counts_like(numels: list[int], caps: list[int], keep: int) -> list[int]:
    """Per-layer counts at one common density ``keep / sum(numels)``, each <= its cap, summing to `keep`.

    Largest-remainder rounding: every layer is within one weight of ``density * n_l`` unless its
    cap binds (a cap is a layer's current active count, so pruned weights never return).
    """
    frac = keep / sum(numels)
    return allocate([frac * n for n in numels], list(caps), keep)


@torch.no_grad()
def magnitude_masks(weights: list[torch.Tensor], masks: list[torch.Tensor], keep: int, scope: str,
                    floor: int = 1, structure=None) -> list[torch.Tensor]:
    """New masks keeping the `keep` active weights of largest |w| (one threshold, or per layer),
    never fewer than `floor` in a layer (``MaskSet.floor``); under a `structure` then made
    structured (``Structure.keep``).

    Only active weights (mask True) can be kept: the result is a subset of `masks`.
    """
    if structure is not None and structure.active:
        chosen = magnitude_masks(weights, masks, keep, scope, floor)
        return structure.keep([w.detach().abs() for w in weights], masks, chosen,
                              keep / sum(m.numel() for m in masks))
    active = [int(m.sum()) for m in masks]
    keep = min(int(keep), sum(active))
    if scope == "global":
        numels = [m.numel() for m in masks]
        flat_w = torch.cat([w.flatten() for w in guard_layers([w.detach().abs() for w in weights], masks, floor)])
        flat_m = torch.cat([m.flatten() for m in masks])
        dead = smallest_active(flat_w, flat_m, sum(active) - keep)
        kept = flat_m & ~dead
        return [k.view_as(m) for k, m in zip(torch.split(kept, numels), masks)]
    counts = lifted(layer_counts_like([m.numel() for m in masks], active, keep), active, floor)
    return [m & ~smallest_active(w.detach().abs(), m, a - c) for w, m, a, c in zip(weights, masks, active, counts)]


def mask_gradients(masks) -> None:
    """Zero the gradients of inactive weights (one grouped multiply by float masks, no host sync)."""
    masks.mask_grads_()


@dataclass
class GMPSchema:
    """The options of ``method=gmp`` (their values: ``conf/method/gmp.yaml``)."""

    name: str = MISSING
    start: Milestone = MISSING
    end: Milestone = MISSING
    frequency: Milestone = MISSING
    initial_sparsity: float = fraction()
    curve: str = S.choice(("polynomial", "cosine"))
    power: float = S.num(gt=0.0, hint="Zhu & Gupta use 3 (cubic)")
    scope: str = scope()
    reinit: str = reinit()


@register("gmp", schema=GMPSchema)
class GMP(Method):
    """Gradual magnitude pruning from dense to `density` on Zhu & Gupta's cubic schedule."""

    keeps_structure = True  # every pruning step keeps it (N:M reaches n per group at the final density)
    sparse_execution = "it starts dense and prunes gradually, so its weights are dense for much of training"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.scope = cfg.scope
        self.curve = cfg.curve
        self.reinit = cfg.reinit
        self.final_sparsity = 1.0 - float(ctx.density)
        self.initial_sparsity = cfg.initial_sparsity
        if self.initial_sparsity > self.final_sparsity:  # needs the density: checked here
            raise ConfigError(f"method.initial_sparsity={self.initial_sparsity} must be in [0, 1 - density = "
                              f"{self.final_sparsity:g}]; the paper starts at 0")
        self.power = cfg.power
        tl = ctx.timeline
        t0 = tl.step(cfg.start, "method.start")
        t1 = tl.step(cfg.end, "method.end")
        if t1 < t0:
            raise ConfigError(f"method.end (step {t1}) comes before method.start (step {t0}); set end >= start")
        self.frequency = tl.length(cfg.frequency, "method.frequency", minimum=1)
        self.start, self.end = t0, t1
        self.events = gmp_events(t0, t1, self.frequency)
        self._events = frozenset(self.events)
        self.pruned = False  # any mask entry False yet (masks start dense)
        self.last_event: int | None = None
        self.last_target = 1.0

    # --- schedule -----------------------------------------------------------------------------
    def sparsity_at(self, t: int) -> float:
        return gmp_sparsity(t, self.start, self.end, self.initial_sparsity, self.final_sparsity, self.power,
                            self.curve)

    def target_count(self, t: int) -> int:
        total = sum(self.masks.numels)
        if t >= self.end:  # the last event lands on the run's density exactly
            return round(self.ctx.density * total)
        return round((1.0 - self.sparsity_at(t)) * total)

    # --- hooks --------------------------------------------------------------------------------
    def setup(self):
        # the dense model: fan_in by its dense fan-in (GSE's baselines)
        reinit_(self.reinit, self.ctx.model, self.masks.names, [p.data for p in self.masks.params],
                self.masks.masks, self.ctx.generator)
        logs = {"gmp/start_step": self.start, "gmp/end_step": self.end,
                "gmp/frequency_steps": self.frequency, "gmp/events": len(self.events)}
        if 0 in self._events:
            logs.update(self.prune(0))
        return logs

    def before_optimizer_step(self, step):
        if self.pruned:
            mask_gradients(self.masks)

    def after_optimizer_step(self, step):
        if self.pruned:
            self.masks.apply_()

    def on_step_end(self, step):
        if step in self._events:
            return self.prune(step)
        return None

    @torch.no_grad()
    def prune(self, t: int) -> dict:
        """One pruning event after `t` optimizer steps."""
        masks = self.masks
        old = [m.clone() for m in masks.masks]
        keep = self.target_count(t)
        new = magnitude_masks([p.data for p in masks.params], old, keep, self.scope, masks.floor, self.structure)
        for i, m in enumerate(new):
            masks.masks[i] = m
        masks.apply_()
        total, kept = sum(masks.numels), sum(int(m.sum()) for m in new)
        self.pruned = self.pruned or kept < total
        self.last_event = t
        self.last_target = keep / total
        return {
            "gmp/event": t,
            "gmp/sparsity": self.sparsity_at(t),
            "gmp/target_density": keep / total,
            **mask_change_logs(masks.names, old, new),
            "density/achieved": kept / total,
        }

    # --- state --------------------------------------------------------------------------------
    def state_dict(self):
        state = super().state_dict()
        state["gmp"] = {"pruned": self.pruned, "last_event": self.last_event, "last_target": self.last_target}
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        g = state.get("gmp", {})
        self.pruned = bool(g.get("pruned", not all(bool(m.all()) for m in self.masks.masks)))
        self.last_event = g.get("last_event")
        self.last_target = float(g.get("last_target", 1.0))
