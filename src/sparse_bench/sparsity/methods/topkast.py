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

* ``backward_density`` default (null) = min(1, 2 * forward density): the paper's pairs of
  90%/80% and 95%/90% forward/backward sparsity.
* ``exploration_l2`` default 0 (off): the paper's coefficient is not a fixed number; the
  optimizer's own weight decay still applies to all of B.
* Weights entering A from B \\ A keep their trained value (there is no "grow at zero" here: the
  forward value of a weight is always theta).
"""

from __future__ import annotations

import torch

from ...errors import ConfigError
from ..distributions import layer_counts
from ..ops import mask_change_logs
from ..schedules import UpdateCadence
from .base import Method, register


@register("topkast")
class TopKAST(Method):
    sparse_execution = "it keeps dense parameters theta and a backward set larger than the forward set"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        fd = cfg.get("forward_density", None)
        self.forward_density = float(ctx.density if fd is None else fd)
        if not 0.0 < self.forward_density <= 1.0:
            raise ConfigError(f"method.forward_density={fd} must be in (0, 1]; leave it null to use density")
        bd = cfg.get("backward_density", None)
        self.backward_density = float(min(1.0, 2.0 * self.forward_density) if bd is None else bd)
        if not self.forward_density <= self.backward_density <= 1.0:
            raise ConfigError(
                f"method.backward_density={bd} must be in [forward density {self.forward_density}, 1]; "
                f"leave it null for min(1, 2 * density)"
            )
        self.exploration_l2 = float(cfg.get("exploration_l2", 0.0))
        if self.exploration_l2 < 0:
            raise ConfigError(f"method.exploration_l2={self.exploration_l2} must be >= 0 (0 turns it off)")
        every = cfg.get("update_every", 100)
        if isinstance(every, bool) or not str(every).isdigit() or int(every) <= 0:
            raise ConfigError(f"method.update_every={every} must be a positive number of steps, e.g. 100")
        self.cadence = UpdateCadence(int(every), ctx.total_steps)
        shapes = self.masks.shapes
        self.k_forward = layer_counts(shapes, self.forward_density, "uniform")
        k_back = layer_counts(shapes, self.backward_density, "uniform")
        self.k_backward = [max(b, f) for b, f in zip(k_back, self.k_forward)]
        self.theta = [p.detach().clone() for p in self.masks.params]
        self.backward = [torch.ones_like(m) for m in self.masks.masks]
        self.outside = [~b for b in self.backward]
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
        return fwd, bwd

    def _set_backward(self, bwd: list[torch.Tensor]) -> None:
        self.backward = bwd
        self.outside = [~b for b in bwd]
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
        params = [p.data for p in self.masks.params]
        torch._foreach_copy_(params, self.theta)
        torch._foreach_mul_(params, self.backward)  # the optimizer sees theta on B, 0 elsewhere
        self._params_hold_forward = False

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
        return None

    @torch.no_grad()
    def update(self, step: int) -> dict:
        old_fwd = [m.clone() for m in self.masks.masks]
        old_bwd = self.backward
        fwd, bwd = self.select()
        self.masks.masks = fwd
        self._set_backward(bwd)
        self.write_forward()
        self.reset_optimizer_state(self.outside)
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
