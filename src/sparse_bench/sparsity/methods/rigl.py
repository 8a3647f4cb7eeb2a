"""RigL: Rigging the Lottery (Evci et al. 2020).

What the reference code (google-research/rigl, ``SparseRigLOptimizer``) does, step by step:

* Masks start at the target density with the Erdos-Renyi-Kernel distribution (``init: erk``);
  the forward pass uses mask * weight, so the gradient reaching an inactive weight is zero
  (the optimizer only ever moves active weights), while the gradient of the loss with respect
  to the *masked* weight tensor, which is dense, is computed alongside.
* Every ``update_every`` (100) steps, from step 0 up to ``end_step`` = ``end`` (default
  ``{unit: fraction, value: 0.75}`` of training), each layer changes its mask:
  1. drop fraction alpha_t = ``drop_fraction`` (0.3) * (1 + cos(pi t / end_step)) / 2
     (``decay: cosine``, zero at the end step);
  2. k_l = int(alpha_t * nnz_l), i.e. rounded DOWN (truncation of a positive float);
  3. keep the nnz_l - k_l active weights of largest |w| (drop the k_l smallest);
  4. grow the k_l positions of largest |dense gradient| among all positions NOT kept, so a
     weight dropped in step 3 can be regrown at once (it then keeps its value and momentum:
     it is "new" only if it was inactive before the update);
  5. new connections start at 0 (``grow_init: zeros``) and their optimizer accumulators
     (momentum) are set to 0.
  The mask update replaces the optimizer step on update iterations.

This module, step by step:

* ``setup`` draws the initial masks (``init``: erk by default; uniform / er / bernoulli too).
* Per step, in ``before_optimizer_step``: the gradients of inactive weights are zeroed with one
  grouped ``torch._foreach_mul_`` (no host sync). PyTorch computes the gradient of the stored
  (zero-valued) inactive weights anyway, so ``p.grad`` is the reference's dense gradient with
  respect to the masked weights; masking it reproduces the reference's zero gradient for the
  underlying inactive weights, so their momentum stays exactly 0. "The dense gradient is
  computed only on update steps": on the step that precedes a mask update, |p.grad| is copied
  (dense, before masking) and used as the growth score; on other steps it is discarded by the
  masking and never stored.
* After optimizer steps t = ``update_every``, 2 ``update_every``, ... < ``end_step``
  (``on_step_end``), each layer drops k_l = floor(alpha_t * nnz_l) smallest-|w| active weights
  and grows the k_l largest-|grad| positions among those not kept (steps 2-5 above, exactly as
  the reference, including the regrowth of just-dropped weights). Weights that leave the mask
  are zeroed and their momentum is zeroed too, so every inactive weight has zero momentum at
  all times (behaviourally the same as the reference, which resets the momentum of a position
  when it is grown again).
* ``scope: global`` (not in the reference) drops the floor(alpha_t * total_nnz) smallest |w|
  over all layers at once and grows by |grad| over all layers; the total stays exact, layer
  densities move.

Where this differs from the reference, and why:

* The reference's first update happens at step 0 and an update iteration skips the optimizer
  step. Here the optimizer steps on every iteration and the mask changes after steps
  ``update_every``, 2 ``update_every``, ... (the trainer always steps; an update on the untrained
  initialisation mostly reshuffles random magnitudes). The growth gradient is the one of the
  update step's batch, taken before the step; the drop uses the weights after it.
* The reference adds N(0, 1e-5) noise to |w| before choosing what to drop (tie breaking);
  ``drop_noise`` (default 0: ties go to torch.topk's order) restores it, drawn from the run's
  seeded generator.
* ``grow_init`` supports ``zeros`` only (the paper's and the reference's default; the reference
  also offers random / gradient-scaled inits, not implemented).

RigL as GSE's comparison runs it (``dynamic_sparse_training.py --prune magnitude --grow rigl``),
all options of this module: ER densities with the sparse fan-in re-initialisation (``init: er``,
``reinit: fan_in``), an update every 1000 steps until epoch 120 (``update_every: 1000``, ``end:
{unit: epoch, value: 120}``) replacing 0.1 (1 + cos(pi t / T_end)) of the active weights
(``drop_fraction: 0.2``), pruned by magnitude and grown by |gradient| over all layers at once
(``scope: global``), never regrowing a weight pruned in the same update (``exclude_pruned:
true``: GSE sets their growth score to -inf), with the dense gradient summed over
``stat_batches`` separate training batches drawn at the update (1 on CIFAR-10, 8 on CIFAR-100:
GSE's ``prune_grow_samples`` = 10 per class) instead of the training step's own batch (``null``,
the RigL reference). The statistics pass runs in train mode with buffers restored
(``statistics.quiet_pass``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import MISSING

from ... import schema as S
from ...errors import ConfigError
from ..flops import DENSE_GRADIENT_STEP, SPARSE_STEP
from ..schedules import DECAYS, decay
from ..statistics import dense_gradients, quiet_pass
from .base import cadence_from, register
from .drop_grow import DropAndGrow, Update
from .schemas import Milestone, init, milestone, reinit, scope


@dataclass
class RigLSchema:
    """The options of ``method=rigl`` (their values: ``conf/method/rigl.yaml``)."""

    name: str = MISSING
    init: str = init()
    reinit: str = reinit()
    drop_fraction: float = S.num(ge=0.0, le=1.0, hint="the paper uses 0.3")
    decay: str = S.choice(DECAYS)
    update_every: int = S.count(ge=1, hint="steps between updates; the paper uses 100")
    end: Optional[Milestone] = milestone()
    scope: str = scope()
    exclude_pruned: bool = MISSING
    stat_batches: Optional[int] = S.count(ge=1, nullable=True,
                                          hint="null (the step's own batch) or a number of batches (GSE: 1 on "
                                               "CIFAR-10, 8 on CIFAR-100)")
    grow_init: str = S.choice(("zeros",))
    drop_noise: float = S.num(ge=0.0, hint="the reference uses 1e-5")


@register("rigl", schema=RigLSchema)
class RigL(DropAndGrow):
    sparse_execution = True  # the dense gradient is formed on the step before an update only
    regrown = "keep"  # a weight dropped and regrown at once keeps its value and momentum
    reset = ("grown", "dropped")  # every inactive weight has zero momentum at all times

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.alpha0 = cfg.drop_fraction
        self.decay_kind = cfg.decay
        self.scope = cfg.scope
        self.grow_init = cfg.grow_init
        self.drop_noise = cfg.drop_noise
        self.cadence = cadence_from(cfg, ctx)
        self.end_step = self.cadence.end
        # null: the step's own batch; else statistics batches (GSE's protocol: 1 on CIFAR-10, 8 on CIFAR-100)
        self.stat_batches = cfg.stat_batches
        self.exclude_pruned = cfg.exclude_pruned
        self._grow_scores: list[torch.Tensor | None] | None = None
        self.last_update: dict = {}

    def drop_fraction(self, step: int) -> float:
        """alpha_t: `drop_fraction` decayed to 0 at `end_step` (0 from there on)."""
        if step >= self.end_step:
            return 0.0
        return decay(self.decay_kind, self.alpha0, 0.0, step, self.end_step)

    rate = drop_fraction

    # --- per step ---------------------------------------------------------------------------
    def wants_dense_grad(self, step):
        # a mask update follows this optimizer step and reads its gradient (not with stat_batches)
        return self.stat_batches is None and self.cadence.at_step(step + 1)

    @torch.no_grad()
    def before_optimizer_step(self, step):
        if self.stat_batches is None and self.cadence.at_step(step + 1):  # a mask update follows this step
            self._grow_scores = [None if g is None else g.detach().abs() for g in self.masks.dense_grads()]
        self.masks.mask_grads_()

    def step_passes(self, step):
        """Sparse passes, but the dense weight gradient on the step whose gradient a mask update
        reads: 2 f_S + f_D there, 3 f_S elsewhere (RigL's (3 f_S dT + 2 f_S + f_D) / (dT + 1))."""
        return DENSE_GRADIENT_STEP if self.wants_dense_grad(step) else SPARSE_STEP

    # --- one drop / grow update -------------------------------------------------------------
    def grow_scores(self, u: Update) -> list[torch.Tensor]:
        if self.stat_batches is not None:  # GSE's protocol: the gradient of separate batches
            batches = self.ctx.batches(self.stat_batches, u.step) if self.ctx.batches is not None else []
            if len(batches) == 0:
                raise ConfigError("method.stat_batches needs training batches (ctx.batches)")
            with quiet_pass(self.ctx.model, self.ctx.device):
                grads = dense_gradients(self.ctx.model, self.masks.params, batches, self.ctx.loss_fn,
                                        self.masks.layers)
            return [g.abs() for g in grads]
        scores = self._grow_scores
        self._grow_scores = None
        if scores is None:  # hooks driven without before_optimizer_step: use what is there
            scores = [None if p.grad is None else p.grad.detach().abs() for p in self.masks.params]
        return [torch.zeros_like(p) if s is None else s for s, p in zip(scores, self.masks.params)]

    def drop_scores(self, u: Update) -> list[torch.Tensor]:
        scores = [p.detach().abs() for p in self.masks.params]
        if self.drop_noise > 0:
            scores = [
                s + self.drop_noise * torch.randn(s.shape, generator=self.ctx.generator).to(s.device, s.dtype)
                for s in scores
            ]
        return scores

    def record(self, u: Update) -> dict:
        budget = self.drop_budget(u)
        return {"step": u.step, "drop_fraction": u.rate, "k": budget if isinstance(budget, list) else [budget],
                "nnz_before": u.nnz, "old_masks": u.old, "dropped": u.dropped, "grown": u.grown}

    def method_logs(self, u: Update) -> dict:
        budget = self.drop_budget(u)
        return {"rigl/drop_fraction": u.rate, "rigl/dropped": sum(budget) if isinstance(budget, list) else budget,
                "rigl/regrown_same": int(sum(torch.count_nonzero(d & g) for d, g in zip(u.dropped, u.grown)))}
