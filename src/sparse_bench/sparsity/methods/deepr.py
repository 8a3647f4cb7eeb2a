"""DEEP R: deep rewiring (Bellec, Kappel, Maass & Legenstein 2018).

What the paper does, step by step, and what this module does the same way (the defaults):

* Every potential connection k has a fixed sign s_k in {-1, +1} and a parameter theta_k; it is
  active while theta_k >= 0 and then w_k = s_k * theta_k, otherwise dormant (w_k = 0). The
  number of active connections is fixed.
* Here the weight tensor itself holds w = s * theta (theta = s * w = |w| on active positions),
  the mask marks the active set, and the signs are method state (one bool tensor per layer,
  True = positive). Signs of the initially active connections are those of the initial weights;
  the other positions get a random sign, drawn once.
* After every optimizer step (a gradient step on the active weights: since s is fixed,
  d/dtheta = s * d/dw and the step on w is the step on theta), for every active connection:
      theta <- theta - lr * l1 + sqrt(2 * lr * T) * N(0, 1)
  (``l1`` is the paper's alpha, ``temperature`` its T, lr the current learning rate of the
  parameter's group; ``l1_mode: shrink``, ``noise_mode: weight``).
* An active connection whose theta became negative (its sign would flip) dies: mask off, weight 0.
* As many dormant connections as died are activated, uniformly at random among all dormant
  positions (one that just died may be drawn again unless ``exclude_pruned``), with theta = 0, so
  the new weight is exactly 0. Its sign is the position's fixed sign (``regrow_sign: fixed``), a
  fresh random sign (``random``) or the sign of its first update (``first_update``).
* The optimizer state (momentum, Adam moments) of connections that died or were activated is
  zeroed: a rewired connection starts from scratch.

DeepR as the DSR code in TimDettmers/sparse_learning runs it (``imagenet/baseline/main.py``,
``parameterized_tensors.py``; the sparse momentum paper's DeepR baseline; run scripts
``experiments/wrnet_experiments.yaml``, ``resnet_experiments.yaml``), all options of this module:

* The L1 term is part of the loss (``--L1-loss-coeff 1e-5``, ``l1_mode: loss``): its gradient
  l1 * sign(w) joins the loss gradient before the optimizer step, so it passes through momentum
  (Nesterov, 0.9) and the learning rate like the rest of the gradient.
* The noise is added to the gradient of the active weights before the optimizer step
  (``noise_mode: gradient``), with std sqrt(2 * eta * T) for a fixed ``eta`` = 0.01
  (``--DeepR_eta``), not the learning rate.
* T follows the schedule file (``temperature``: a piecewise schedule, 1e-5 / 1e-8 / 1e-12 / 1e-15
  from epochs 0/25/80/140 of 200 on WRN, 0/25/50/75 of 100 on ImageNet).
* A connection dies when its sign differs from its sign one step earlier; a new connection
  starts at 0 and takes the sign of its first update (``regrow_sign: first_update``).
  Reconnections are drawn among the dormant positions minus those that just died
  (``exclude_pruned: true``).
* Rewiring (death, rebirth and noise) stops at epoch 190 of 200 (WRN) or 95 of 100 (ImageNet)
  (``end``); the L1 term stays in the loss to the end. Weight decay 0 on WRN-28-2 (wd 1e-4 on
  ImageNet); its WRN keeps the stem conv and the classifier dense (``prunable.exclude``).

Where this differs from the references and why:

* The paper's reference keeps the *global* number of connections fixed and splits the
  reconnections between the weight matrices at random (a multinomial draw), and the DSR code's
  grows exactly as many per tensor as it pruned; here each layer regrows exactly as many as it
  lost, so every layer's count, and the global density, stay exact to the weight.
* New connections start at theta = 0 (the paper's reference uses 1e-12 so that "active" can be
  read off theta > 0); with an explicit mask, 0 works and the weight is exactly zero.
* The DSR code keeps the momentum of rewired connections; here it is zeroed.

Cost per step: no host sync. The dead count of a layer stays a device tensor. On an accelerator
the regrown positions are those of rank < dead_count in a random ordering of the dormant
positions (one sort of the layer's random scores per step), so no Python integer is ever needed.
On the CPU, where reading the count costs nothing, a top-k of the same scores picks the same
positions in time linear in the layer (the sort made a ResNet-50 step 2.3 s slower there). The per-step noise
comes from a device generator seeded once from the run's generator and saved in ``state_dict``,
so runs are reproducible and resume bit-identically without a CPU-to-device copy every step.
The temperature schedule is a function of the step counter (a Python float, no device read).
Logs (rewirings per layer, mask change) are gathered on the device and read once per epoch.

Under ``structure=nm|fan_in`` (not in the paper) each N:M group or output unit regrows as many
dormant connections as it lost, at random within it (``Structure.regrow`` on the same random
scores, so ``exclude_pruned`` still ranks the just-dead last), so the structure holds after every
step; the per-group selection reads counts on the host. ``structure=block`` is refused: a
connection dies alone when its own theta turns negative, so a block could not stay whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from omegaconf import MISSING, OmegaConf

from ... import schema as S
from ...errors import ConfigError
from ..ops import mask_change_logs
from .base import Method, end_step, register
from .dense import RandomInitMixin
from .schemas import Milestone, init, milestone, reinit, temperature


def _cpu_state(state: torch.Tensor) -> torch.Tensor:
    return state.detach().to("cpu", torch.uint8)


@dataclass
class DeepRSchema:
    """The options of ``method=deepr`` (their values: ``conf/method/deepr.yaml``)."""

    name: str = MISSING
    init: str = init()
    reinit: str = reinit()
    l1: float = S.num(ge=0.0)
    l1_mode: str = S.choice(("shrink", "loss"))
    temperature: Any = temperature()
    noise_mode: str = S.choice(("weight", "gradient"))
    eta: float = S.num(ge=0.0)
    regrow_sign: str = S.choice(("fixed", "random", "first_update"))
    exclude_pruned: bool = MISSING
    end: Optional[Milestone] = milestone()


@register("deepr", schema=DeepRSchema)
class DeepR(RandomInitMixin, Method):
    """Sign-constrained connections with an L1 shrink and noise; dying ones are replaced at random."""

    sparse_execution = "it rewires connections after every optimizer step, on dense weights and signs"
    keeps_structure = True  # nm and fan_in: each group regrows its dead at random (blocks refused)

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        if self.structure.kind == "block":  # connections die one by one: a block cannot die whole
            raise ConfigError("structure=block: method=deepr's connections die one at a time, so it keeps no "
                              "blocks; use structure=nm or structure=fan_in with it, or another method")
        self.l1 = cfg.l1
        temperature = cfg.temperature  # a number or a schedule (both checked by the schema)
        if OmegaConf.is_config(temperature) or isinstance(temperature, dict):
            self.temperature_schedule = ctx.timeline.piecewise(temperature, "method.temperature")
        else:
            self.temperature_schedule = None
            self.temperature = float(temperature)
        self.regrow_sign = cfg.regrow_sign
        self.l1_mode = cfg.l1_mode
        self.noise_mode = cfg.noise_mode
        self.eta = cfg.eta
        self.exclude_pruned = cfg.exclude_pruned
        self.end = end_step(cfg, ctx)
        device = ctx.device
        # the per-step generator lives on the device; its seed comes from the run's generator
        self.step_generator = torch.Generator(device=device)
        seed = int(torch.randint(0, 2**62, (1,), generator=ctx.generator))
        self.step_generator.manual_seed(seed)
        # how the regrown positions are picked (`_highest`): one sort per layer and step where
        # reading a count from the device would stall it, a top-k of the count on the CPU
        self.sort_draw = torch.device(device).type != "cpu"
        self.signs = [torch.ones_like(m) for m in self.masks.masks]  # True = positive
        # first_update: positions born without a sign yet (they take the sign of their first update)
        self.unsigned = [torch.zeros_like(m) for m in self.masks.masks]
        # index of each prunable parameter's optimizer group (indices survive the optimizer's
        # load_state_dict, which replaces the group dicts)
        self._group_index = []
        for p in self.masks.params:
            idx = next((j for j, g in enumerate(ctx.optimizer.param_groups) if any(q is p for q in g["params"])), None)
            if idx is None:
                raise ValueError("deepr: a prunable parameter is not in the optimizer")
            self._group_index.append(idx)
        self._reset_epoch_stats()

    # --- life cycle -------------------------------------------------------------------------
    def setup(self):
        logs = self.init_random_masks()
        for i, (p, m) in enumerate(zip(self.masks.params, self.masks.masks)):
            random_sign = torch.rand(p.shape, generator=self.ctx.generator).to(p.device) < 0.5
            self.signs[i] = torch.where(m & (p.data != 0), p.data > 0, random_sign)
        self._reset_epoch_stats()
        return logs

    def _reset_epoch_stats(self) -> None:
        self.epoch_start_masks = [m.clone() for m in self.masks.masks]
        self.rewired = torch.zeros(len(self.masks.masks), dtype=torch.long, device=self.masks.masks[0].device)

    def temperature_at(self, step: int) -> float:
        """T in force for optimizer step `step` (0-based), from the schedule or the constant."""
        if self.temperature_schedule is not None:
            return float(self.temperature_schedule.value_at(step))
        return self.temperature

    @torch.no_grad()
    def before_optimizer_step(self, step: int) -> None:
        """The DSR code's variants: L1 through the loss gradient, noise on the gradient."""
        rewiring = step < self.end
        loss_l1 = self.l1_mode == "loss" and self.l1 > 0
        temp = self.temperature_at(step)
        grad_noise = rewiring and self.noise_mode == "gradient" and temp > 0
        if not (loss_l1 or grad_noise):
            return
        std = math.sqrt(2.0 * self.eta * temp)
        for p, m in zip(self.masks.params, self.masks.masks):
            if p.grad is None:
                continue
            if loss_l1:  # d(l1 * sum |w|)/dw; 0 on inactive weights (w = 0)
                p.grad.add_(torch.sign(p.data), alpha=self.l1)
            if grad_noise:
                noise = torch.randn(p.shape, generator=self.step_generator, device=p.device, dtype=p.dtype)
                p.grad.add_(noise.mul_(m), alpha=std)

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """The DEEP R update after the gradient step: shrink, noise, death, random rebirth."""
        masks = self.masks
        if step >= self.end:  # rewiring has stopped: a static sparse network from here on
            masks.apply_()
            return
        dead_all, born_all, counts = [], [], []
        temp = self.temperature_at(step)
        for i, (p, m) in enumerate(zip(masks.params, masks.masks)):
            w = p.data
            pos = self.signs[i]
            if self.regrow_sign == "first_update":  # a new connection takes the sign of its first update
                fresh = self.unsigned[i]
                pos = torch.where(fresh & (w != 0), w > 0, pos)
                self.unsigned[i] = fresh & (w == 0)
                self.signs[i] = pos
            lr = float(self.ctx.optimizer.param_groups[self._group_index[i]]["lr"])
            theta = torch.where(pos, w, -w)
            if self.l1_mode == "shrink":
                theta.sub_(lr * self.l1)
            if self.noise_mode == "weight" and temp > 0:
                noise = torch.randn(w.shape, generator=self.step_generator, device=w.device, dtype=w.dtype)
                theta.add_(noise, alpha=math.sqrt(2.0 * lr * temp))
            dead = m & (theta < 0)
            alive = m & ~dead
            n_dead = dead.sum()
            # activate n_dead dormant positions uniformly at random: the n_dead highest of random
            # scores over the dormant positions (active ones score lowest)
            scores = torch.rand(w.shape, generator=self.step_generator, device=w.device)
            scores = scores.masked_fill_(alive, -1.0)
            if self.exclude_pruned:  # just-dead positions rank after every other dormant one
                scores = scores.masked_fill_(dead, -0.5)
            if self.structure.active:  # each N:M group / unit regrows its dead, at random within it
                born = self.structure.regrow(scores, m, alive, blocked=alive)
            else:
                born = self._highest(scores, n_dead)
            if self.regrow_sign == "random":
                fresh = torch.rand(w.shape, generator=self.step_generator, device=w.device) < 0.5
                pos = torch.where(born, fresh, pos)
                self.signs[i] = pos
            elif self.regrow_sign == "first_update":
                self.unsigned[i] = (self.unsigned[i] & ~dead) | born
            new_mask = alive | born
            # alive: w = s * theta; born: theta = 0; dormant: 0
            w.copy_(torch.where(alive, torch.where(pos, theta, -theta), torch.zeros_like(theta)))
            masks.masks[i] = new_mask
            dead_all.append(dead)
            born_all.append(born)
            counts.append(n_dead)
        self.reset_optimizer_state([d | b for d, b in zip(dead_all, born_all)])
        self.rewired += torch.stack(counts)
        self.last_step = {"dead": dead_all, "born": born_all}

    def _highest(self, scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The mask of the k highest scores, k a 0-d device tensor. On the CPU reading k costs
        nothing, and a top-k (linear in the layer, k is small) picks them; on an accelerator a
        read would stall the pipeline every step, so the positions ranked below k in one sort of
        the layer are taken instead. Both give the same positions for the same scores."""
        flat = scores.flatten()
        if not self.sort_draw:
            born = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
            n = int(k)
            if n:
                born[torch.topk(flat, n, sorted=False).indices] = True
            return born.view_as(scores)
        order = torch.argsort(flat, descending=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        return (rank < k).view_as(scores)

    def on_epoch_end(self, epoch, step):
        rewired = [int(x) for x in self.rewired.cpu().tolist()]
        logs = {
            "deepr/rewired": sum(rewired),
            "deepr/rewired_per_step": sum(rewired) / max(self.ctx.steps_per_epoch, 1),
            **mask_change_logs(self.masks.names, self.epoch_start_masks, self.masks.masks),
        }
        for name, r in zip(self.masks.names, rewired):
            logs[f"deepr/rewired/{name}"] = r
        self._reset_epoch_stats()
        return logs

    # --- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["signs"] = [s.detach().cpu().clone() for s in self.signs]
        state["unsigned"] = [s.detach().cpu().clone() for s in self.unsigned]
        state["step_generator"] = _cpu_state(self.step_generator.get_state())
        state["epoch_start_masks"] = [m.detach().cpu().clone() for m in self.epoch_start_masks]
        state["rewired"] = self.rewired.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        state["generator"] = _cpu_state(state["generator"])
        super().load_state_dict(state)
        self.signs = [s.to(device=m.device, dtype=torch.bool) for s, m in zip(state["signs"], self.masks.masks)]
        self.unsigned = [s.to(device=m.device, dtype=torch.bool)
                         for s, m in zip(state.get("unsigned", [torch.zeros_like(m) for m in self.masks.masks]),
                                         self.masks.masks)]
        self.step_generator.set_state(_cpu_state(state["step_generator"]))
        self.epoch_start_masks = [s.to(device=m.device, dtype=torch.bool)
                                  for s, m in zip(state["epoch_start_masks"], self.masks.masks)]
        self.rewired = state["rewired"].to(self.masks.masks[0].device)
