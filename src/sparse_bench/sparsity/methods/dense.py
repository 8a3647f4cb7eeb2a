"""Dense training (no masks) and static sparse training (a fixed random mask)."""

from __future__ import annotations

import torch

from ..distributions import random_masks
from ..reinit import fan_in_reinit, reinit_choice
from .base import Method, register


@register("dense")
class Dense(Method):
    """Ordinary dense training; `density` is ignored and the achieved density is 1."""

    sparse = False


class RandomInitMixin:
    """Draws the initial masks from `cfg.init` (uniform / er / erk / bernoulli) at `density`, then
    optionally re-initialises the active weights by their sparse fan-in (`cfg.reinit`: fan_in, as
    GSE's baselines do; default none: the model's own initialisation times the mask); that is the
    whole `setup()` unless a method overrides it."""

    default_reinit = "none"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.reinit = reinit_choice(cfg, self.default_reinit)

    def setup(self):
        return self.init_random_masks()

    def init_random_masks(self) -> dict:
        kind = str(self.cfg.get("init", "uniform"))
        masks = random_masks(self.masks.shapes, self.ctx.density, kind, self.ctx.generator, self.masks.names)
        self.masks.set_masks(masks)
        logs = {"init/distribution": kind}
        if self.reinit == "fan_in":
            self.reinit_fan_in()
        logs["init/reinit"] = self.reinit
        return logs

    @torch.no_grad()
    def reinit_fan_in(self) -> None:
        """Active weights ~ U(-1, 1) * sqrt(3 / sparse fan-in of the output unit); bias likewise."""
        fan_in_reinit(self.ctx.model, self.masks.names, [p.data for p in self.masks.params],
                      self.masks.masks, self.ctx.generator)
        self.masks.apply_()


@register("static")
class Static(RandomInitMixin, Method):
    """A random mask drawn once at initialisation and never changed (``init``, ``reinit``)."""
