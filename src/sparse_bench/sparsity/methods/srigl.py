"""SRigL: RigL with constant fan-in and neuron ablation (Lasby et al. 2023, "Dynamic Sparse
Training with Structured Sparsity").

What the reference code (calgaryml/condensed-sparsity, ``src/rigl_torch/rigl_constant_fan.py``,
``RigLConstFanScheduler``, over ``rigl_scheduler.py`` and ``utils/rigl_utils.py``) does at one
update of one layer, and this module with it:

* RigL's cadence and drop fraction: every ``delta`` steps until T_end = 0.75 of training,
  alpha_t = alpha / 2 (1 + cos(pi t / T_end)) with alpha 0.3 (``configs/config.yaml``; delta 100
  and one gradient batch for CIFAR, ``configs/rigl/resnet18.yaml``); n_prune = int(alpha_t nnz),
  n_keep = nnz - n_prune (fewer if the layer has fewer nonzero weights).
* The layer's target count T = int(numel x ERK density) is fixed; initially every output unit
  gets T // units random inputs (``random_sparsify``; ``structure.Structure.capacity``).
* Salience (``_get_neurons_to_ablate``): the union of the n_keep largest |w| and the n_prune
  largest |dense gradient| over the layer (active or not); a unit with fewer salient weights
  than max(1, int(gamma_sal x (T // units))) is ablated (``min_salient_weights_per_neuron``,
  0.3), the threshold lowered if it would leave fewer than T // dense fan-in units. The output
  layer is never ablated (``no_ablation_module_names: [fc]`` in the model configs).
* The fan-in of the units kept is T // (units - ablated) (``get_fan_in_after_ablation``).
* Drop: the n_keep largest |w| over the layer stay, ablated units' weights first to go; a unit
  left with more than the new fan-in keeps its largest |w| (the reference truncates in an
  arbitrary order: it sorts the boolean mask).
* Grow: each live unit grows, by largest |dense gradient| among its inactive positions (just
  dropped ones included), exactly what it lacks to the fan-in; ablated units grow nothing.
  Grown weights start at 0 with zero momentum; a unit ablated at one update can come back at a
  later one (salience is recomputed from scratch each time).

Not reproduced: the reference re-initialises the sparse weights at the start
(``init_method_str: grad_flow_init``, with 2 / fan-in passed as the standard deviation); here
``reinit`` keeps RigL's options (none by default). Its gradient accumulation over several batches
(8 on ImageNet) is ``stat_batches`` here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import schema as S
from ...errors import ConfigError
from ..distributions import layer_counts
from ..ops import fill_at_, topk_indices
from .base import register
from .drop_grow import Update
from .rigl import RigL, RigLSchema


@dataclass
class SRigLSchema(RigLSchema):
    """The options of ``method=srigl`` (their values: ``conf/method/srigl.yaml``)."""

    ablation: bool = S.keyed(role=S.RECIPE)
    min_salient_weights_per_neuron: float = S.num(ge=0.0, hint="the reference's gamma_sal is 0.3 (a fraction of "
                                                                "the fan-in below 1, a count from 1)")


@register("srigl", schema=SRigLSchema)
class SRigL(RigL):
    keeps_structure = True
    empty_units = True  # ablated units have no inputs

    def __init__(self, cfg, ctx):
        if ctx.structure.kind != "fan_in":
            raise ConfigError(f"method=srigl keeps a constant fan-in, not structure={ctx.structure.kind}; pass "
                              f"structure=fan_in")
        if cfg.scope != "layer":
            raise ConfigError("method.scope=global with method=srigl: SRigL updates each layer on its own; "
                              "use method.scope=layer")
        super().__init__(cfg, ctx)
        self.ablation = bool(cfg.ablation)
        self.gamma = float(cfg.min_salient_weights_per_neuron)
        # each layer's target count, fixed for the run (the initial fan-in is its floor per unit)
        self.targets = layer_counts(self.masks.shapes, ctx.density, cfg.init, self.masks.names)

    # --- one update ---------------------------------------------------------------------------
    def _ablated(self, i: int, w: torch.Tensor, g: torch.Tensor, n_keep: int, n_prune: int) -> torch.Tensor:
        """Bool per output unit: too few salient weights (never in the output layer)."""
        units = w.shape[0]
        none = torch.zeros(units, dtype=torch.bool, device=w.device)
        if not self.ablation or self.gamma == 0 or i == len(self.masks) - 1:
            return none
        salient = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
        fill_at_(salient, topk_indices(w.reshape(-1), n_keep), True)
        fill_at_(salient, topk_indices(g.reshape(-1), n_prune), True)
        counts = salient.reshape(units, -1).sum(1)
        target, dense_fan_in = self.targets[i], w[0].numel()
        threshold = self.gamma if self.gamma >= 1 else max(1, int(self.gamma * (target // units)))
        fewest = target // dense_fan_in  # units that must stay for the fan-in to fit
        if fewest < units:
            threshold = min(threshold, int(counts.sort(descending=True).values[fewest]))
        return counts < threshold

    def drop(self, u: Update) -> list[torch.Tensor]:
        grads = self.grow_scores(u)
        dropped, deficits, ablated_counts = [], [], []
        for i, (p, old, k, g) in enumerate(zip(self.masks.params, u.old, u.nnz, grads)):
            w = p.detach().abs()
            units = w.shape[0]
            n_prune = min(int(u.rate * k), k)
            n_keep = min(k - n_prune, int(torch.count_nonzero(w * old)))
            ablated = self._ablated(i, w, g, n_keep, k - n_keep)
            fan_in = max(1, self.targets[i] // max(units - int(ablated.sum()), 1))
            score = w.masked_fill(ablated.view(-1, *[1] * (w.dim() - 1)), float("-inf"))
            active = old.reshape(-1).nonzero().squeeze(1)
            keep = fill_at_(torch.zeros_like(old), active[topk_indices(score.reshape(-1)[active], n_keep)], True)
            # a unit left with more than the fan-in keeps its largest |w|; an ablated one nothing
            limit = torch.where(ablated, 0, fan_in)
            keep = self.structure.fill(w, ~keep, limit)
            dropped.append(old & ~keep)
            deficits.append(limit - self.structure.groups(keep).sum(1))
            ablated_counts.append(int(ablated.sum()))
        u.extra.update(grads=grads, deficits=deficits, ablated=ablated_counts)
        return dropped

    def grow(self, u: Update) -> list[torch.Tensor]:
        return [self.structure.fill(g, a, d) for g, a, d in zip(u.extra["grads"], u.after, u.extra["deficits"])]

    def record(self, u: Update) -> dict:
        return {**super().record(u), "ablated": u.extra["ablated"]}

    def method_logs(self, u: Update) -> dict:
        logs = super().method_logs(u)
        logs["srigl/ablated"] = sum(u.extra["ablated"])
        for name, n in zip(self.masks.names, u.extra["ablated"]):
            logs[f"srigl/ablated/{name}"] = n
        return logs
