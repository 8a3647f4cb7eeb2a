"""AC/DC: alternating compressed / decompressed training (Peste et al. 2021).

What the reference code (IST-DASLab/ACDC, ResNet-50 ImageNet configurations) does, step by step:

* Training starts dense (all masks True) for a warm-up of 10 epochs.
* Then it alternates 5-epoch compressed (sparse) and decompressed (dense) phases, sparse first:
  compress at epochs 10, 20, ..., 70, decompress at 15, 25, ..., 65; the phase 70-75 is sparse,
  75-85 dense, and the last 15 epochs (85-100) are sparse fine-tuning. Its 200-epoch
  configuration keeps the 5-epoch phases (compress 10..170 and 185, decompress 15..165 and 175).
* Compression (start of a sparse phase): a magnitude mask at the target sparsity computed from
  the current dense weights, with one global threshold over all prunable weights
  (``UnstructuredMagnitudePruner``; the uniform-sparsity checkpoints rank per layer).
* During a sparse phase the gradients of pruned weights are masked (gradient hooks) and the
  weights are re-masked after every optimizer step.
* Decompression (start of a dense phase): every mask becomes all ones; the pruned weights come
  back at exactly 0, and (``--reset_momentum_after_recycling``, set in all its run scripts) the
  optimizer's momentum buffer is zeroed before the next step, for every parameter.
* The run ends with the final sparse phase, so the model is sparse at the target.

This module does the same with these choices and differences:

* The phase pattern is ``acdc_phases`` (``sparsity/pruning_schedules.py``), built from the
  lengths ``warmup``, ``phase_length``, ``final_dense`` and ``final_sparse``, each a milestone
  (``{unit: fraction|epoch|step, value}``, see ``sparsity/schedules.py``) converted to optimizer
  steps. The defaults are the 100-epoch pattern as fractions of the run (0.1, 0.05, 0.1, 0.15),
  so the method runs on any ``schedule.epochs`` (``schedule.epochs=4``: phases of a few steps);
  the experiment files give the reference's epochs. An ``epoch`` length scales with
  ``schedule.multiplier`` like every epoch milestone; the reference's 200-epoch configuration
  (5-epoch phases filling the longer run) is a 200-epoch schedule with ``{unit: epoch, value: 5}``
  phases. A pattern that does not fit the run is a one-line error naming the fix.
* Masks are exact: ``round(density * N)`` weights stay active (global), or every layer at the
  same density with largest-remainder rounding (``scope: layer``); the reference thresholds at a
  percentile. So the run ends at the target density to the weight.
* ``momentum_reset``: ``all`` (default, the reference) zeroes the first-moment state (SGD
  momentum, Adam's exp_avg) of every parameter at decompression and all per-weight state of the
  restored weights; ``restored`` only resets the restored weights' state; ``none`` keeps it.
* Transitions happen after the optimizer step that ends a phase (for epoch lengths: after the
  last step of epoch ``b``, i.e. before epoch ``b`` of the reference's 0-based loop). A pattern
  starting sparse (``warmup`` 0) compresses the initial weights in ``setup()``.
* The reference can recompute batch-norm statistics after pruning (off in its scripts); not done.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import MISSING

from ... import schema as S
from ...errors import ConfigError
from ..ops import mask_change_logs
from ..pruning_schedules import DENSE, SPARSE, acdc_phases, phase_at
from .base import Method, register
from .gmp import magnitude_masks, mask_gradients
from .schemas import Milestone, scope

__all__ = ["ACDC", "acdc_phases"]


@dataclass
class ACDCSchema:
    """The options of ``method=acdc`` (their values: ``conf/method/acdc.yaml``)."""

    name: str = MISSING
    warmup: Milestone = MISSING
    phase_length: Milestone = MISSING
    final_dense: Milestone = MISSING
    final_sparse: Milestone = MISSING
    scope: str = scope()
    momentum_reset: str = S.choice(("all", "restored", "none"))


@register("acdc", schema=ACDCSchema)
class ACDC(Method):
    """Alternating dense and sparse (global magnitude) phases; ends sparse at `density`."""

    keeps_structure = True  # its compressed phases' masks keep it (its dense phases are dense)
    sparse_execution = "its dense phases train every weight"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.scope = cfg.scope
        self.momentum_reset = cfg.momentum_reset
        tl = ctx.timeline
        minimum = {"warmup": 0, "phase_length": 1, "final_dense": 0, "final_sparse": 1}
        lengths = {k: tl.length(cfg[k], f"method.{k}", minimum=low) for k, low in minimum.items()}
        try:
            self.phases = acdc_phases(ctx.total_steps, **lengths)
        except ValueError as e:
            raise ConfigError(
                f"method.warmup/phase_length/final_dense/final_sparse do not fit the {ctx.epochs}-epoch run of "
                f"{ctx.total_steps} steps ({e}); give them as fractions of the run, e.g. "
                f"method.warmup={{unit:fraction,value:0.1}}, or lengthen schedule.epochs") from None
        self.compress_at = frozenset(s for s, _, k in self.phases if k == SPARSE)
        self.decompress_at = frozenset(s for s, _, k in self.phases if k == DENSE and s > 0)
        self.sparse = False  # in a compressed phase now
        self.transitions = 0

    def phase(self, step_index: int) -> str:
        """'dense' or 'sparse' for the optimizer step of 0-based index `step_index`."""
        return phase_at(self.phases, step_index)

    # --- hooks --------------------------------------------------------------------------------
    def setup(self):
        spe = max(self.ctx.steps_per_epoch, 1)
        logs = {"acdc/phases": " ".join(f"{s / spe:g}-{e / spe:g}:{k[0]}" for s, e, k in self.phases)}
        if 0 in self.compress_at:
            logs.update(self.compress(0))
        return logs

    def before_optimizer_step(self, step):
        if self.sparse:
            mask_gradients(self.masks)

    def after_optimizer_step(self, step):
        if self.sparse:
            self.masks.apply_()

    def on_step_end(self, step):
        if step in self.compress_at and not self.sparse:
            return self.compress(step)
        if step in self.decompress_at and self.sparse:
            return self.decompress(step)
        return None

    def on_epoch_end(self, epoch, step):
        return {"acdc/sparse_phase": float(self.sparse)}

    # --- transitions --------------------------------------------------------------------------
    @torch.no_grad()
    def compress(self, step: int) -> dict:
        masks = self.masks
        old = [m.clone() for m in masks.masks]
        total = sum(masks.numels)
        keep = round(self.ctx.density * total)
        new = magnitude_masks([p.data for p in masks.params], old, keep, self.scope, masks.floor, self.structure)
        for i, m in enumerate(new):
            masks.masks[i] = m
        masks.apply_()
        self.sparse = True
        self.transitions += 1
        return {"acdc/event": step, "acdc/compress": 1.0, "acdc/target_density": keep / total,
                **mask_change_logs(masks.names, old, new), "density/achieved": keep / total}

    @torch.no_grad()
    def decompress(self, step: int) -> dict:
        masks = self.masks
        old = [m.clone() for m in masks.masks]
        restored = [~m for m in old]
        for p, r in zip(masks.params, restored):
            p.data.masked_fill_(r, 0)  # restored weights come back at exactly 0
        if self.momentum_reset == "all":
            for group in self.ctx.optimizer.param_groups:
                for p in group["params"]:
                    state = self.ctx.optimizer.state.get(p, {})
                    for key in ("momentum_buffer", "exp_avg"):
                        if torch.is_tensor(state.get(key)):
                            state[key].zero_()
        if self.momentum_reset != "none":
            self.reset_optimizer_state(restored)
        new = [torch.ones_like(m) for m in old]
        for i, m in enumerate(new):
            masks.masks[i] = m
        self.sparse = False
        self.transitions += 1
        return {"acdc/event": step, "acdc/compress": 0.0, "acdc/target_density": 1.0,
                **mask_change_logs(masks.names, old, new), "density/achieved": 1.0}

    # --- state --------------------------------------------------------------------------------
    def state_dict(self):
        state = super().state_dict()
        state["acdc"] = {"sparse": self.sparse, "transitions": self.transitions}
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        a = state.get("acdc", {})
        self.sparse = bool(a.get("sparse", not all(bool(m.all()) for m in self.masks.masks)))
        self.transitions = int(a.get("transitions", 0))
