"""Dense training (no masks) and static sparse training (a fixed random mask)."""

from __future__ import annotations

from .base import Method, register


@register("dense")
class Dense(Method):
    """Ordinary dense training; `density` is ignored and the achieved density is 1."""

    sparse = False


class RandomInitMixin:
    """Draws the initial masks from `cfg.init` (uniform / er / erk / bernoulli) at `density`;
    that is the whole `setup()` unless a method overrides it."""

    def setup(self):
        return self.init_random_masks()

    def init_random_masks(self) -> dict:
        kind = str(self.cfg.get("init", "uniform"))
        self.masks.draw_random(self.ctx.density, kind, self.ctx.generator)  # = set_masks(random_masks(...))
        return {"init/distribution": kind}


@register("static")
class Static(RandomInitMixin, Method):
    """A random mask drawn once at initialisation and never changed."""

    sparse_execution = True
    needs_dense_views = False  # random masks at setup, then nothing
