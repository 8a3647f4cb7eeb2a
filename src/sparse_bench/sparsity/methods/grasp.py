"""GraSP: gradient signal preservation (Wang, Zhang & Grosse 2020).

What the paper and its official code (alecwangcq/GraSP, ``pruner/GraSP.py``) do, step by step:

1. At initialisation, on a deep copy of the network, fetch a small balanced sample of training
   data (``samples_per_class`` per class, in two halves).
2. g = the gradient of the cross-entropy of the temperature-scaled logits (output / T,
   T = 200) with respect to the prunable weights (Conv2d / Linear), summed over the halves,
   without a graph.
3. H g by double backward: for each half, z = g · dL/dθ (dL/dθ with a graph), z.backward().
4. Score S = -θ ⊙ H g, normalised by |sum S| (no effect on the ranking).
5. REMOVE the (1 - density) fraction of weights with the LARGEST S, ranked over all layers: the
   code keeps ``S <= threshold`` where threshold is the smallest of the top-(1 - density)
   scores. Removing a weight of large S reduces the gradient norm least (or increases it), the
   paper's criterion "preserve the gradient flow". So GraSP keeps the weights of SMALLEST S,
   i.e. of largest θ ⊙ Hg (the SynFlow authors' port scores θ ⊙ Hg and keeps the largest, the
   same rule).
6. Train with the mask fixed.

This module: ``setup`` scores a private copy of the model in train mode over ``batches``
training batches (g and H g averaged over them, ``temperature`` T = 200), keeps exactly
round(density * total) weights of smallest S by global ranking (``scope: layer``: per layer at
a uniform density), then trains statically (masks re-applied after every optimizer step).
Kept weights keep their initial values; biases and norm layers are never pruned; the model,
BN statistics, gradients, optimizer and global RNG are untouched by the scoring.

Differences from the official code: it re-initialises the Linear layers of the scored copy with
Xavier-normal (``reinit=True``) while the trained network keeps its own weights; here the
model's own initialisation is scored. It draws a class-balanced sample of
``samples_per_class`` * classes examples; here ``batches`` ordinary training batches (one batch of
128 is about the reference's 10 per class on CIFAR-10). The loss is the run's loss function
(label smoothing included when configured). Ties at the threshold are all kept by the reference;
here the kept count is exact.

GraSP as GSE's comparison runs it (``prune_before_training.py --prune grasp``, ``prune.py``): the
dense model re-initialised by fan-in (``reinit: fan_in``), T = 200, g and H g from GSE's
statistics batches (``batches``: 1 on CIFAR-10, 8 on CIFAR-100; the same batches for both passes),
keeping the largest θ ⊙ Hg over all layers (the same rule as here).
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from ... import schema as S
from ..saliency import grasp_scores, keep_top, scoring_batches
from .base import register
from .snip import PruneAtInit, SNIPSchema


@dataclass
class GraSPSchema(SNIPSchema):
    """The options of ``method=grasp`` (their values: ``conf/method/grasp.yaml``)."""

    name: str = MISSING
    temperature: float = S.num(gt=0.0, hint="the official code uses 200")


@register("grasp", schema=GraSPSchema)
class GraSP(PruneAtInit):

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.n_batches = cfg.batches  # 1: about the reference's 10 samples per class
        self.temperature = cfg.temperature
        self.train_mode = cfg.train_mode

    def prune_masks(self):
        batches = scoring_batches(self.ctx, self.n_batches, "grasp")
        scores = grasp_scores(self.ctx.model, self.masks.names, batches, self.ctx.loss_fn,
                              self.temperature, self.train_mode)
        # keep the SMALLEST S = -θ ⊙ Hg, i.e. the largest θ ⊙ Hg
        masks = keep_top([-s for s in scores], self.n_keep(), self.scope, floor=self.masks.floor,
                         structure=self.structure)
        return masks, {"grasp/batches": len(batches), "grasp/temperature": self.temperature}
