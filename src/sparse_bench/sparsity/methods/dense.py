"""Dense training (no masks) and static sparse training (a fixed random mask)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import MISSING

from ..reinit import reinit_, unit_bounds
from .base import Method, register
from .schemas import init, reinit


@dataclass
class DenseSchema:
    """The options of ``method=dense`` (their values: ``conf/method/dense.yaml``)."""

    name: str = MISSING


@register("dense", schema=DenseSchema)
class Dense(Method):
    """Ordinary dense training; `density` is ignored and the achieved density is 1."""

    sparse = False


class RandomInitMixin:
    """Draws the initial masks from `cfg.init` (uniform / er / erk / bernoulli) at `density`, then
    optionally re-initialises the active weights (`cfg.reinit`: fan_in by their sparse fan-in, as
    GSE's baselines do, or torch's default layer initialisation; default none: the model's own
    initialisation times the mask); that is the whole `setup()` unless a method overrides it."""

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.reinit = cfg.reinit

    def setup(self):
        return self.init_random_masks()

    def init_random_masks(self) -> dict:
        kind = self.cfg.init
        self.masks.draw_random(self.ctx.density, kind, self.ctx.generator)  # = set_masks(random_masks(...))
        logs = {"init/distribution": kind}
        if self.reinit != "none":
            self.reinit_weights()
        logs["init/reinit"] = self.reinit
        return logs

    @torch.no_grad()
    def reinit_weights(self) -> None:
        """Active weights ~ U(-1, 1) * the bound of their output unit (``reinit.unit_bounds``); bias
        likewise.

        A layer that is sparse already (built without a dense weight, execution=sparse) draws
        its active values only, from its index structure."""
        ms, gen = self.masks, self.ctx.generator
        dense = [i for i in range(len(ms)) if not ms.is_sparse(i)]
        if dense:
            entries = [ms.masked_entry(i) for i in dense]
            reinit_(self.reinit, self.ctx.model, [ms.names[i] for i in dense], [p.data for p, _ in entries],
                    [m for _, m in entries], gen)
        for i in range(len(ms)):
            if not ms.is_sparse(i):
                continue
            layer = ms.layers[i]
            bound = unit_bounds(self.reinit, (layer.indptr[1:] - layer.indptr[:-1]).cpu(), layer.cols)
            u = torch.rand(layer.nnz, generator=gen, dtype=torch.float64) * 2 - 1
            layer.values.data.copy_((u * bound[layer.row_ids().cpu()]).to(layer.values))
            if layer.bias is not None:
                ub = torch.rand((bound.numel(),), generator=gen, dtype=torch.float64) * 2 - 1
                layer.bias.data.copy_((ub * bound).to(layer.bias))
        ms.apply_()


@dataclass
class StaticSchema:
    """The options of ``method=static`` (their values: ``conf/method/static.yaml``)."""

    name: str = MISSING
    init: str = init()
    reinit: str = reinit()


@register("static", schema=StaticSchema)
class Static(RandomInitMixin, Method):
    """A random mask drawn once at initialisation and never changed (``init``, ``reinit``)."""

    keeps_structure = True  # its masks are the initial ones, drawn within the structure
    sparse_execution = True
    needs_dense_views = False  # random masks at setup, then nothing
