"""Top-KAST: Top-K Always Sparse Training (Jayakumar et al. 2020).

What the paper does, step by step:

* A dense parameter vector theta is kept (in a real deployment only its backward set needs to
  be stored). Per layer, the forward set A holds the top ``forward_density`` fraction of |theta|
  and the backward set B the top ``backward_density`` fraction (A is inside B).
* The forward pass uses alpha = theta * 1_A (a sparse model at the forward density).
* The gradient of the loss with respect to alpha is applied to theta on B only: weights in
  B \\ A are trained although they take no part in the forward pass (so they can grow into A);
  weights outside B do not change.
* The sets are re-selected from |theta| periodically (here every ``update_every`` steps).
* An exploration regulariser penalises the magnitude of theta on A, and more strongly (scaled by
  1/D, D = forward density) on B \\ A, so that weights that are not used must earn their place.

This module, step by step:

* ``setup``: theta = a copy of the model's dense initial weights; per-layer counts are the
  ``uniform`` ones of ``distributions.layer_counts`` (so the total forward count is exactly
  round(D * N)); A and B come from one descending sort of |theta| per layer (A = its first k_A
  entries, B = its first k_B), so A is inside B even with ties. ``self.masks`` holds A: the
  achieved density reported is the forward density.
* Between steps (and at evaluation, at the end, in checkpoints) the model's parameters hold
  theta * 1_A: the evaluated model is the sparse forward model. ``before_forward`` only
  re-writes it if something left the model otherwise.
* ``before_optimizer_step``: gradients are masked to B (one grouped ``_foreach_mul_``); with
  ``exploration_l2`` = lambda > 0 the regulariser's gradient lambda * theta (on A) and
  lambda * theta / D (on B \\ A) is added (an L2 penalty lambda/2 * theta^2, scaled by 1/D on
  B \\ A); then theta * 1_B is written into the parameters, so the optimizer (momentum, weight
  decay) updates the whole backward set.
* ``after_optimizer_step``: theta takes the new values on B (outside B it keeps its values),
  and the parameters go back to theta * 1_A. All grouped, no host sync.
* ``on_step_end`` every ``update_every`` steps: A and B are re-selected from |theta|; the
  parameters become theta * 1_A with the new A. The optimizer state (momentum, Adam moments)
  is zeroed outside B, so it only ever exists on B: a weight that (re-)enters B starts with
  zero momentum, and a weight outside B sees zero gradient, zero weight decay (its parameter
  value is 0 during the step) and zero momentum, so it provably never changes.
* ``state_dict`` holds theta and B (A is the MaskSet), so a resumed run is bit-identical.

Choices the paper leaves open (documented defaults):

* ``init`` (uniform) distributes the forward count over the layers (uniform | er | erk, exact
  totals); ``backward_density`` default (null): every layer's backward set is twice its forward
  set, capped at the layer (the paper's pairs of 90%/80% and 95%/90% forward/backward sparsity;
  GSE's ``p_backward = 1 - 2 (1 - p_forward)`` per layer); an explicit value is distributed like
  the forward count.
* ``exploration_l2`` default 0 (off): the paper's coefficient is not a fixed number; the
  optimizer's own weight decay still applies to all of B.
* Weights entering A from B \\ A keep their trained value (``promote: theta``; there is no "grow at
  zero" here: the forward value of a weight is always theta).

Top-KAST as GSE's comparison runs it (``topkast_training.py``, after A-Klass/torch_topkast), all
options of this module:

* ER forward densities per layer (``init: er``), backward set twice the forward set per layer
  (``backward_density: null``).
* Its ``sparsify`` builds every Linear and Conv2d afresh (``layers.py``'s masked layers) without
  copying the old weight, so a model's own initialisation is discarded and torch's default layer
  initialisation trains (``reinit: default``; it matters for ResNet-56, whose Kaiming-normal
  weights are about 2.45x larger; VGG and the ViT use torch's default on both sides).
* An exploration phase: the sets are re-selected before every step while the epoch index is at
  most ``num_epochs_explore`` = 20, i.e. for the first 21 epochs (``explore_end: {unit: epoch,
  value: 21}``), then every 1000 steps (``update_every: 1000``) to the end of training. During
  the exploration phase the per-step re-selections are not logged (no host sync per step).
* Its own weight-decay term instead of the optimizer's (``optimizer.weight_decay: 0``):
  ``wd * sum_l (||theta_A||_2 + ||theta_{B\\A}||_2 / D_l) + wd * sum ||w||_2`` over every other
  module's ``weight`` (the normalisation layers), with unsquared L2 norms and D_l the layer's
  forward density (``norm_penalty: 1.0e-4``; its gradient is added before the optimizer step).
* A weight that enters A from B \\ A starts at 0 (``promote: zero``): the reference keeps B \\ A's
  values in a separate ``all_weight`` buffer and its forward weight for B \\ A at 0, and does not
  copy ``all_weight`` into the forward weight when the sets change, so a promoted weight restarts
  from 0 (and the next re-selection overwrites its ``all_weight`` with that restarted value).
  A weight entering A from outside B keeps theta (the reference: its last forward value).
* Remaining differences: the reference selects by a quantile threshold (``>=``, ties kept), here
  exact top-k counts; the reference keeps the momentum of weights that leave B (their forward
  value drifts unused), here it is zeroed.

Under ``structure=nm|fan_in|block`` (no structure in the reference) both sets are then made
structured by |theta| with their layer counts (``Structure.keep``): A keeps n per N:M group, B
round(m x backward density) (every weight at 2:4 with B twice A); under fan_in and block each set
its count per unit or in whole blocks; B always contains A.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import MISSING
from torch import nn

from ... import schema as S
from ...errors import ConfigError
from ..distributions import layer_counts
from ..flops import Passes
from ..ops import mask_change_logs
from ..reinit import reinit_
from .base import Method, cadence_from, register, warn_if_never_updated
from .schemas import Milestone, milestone, reinit


@dataclass
class TopKASTSchema:
    """The options of ``method=topkast`` (their values: ``conf/method/topkast.yaml``)."""

    name: str = MISSING
    forward_density: Optional[float] = S.num(gt=0.0, le=1.0, nullable=True, hint="leave it null to use density")
    backward_density: Optional[float] = S.num(gt=0.0, le=1.0, nullable=True,
                                              hint="leave it null for min(1, 2 * density)")
    init: str = S.choice(("uniform", "er", "erk"))
    update_every: int = S.count(ge=1)
    explore_end: Optional[Milestone] = milestone()
    exploration_l2: float = S.num(ge=0.0, hint="0 turns it off")
    norm_penalty: float = S.num(ge=0.0, hint="0 turns it off; GSE uses 1e-4")
    promote: str = S.choice(("theta", "zero"))
    reinit: str = reinit()


@register("topkast", schema=TopKASTSchema)
class TopKAST(Method):
    sparse_execution = "it keeps dense parameters theta and a backward set larger than the forward set"
    keeps_structure = True  # both sets chosen within the structure (``select``)

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        fd = cfg.forward_density
        self.forward_density = float(ctx.density if fd is None else fd)
        bd = cfg.backward_density
        self.backward_density = float(min(1.0, 2.0 * self.forward_density) if bd is None else bd)
        if self.backward_density < self.forward_density:  # two keys (or the density): checked here
            raise ConfigError(
                f"method.backward_density={bd} must be in [forward density {self.forward_density}, 1]; "
                f"leave it null for min(1, 2 * density)"
            )
        self.exploration_l2 = cfg.exploration_l2
        self.norm_penalty = cfg.norm_penalty
        self.init = cfg.init
        self.promote = cfg.promote
        self.reinit = cfg.reinit
        self.explore_end = ctx.timeline.step(cfg.explore_end, "method.explore_end", allow_none=True) or 0
        self.cadence = cadence_from(cfg, ctx, warn=False)
        if self.explore_end == 0:  # an exploration phase re-selects the sets after every step
            warn_if_never_updated(self.cadence, ctx)
        shapes = self.masks.shapes
        self.k_forward = layer_counts(shapes, self.forward_density, self.init)
        if bd is None:  # twice the forward set in every layer, capped at the layer
            self.k_backward = [min(n, 2 * k) for n, k in zip(self.masks.numels, self.k_forward)]
        else:
            k_back = layer_counts(shapes, self.backward_density, self.init)
            self.k_backward = [min(n, max(b, f)) for n, b, f in zip(self.masks.numels, k_back, self.k_forward)]
        # 1 / D_l for the norm penalty's B \ A term, as 0-d tensors (no host sync per step)
        self.inv_density = [torch.tensor(n / max(k, 1), dtype=p.dtype, device=p.device)
                            for n, k, p in zip(self.masks.numels, self.k_forward, self.masks.params)]
        prunable = {id(p) for p in self.masks.params}
        self.other_weights = [m.weight for m in ctx.model.modules()
                              if isinstance(getattr(m, "weight", None), nn.Parameter) and id(m.weight) not in prunable
                              and m.weight.requires_grad]
        self.theta = [p.detach().clone() for p in self.masks.params]
        self.backward = [torch.ones_like(m) for m in self.masks.masks]
        self.outside = [~b for b in self.backward]
        self.just_backward = [torch.zeros_like(m) for m in self.masks.masks]
        self.l2_scale: list[torch.Tensor] = []
        self._params_hold_forward = False

    # --- masks --------------------------------------------------------------------------------
    @torch.no_grad()
    def select(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(A, B) per layer from |theta|: one descending top-k, A = its head, B = all of it."""
        fwd, bwd = [], []
        for t, ka, kb in zip(self.theta, self.k_forward, self.k_backward):
            idx = torch.topk(t.abs().flatten(), kb, sorted=True).indices
            a = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
            b = torch.zeros_like(a)
            b[idx] = True
            a[idx[:ka]] = True
            fwd.append(a.view_as(t))
            bwd.append(b.view_as(t))
        if self.structure.active:  # each set the same count per layer, structured by |theta| (Structure.keep)
            scores = [t.abs() for t in self.theta]
            every = [torch.ones_like(m) for m in fwd]
            fwd = self.structure.keep(scores, every, fwd, self.forward_density)
            bwd = [b | a for a, b in zip(fwd, self.structure.keep(scores, every, bwd, self.backward_density))]
        return fwd, bwd

    def _set_backward(self, bwd: list[torch.Tensor]) -> None:
        self.backward = bwd
        self.outside = [~b for b in bwd]
        if self.norm_penalty > 0:  # B \ A: read by the norm penalty only
            self.just_backward = [b & ~a for a, b in zip(self.masks.masks, bwd)]
        if self.exploration_l2 > 0:
            inv_d = 1.0 / self.forward_density
            self.l2_scale = [
                torch.where(a, 1.0, torch.where(b, inv_d, 0.0)).to(t.dtype)
                for a, b, t in zip(self.masks.masks, bwd, self.theta)
            ]

    @torch.no_grad()
    def write_forward(self) -> None:
        """Parameters <- theta * 1_A."""
        params = [p.data for p in self.masks.params]
        torch._foreach_copy_(params, self.theta)
        self.masks.apply_()
        self._params_hold_forward = True

    @torch.no_grad()
    def setup(self):
        # on the dense model (all-ones masks), before the sets are chosen by magnitude
        reinit_(self.reinit, self.ctx.model, self.masks.names, [p.data for p in self.masks.params],
                [torch.ones_like(m) for m in self.masks.masks], self.ctx.generator)
        self.theta = [p.detach().clone() for p in self.masks.params]
        fwd, bwd = self.select()
        self.masks.masks = fwd
        self._set_backward(bwd)
        self.write_forward()
        return {
            "topkast/forward_density": self.forward_density,
            "topkast/backward_density": self.backward_density,
        }

    # --- per step -----------------------------------------------------------------------------
    def before_forward(self, step):
        if not self._params_hold_forward:
            self.write_forward()

    @torch.no_grad()
    def before_optimizer_step(self, step):
        grads, bwd, theta, scale = [], [], [], []
        for i, p in enumerate(self.masks.params):
            if p.grad is not None:
                grads.append(p.grad)
                bwd.append(self.backward[i])
                theta.append(self.theta[i])
                if self.exploration_l2 > 0:
                    scale.append(self.l2_scale[i])
        if grads:
            torch._foreach_mul_(grads, bwd)
            if self.exploration_l2 > 0:
                torch._foreach_add_(grads, torch._foreach_mul(theta, scale), alpha=self.exploration_l2)
            if self.norm_penalty > 0:
                self._add_norm_penalty(grads)
        params = [p.data for p in self.masks.params]
        torch._foreach_copy_(params, self.theta)
        torch._foreach_mul_(params, self.backward)  # the optimizer sees theta on B, 0 elsewhere
        self._params_hold_forward = False

    def _add_norm_penalty(self, grads: list[torch.Tensor]) -> None:
        """Gradient of GSE's term wd (||theta_A|| + ||theta_{B\\A}|| / D_l) + wd ||w|| (other weights)."""
        idx = [i for i, p in enumerate(self.masks.params) if p.grad is not None]
        theta = [self.theta[i] for i in idx]
        on_a = torch._foreach_mul(theta, [self.masks.masks[i] for i in idx])
        on_b = torch._foreach_mul(theta, [self.just_backward[i] for i in idx])
        for part, extra in ((on_a, None), (on_b, [self.inv_density[i] for i in idx])):
            scale = torch._foreach_clamp_min(torch._foreach_norm(part), 1e-12)
            torch._foreach_reciprocal_(scale)
            if extra is not None:
                torch._foreach_mul_(scale, extra)
            torch._foreach_add_(grads, torch._foreach_mul(part, scale), alpha=self.norm_penalty)
        others = [w for w in self.other_weights if w.grad is not None]
        if others:
            scale = torch._foreach_clamp_min(torch._foreach_norm(others), 1e-12)
            torch._foreach_reciprocal_(scale)
            torch._foreach_add_([w.grad for w in others], torch._foreach_mul(others, scale), alpha=self.norm_penalty)

    @torch.no_grad()
    def after_optimizer_step(self, step):
        params = [p.data for p in self.masks.params]
        torch._foreach_mul_(params, self.backward)  # (already 0 outside B: no grad, no momentum)
        torch._foreach_mul_(self.theta, self.outside)  # theta keeps its values outside B ...
        torch._foreach_add_(self.theta, params)  # ... and takes the updated ones on B
        self.masks.apply_()  # parameters = theta * 1_A
        self._params_hold_forward = True

    def on_step_end(self, step):
        if self.cadence.at_step(step):
            return self.update(step)
        if step < self.explore_end:  # the exploration phase: re-select after every step, logged at its end
            return self.update(step, log=step == self.explore_end - 1)
        return None

    # --- cost: forward and input gradients on A, weight gradients on B --------------------------
    STEP = Passes(forward="sparse", grad_input="sparse", grad_weight="backward")

    def step_passes(self, step):
        return self.STEP

    def weight_set(self, name):
        if name != "backward":
            return super().weight_set(name)
        return [k / n for k, n in zip(self.k_backward, self.masks.numels)]

    @torch.no_grad()
    def update(self, step: int, log: bool = True) -> dict | None:
        old_fwd = list(self.masks.masks)  # select() makes new masks: the old ones stay as they are
        old_bwd = self.backward
        fwd, bwd = self.select()
        if self.promote == "zero":  # entering A from B \ A: restart at 0 (GSE's topkast_training.py)
            promoted = [a & o_b & ~o_a for a, o_a, o_b in zip(fwd, old_fwd, old_bwd)]
            torch._foreach_mul_(self.theta, [~p for p in promoted])
        self.masks.masks = fwd
        self._set_backward(bwd)
        self.write_forward()
        self.reset_optimizer_state(self.outside)
        if not log:
            return None
        logs = mask_change_logs(self.masks.names, old_fwd, fwd)
        b_before = sum(int(b.sum()) for b in old_bwd)
        b_grown = sum(int((n & ~o).sum()) for n, o in zip(bwd, old_bwd))
        b_total = sum(int(b.sum()) for b in bwd)
        logs.update({
            "topkast/backward_density": b_total / sum(self.masks.numels),
            "topkast/backward_grown": b_grown,
            "topkast/backward_churn": b_grown / max(b_before, 1),
        })
        return logs

    # --- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["theta"] = [t.detach().cpu().clone() for t in self.theta]
        state["backward"] = [b.detach().cpu().clone() for b in self.backward]
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.theta = [t.to(device=p.device, dtype=p.dtype).clone() for t, p in zip(state["theta"], self.masks.params)]
        params = self.masks.params
        self._set_backward([b.to(device=p.device, dtype=torch.bool) for b, p in zip(state["backward"], params)])
        self.write_forward()
