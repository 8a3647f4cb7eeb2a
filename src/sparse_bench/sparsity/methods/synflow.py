"""SynFlow: iterative synaptic flow pruning, data-free (Tanaka et al. 2020).

What the paper and its official code (ganguli-lab/Synaptic-Flow, ``Pruners/pruners.py`` and
``prune.py``) do, step by step:

1. Put the model in eval mode (``prune_train_mode`` off: batch norm uses its running
   statistics) and "linearise" it: replace every entry of the state dict (weights, biases, BN
   parameters and buffers) by its absolute value, remembering the signs.
2. Feed one all-ones input of the data's shape (batch of 1); R = sum of the output.
3. Score every prunable weight by |(dR/dθ) ⊙ θ| (masked weights are 0, so score 0).
4. Restore the signs.
5. Repeat for k = 1..n (``iterations``: 100): after scoring, prune globally to density
   density^(k/n) (``schedule: exponential``; ``linear``: 1 - (1 - density) k / n), so
   already-pruned weights (score 0) stay pruned.
6. Train with the final mask fixed.

This module: ``setup`` builds the linearised network once, as a private copy of the model
(parameters and buffers made absolute, eval mode), takes the input shape from one training
batch (its shape only, not its data), and runs the ``iterations`` rounds: each round scores
under the current mask and keeps exactly round(density_k * total) of the currently active
weights (global ranking; ``scope: layer`` ranks within each layer at a uniform density). The
final round keeps exactly round(density * total). The model itself is never modified except for
the final mask (kept weights keep their initial values and signs; biases, norm layers, BN
statistics, gradients, optimizer and global RNG are untouched). Training is then static.

Differences from the official code: the kept count is exact (the reference thresholds with
``<=`` and may drop ties); scoring runs on a copy instead of linearising and restoring the model
in place (the same result, no round-off from the sign round trip). ``precision: float64``
(the reference leaves a commented-out ``model.double()``) scores in double precision for deep
networks whose synaptic flow overflows float32.

SynFlow as GSE's comparison runs it (``prune_before_training.py --prune synflow``, ``prune.py``,
``utils.prepare_synflow_model``): the dense model re-initialised by fan-in (``reinit: fan_in``),
100 rounds of the exponential schedule, scored in float64 (``precision: float64``: it calls
``model.double()``) and, for every model, with LayerNorm, GELU and Softmax replaced by the
identity and the sin-cos position embedding made absolute (``linearise: true``). On GSE's ViT that
linearised flow overflows float64 (the attention without softmax is cubic in its input: the flow
passes 1e150 after the third block and is inf after the fourth), so the reference ranks NaN
scores; its ViT rows here score the unmodified model (``linearise: false``) instead, and a
non-finite flow is a one-line error naming the fix. The references normalise R by its own value
before the backward pass, which does not change the ranking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import MISSING

from ... import schema as S
from ..saliency import SynFlowScorer, check_finite, keep_top, scoring_batches
from .base import register
from .schemas import reinit, scope
from .snip import PruneAtInit

PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class SynFlowSchema:
    """The options of ``method=synflow`` (their values: ``conf/method/synflow.yaml``)."""

    name: str = MISSING
    iterations: int = S.count(ge=1, hint="the paper uses 100")
    schedule: str = S.choice(("exponential", "linear"))
    scope: str = scope()
    precision: str = S.choice(("float32", "float64"))
    linearise: bool = MISSING
    reinit: str = reinit()


@register("synflow", schema=SynFlowSchema)
class SynFlow(PruneAtInit):

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.iterations = cfg.iterations
        self.schedule = cfg.schedule
        self.dtype = PRECISIONS[cfg.precision]
        self.linearise = cfg.linearise

    def round_density(self, k: int) -> float:
        """Density after round k (1-based) of `iterations`; exactly `density` at the last."""
        d, n = self.ctx.density, self.iterations
        if k >= n:
            return d
        if self.schedule == "exponential":
            return d ** (k / n)
        return 1.0 - (1.0 - d) * k / n

    def _overflow_fix(self) -> str:
        if self.dtype != torch.float64:
            return "set method.precision=float64"
        if self.linearise:
            return ("the linearised model's flow overflows float64 (an attention without softmax is cubic in its "
                    "input); set method.linearise=false")
        return "the flow overflows float64: the model is too deep for SynFlow's all-ones input"

    def input_shape(self) -> tuple[int, ...]:
        x, _ = next(iter(scoring_batches(self.ctx, 1, "synflow")))
        return tuple(x.shape[1:])

    def prune_masks(self):
        total = sum(self.masks.numels)
        scorer = SynFlowScorer(self.ctx.model, self.masks.names, self.input_shape(), self.ctx.device, self.dtype,
                               linearise=self.linearise)
        masks = [m.clone() for m in self.masks.masks]
        for k in range(1, self.iterations + 1):
            scores = scorer(masks)
            check_finite(scores, "synflow", self._overflow_fix())
            n_keep = min(int(round(self.round_density(k) * total)), sum(int(m.sum()) for m in masks))
            masks = keep_top(scores, n_keep, self.scope, active=masks, floor=self.masks.floor,
                             structure=self.structure)
        del scorer
        return masks, {"synflow/iterations": self.iterations, "synflow/schedule": self.schedule}
