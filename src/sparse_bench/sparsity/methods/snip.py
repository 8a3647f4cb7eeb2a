"""SNIP: single-shot network pruning by connection sensitivity (Lee et al. 2019).

What the paper and its reference code do, step by step:

1. At initialisation, take one mini-batch of training data (``batches``: 1).
2. Compute the gradient of the loss with respect to a multiplicative mask c = 1 on every
   prunable weight; dL/dc = g ⊙ θ, so the connection sensitivity is |g ⊙ θ| (normalised by its
   sum over all weights, which does not change the ranking).
3. Keep the k = density * #weights connections of largest sensitivity, ranked over all layers
   at once; prune the rest.
4. Train the pruned network with the mask fixed.

This module: ``setup`` scores a private copy of the model in train mode (as at the start of
training) over ``batches`` training batches (the gradient is averaged over them), keeps exactly
round(density * total) weights by global top-k (``scope: layer`` ranks inside every layer at a
uniform density instead), and then trains statically: the masks never change and are
re-applied after every optimizer step. Kept weights keep their initial values; biases and norm
layers are not pruned; the model, its BN statistics, its gradients, the optimizer and the global
RNG are left exactly as they were by the scoring.

SNIP as GSE's comparison runs it (``prune_before_training.py --prune snip``): the dense model
re-initialised by fan-in (``reinit: fan_in``), scored with GSE's statistics batches (``batches``:
ceil(10 samples per class / 128) = 1 on CIFAR-10, 8 on CIFAR-100, gradients summed), one global
ranking.

Differences from the reference: the reference PyTorch ports re-initialise the scored copy with
Xavier-normal weights before scoring (and the paper uses variance-scaling init); here the
model's own initialisation is scored and kept. The kept count is exact (the reference
thresholds, keeping ties). With several batches the gradient is averaged (the reference sums:
the same ranking).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import MISSING

from ... import schema as S
from ..ops import mask_change_logs
from ..reinit import reinit_
from ..saliency import keep_top, preserved_rng, scoring_batches, snip_scores
from .base import Method, register
from .schemas import reinit, scope


class PruneAtInit(Method):
    """Shared by SNIP / GraSP / SynFlow: score once in `setup`, keep the top weights, stay static.

    ``reinit: fan_in`` first re-initialises the dense model by its (dense) fan-in, as GSE's
    ``prune_before_training.py`` does through ``sparsify(model, 0.0, "uniform")``; the scores and
    the kept weights are then those of the re-initialised model.
    """

    keeps_structure = True  # its one selection goes through keep_top with the structure
    sparse_execution = True  # scored on the dense model at setup; sparse layers from then on

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.scope = cfg.scope
        self.reinit = cfg.reinit

    def n_keep(self) -> int:
        return int(round(self.ctx.density * sum(self.masks.numels)))

    def prune_masks(self) -> tuple[list, dict]:  # pragma: no cover - overridden
        raise NotImplementedError

    def setup(self):
        reinit_(self.reinit, self.ctx.model, self.masks.names, [p.data for p in self.masks.params],
                [torch.ones_like(m) for m in self.masks.masks], self.ctx.generator)
        old = [m.clone() for m in self.masks.masks]
        with preserved_rng(self.ctx.device):
            new, logs = self.prune_masks()
        self.masks.set_masks(new)
        return {**logs, **mask_change_logs(self.masks.names, old, self.masks.masks)}


@dataclass
class SNIPSchema:
    """The options of ``method=snip`` (their values: ``conf/method/snip.yaml``)."""

    name: str = MISSING
    batches: int = S.count(ge=1, hint="the paper scores one mini-batch")
    scope: str = scope()
    train_mode: bool = MISSING
    reinit: str = reinit()


@register("snip", schema=SNIPSchema)
class SNIP(PruneAtInit):

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.n_batches = cfg.batches  # the paper scores one mini-batch
        self.train_mode = cfg.train_mode

    def prune_masks(self):
        batches = scoring_batches(self.ctx, self.n_batches, "snip")
        scores = snip_scores(self.ctx.model, self.masks.names, batches, self.ctx.loss_fn, self.train_mode)
        return (keep_top(scores, self.n_keep(), self.scope, floor=self.masks.floor, structure=self.structure),
                {"snip/batches": len(batches)})
