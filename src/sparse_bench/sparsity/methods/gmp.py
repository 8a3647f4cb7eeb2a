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

Defaults (``conf/method/gmp.yaml`` in the package): events at epoch ends every 2 epochs, ``start`` at 10% and
``end`` at 80% of the run (10 and 80 of a 100-epoch ImageNet ResNet-50 run, the common GMP
recipe; STR's GMP uses 20-79), initial sparsity 0, cubic schedule, global scope. Explicit
``start``/``end`` are in units of the base (1x) schedule and multiplied by
``schedule.multiplier``; ``frequency`` is an interval and is not scaled.

Where this implementation differs from the references, and why:

* Counts are exact: after an event the number of active weights is ``round((1 - s(t)) * N)``
  (global) or, for ``scope: layer``, every layer keeps ``(1 - s(t)) * n_l`` weights rounded by
  largest remainder so the total is the same exact number (the reference thresholds at a
  percentile, so ties and rounding move the count by a few weights). The final event uses the
  run's ``density`` directly, so the run ends at ``round(density * N)`` active weights.
* ``t1`` is always an event, even when ``f`` does not divide ``t1 - t0`` (the reference's
  ``range(t0, t1, f)`` then stops short of ``s_f``).
* Events fall on epoch ends (after ``t`` epochs) or after optimizer step ``t``; an event at
  ``t = 0`` (only with an explicit ``start: 0``) runs in ``setup()`` on the initial weights.
"""

from __future__ import annotations

import torch

from ...errors import ConfigError
from ..distributions import allocate
from ..ops import mask_change_logs, smallest_active
from ..pruning_schedules import gmp_events, gmp_sparsity
from .base import Method, register

SCOPES = ("global", "layer")
UNITS = ("epoch", "step")


def check_choice(cfg, key: str, choices, default: str) -> str:
    value = str(cfg.get(key, default))
    if value not in choices:
        raise ConfigError(f"method.{key}={value} is unknown; choose one of: {', '.join(choices)}")
    return value


def layer_counts_like(numels: list[int], caps: list[int], keep: int) -> list[int]:
    """Per-layer counts at one common density ``keep / sum(numels)``, each <= its cap, summing to `keep`.

    Largest-remainder rounding: every layer is within one weight of ``density * n_l`` unless its
    cap binds (a cap is a layer's current active count, so pruned weights never return).
    """
    frac = keep / sum(numels)
    return allocate([frac * n for n in numels], list(caps), keep)


@torch.no_grad()
def magnitude_masks(weights: list[torch.Tensor], masks: list[torch.Tensor], keep: int, scope: str) -> list[torch.Tensor]:
    """New masks keeping the `keep` active weights of largest |w| (one threshold, or per layer).

    Only active weights (mask True) can be kept: the result is a subset of `masks`.
    """
    active = [int(m.sum()) for m in masks]
    keep = min(int(keep), sum(active))
    if scope == "global":
        numels = [m.numel() for m in masks]
        flat_w = torch.cat([w.detach().abs().flatten() for w in weights])
        flat_m = torch.cat([m.flatten() for m in masks])
        dead = smallest_active(flat_w, flat_m, sum(active) - keep)
        kept = flat_m & ~dead
        return [k.view_as(m) for k, m in zip(torch.split(kept, numels), masks)]
    counts = layer_counts_like([m.numel() for m in masks], active, keep)
    return [m & ~smallest_active(w.detach().abs(), m, a - c) for w, m, a, c in zip(weights, masks, active, counts)]


def mask_gradients(masks) -> None:
    """Zero the gradients of inactive weights (one grouped multiply by float masks, no host sync)."""
    masks.mask_grads_()


@register("gmp")
class GMP(Method):
    """Gradual magnitude pruning from dense to `density` on Zhu & Gupta's cubic schedule."""

    sparse_execution = "it starts dense and prunes gradually, so its weights are dense for much of training"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.unit = check_choice(cfg, "unit", UNITS, "epoch")
        self.scope = check_choice(cfg, "scope", SCOPES, "global")
        self.final_sparsity = 1.0 - float(ctx.density)
        self.initial_sparsity = float(cfg.get("initial_sparsity", 0.0))
        if not 0.0 <= self.initial_sparsity <= self.final_sparsity:
            raise ConfigError(f"method.initial_sparsity={self.initial_sparsity} must be in [0, 1 - density = "
                              f"{self.final_sparsity:g}]; the paper starts at 0")
        self.power = float(cfg.get("power", 3))
        if self.power <= 0:
            raise ConfigError(f"method.power={self.power} must be positive; Zhu & Gupta use 3 (cubic)")
        horizon = ctx.epochs if self.unit == "epoch" else ctx.total_steps
        unit = "epochs" if self.unit == "epoch" else "steps"
        start, end = cfg.get("start"), cfg.get("end")
        try:
            t0 = max(1, round(0.1 * horizon)) if start is None else int(round(float(start) * ctx.multiplier))
            t1 = max(t0, round(0.8 * horizon)) if end is None else int(round(float(end) * ctx.multiplier))
            self.frequency = int(cfg.get("frequency", 2))
        except (TypeError, ValueError):
            raise ConfigError("method.start/end/frequency must be numbers (start/end may be null)") from None
        if t0 < 0:
            raise ConfigError(f"method.start={start} must not be negative")
        if t1 < t0:
            raise ConfigError(f"method.end={end} comes before method.start={start}; set end >= start")
        if t1 > horizon:
            raise ConfigError(f"method.end={end} is {t1} {unit} (x schedule.multiplier) but the run has only "
                              f"{horizon} {unit}; set method.end <= {horizon / ctx.multiplier:g} or leave it null")
        if self.frequency <= 0:
            raise ConfigError(f"method.frequency={self.frequency} must be a positive number of {unit}")
        self.start, self.end = t0, t1
        self.events = gmp_events(t0, t1, self.frequency)
        self._events = frozenset(self.events)
        self.pruned = False  # any mask entry False yet (masks start dense)
        self.last_event: int | None = None
        self.last_target = 1.0

    # --- schedule -----------------------------------------------------------------------------
    def sparsity_at(self, t: int) -> float:
        return gmp_sparsity(t, self.start, self.end, self.initial_sparsity, self.final_sparsity, self.power)

    def target_count(self, t: int) -> int:
        total = sum(self.masks.numels)
        if t >= self.end:  # the last event lands on the run's density exactly
            return round(self.ctx.density * total)
        return round((1.0 - self.sparsity_at(t)) * total)

    # --- hooks --------------------------------------------------------------------------------
    def setup(self):
        logs = {"gmp/unit": self.unit, "gmp/start": self.start, "gmp/end": self.end,
                "gmp/frequency": self.frequency, "gmp/events": len(self.events)}
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
        if self.unit == "step" and step in self._events:
            return self.prune(step)
        return None

    def on_epoch_end(self, epoch, step):
        if self.unit == "epoch" and epoch in self._events:
            return self.prune(epoch)
        return None

    @torch.no_grad()
    def prune(self, t: int) -> dict:
        """One pruning event at time `t` (epochs or steps done)."""
        masks = self.masks
        old = [m.clone() for m in masks.masks]
        keep = self.target_count(t)
        new = magnitude_masks([p.data for p in masks.params], old, keep, self.scope)
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
