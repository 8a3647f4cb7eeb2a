"""Dense training (no masks) and static sparse training (a fixed random mask)."""

from __future__ import annotations

import torch

from ..reinit import fan_in_reinit
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

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.reinit = cfg.reinit

    def setup(self):
        return self.init_random_masks()

    def init_random_masks(self) -> dict:
        kind = self.cfg.init
        self.masks.draw_random(self.ctx.density, kind, self.ctx.generator)  # = set_masks(random_masks(...))
        logs = {"init/distribution": kind}
        if self.reinit == "fan_in":
            self.reinit_fan_in()
        logs["init/reinit"] = self.reinit
        return logs

    @torch.no_grad()
    def reinit_fan_in(self) -> None:
        """Active weights ~ U(-1, 1) * sqrt(3 / sparse fan-in of the output unit); bias likewise.

        A layer that is sparse already (built without a dense weight, execution=sparse) draws
        its active values only, from its index structure."""
        ms, gen = self.masks, self.ctx.generator
        dense = [i for i in range(len(ms)) if not ms.is_sparse(i)]
        if dense:
            entries = [ms.masked_entry(i) for i in dense]
            fan_in_reinit(self.ctx.model, [ms.names[i] for i in dense], [p.data for p, _ in entries],
                          [m for _, m in entries], gen)
        for i in range(len(ms)):
            if not ms.is_sparse(i):
                continue
            layer = ms.layers[i]
            fan = (layer.indptr[1:] - layer.indptr[:-1]).clamp_min(1).to(torch.float64).cpu()
            bound = (3.0 / fan).sqrt()
            u = torch.rand(layer.nnz, generator=gen, dtype=torch.float64) * 2 - 1
            layer.values.data.copy_((u * bound[layer.row_ids().cpu()]).to(layer.values))
            if layer.bias is not None:
                ub = torch.rand((bound.numel(),), generator=gen, dtype=torch.float64) * 2 - 1
                layer.bias.data.copy_((ub * bound).to(layer.bias))
        ms.apply_()


@register("static")
class Static(RandomInitMixin, Method):
    """A random mask drawn once at initialisation and never changed (``init``, ``reinit``)."""

    sparse_execution = True
    needs_dense_views = False  # random masks at setup, then nothing
