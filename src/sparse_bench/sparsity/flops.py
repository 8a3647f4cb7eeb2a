"""Training and inference FLOPs per run, counted by RigL's convention (Evci et al. 2020, App. H;
google-research/rigl: ``rigl/sparse_utils.py`` ``get_stats`` and its ResNet-50 counting colab).

The convention:

* One multiply-add is 2 FLOPs. A layer's dense forward cost per sample ``F_l`` is what
  ``torch.utils.flop_counter.FlopCounterMode`` reports for it on one sample (2 x its
  multiply-adds); at density ``d_l`` it costs ``d_l F_l`` (activations stay dense). Operations
  without a prunable weight (attention's matrix products, a dense layer kept out of the mask)
  cost the same at any density. Batch norm, activations, the loss, the mask updates'
  bookkeeping and the one-off scoring passes of SNIP / GraSP / SynFlow at initialisation are
  not counted (RigL counts SNIP like static training too).
* The backward pass costs 2x the forward: one pass for the input gradients, one for the weight
  gradients. A training step is therefore three passes, each at the density of the weights it
  touches: dense training ``3 f_D``; static / SET / SNIP / DeepR / DSR ``3 f_S``; sparse momentum
  (SNFS) ``2 f_S + f_D`` (its growth signal is the dense gradient's momentum, every step); RigL
  ``2 f_S + f_D`` on the step before each mask update and ``3 f_S`` otherwise, i.e.
  ``(3 f_S dT + 2 f_S + f_D) / (dT + 1)`` on average (the paper's form, to within one step per
  period); dense-to-sparse methods (GMP, AC/DC, lottery tickets) pay ``3 f_S(t)`` with the masks
  of the moment, so their cost integrates over their density schedule.
* What a step runs is stated by the method itself (``Method.step_passes`` and
  ``Method.update_cost`` in ``sparsity/methods/base.py``, overridden next to each method's
  algorithm): this module only does the arithmetic.

``flops/train_total`` is the FLOPs of every training step of the run (training samples only; the
evaluation passes are not counted). ``flops/train_multiple`` divides it by the FLOPs of dense
training over the *base* schedule (``schedule.epochs`` epochs, before ``schedule.multiplier``,
one round), so RigL 5x reads as RigL's "5x" rows do (e.g. 1.14x for uniform 80%).
``flops/test_multiple`` is the inference cost per sample with the final masks, against dense.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger("sparse_bench")

SPARSE = "sparse"  # the active weights (the mask)
DENSE = "dense"    # every weight, as if the layer were dense

WeightSet = str | Sequence[float]  # a name, or per-layer densities


@dataclass(frozen=True)
class Passes:
    """One training step: the forward pass, the input-gradient pass and the weight-gradient pass,
    each at the density of a weight set (``"sparse"``, ``"dense"``, or a name the method resolves in
    ``Method.weight_set``)."""

    forward: str = SPARSE
    grad_input: str = SPARSE
    grad_weight: str = SPARSE


SPARSE_STEP = Passes()
DENSE_STEP = Passes(DENSE, DENSE, DENSE)
DENSE_GRADIENT_STEP = Passes(SPARSE, SPARSE, DENSE)  # SNFS every step, RigL before an update


@dataclass(frozen=True)
class Extra:
    """Work a mask update adds to training: ``passes`` forward-sized passes over ``samples`` samples,
    at weight set ``weights`` (a name, or one density per prunable layer)."""

    samples: int
    weights: WeightSet
    passes: float = 1.0


#: modules whose whole forward cost is their weight's (so a weight at density d costs d of it): what
#: the counter can attribute to a prunable tensor, whatever the prunable rule selects
_WEIGHT_BOUND = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LayerFlops:
    """Dense forward FLOPs per sample: of each prunable tensor (``per_layer``, in the order of
    ``names``) and of the whole model (``total``)."""

    def __init__(self, names: Sequence[str], per_layer: Sequence[float], total: float,
                 unattributed: Sequence[str] = ()):
        self.names = list(names)
        self.per_layer = [float(f) for f in per_layer]
        self.total = float(total)
        self.unattributed = list(unattributed)
        if len(self.names) != len(self.per_layer):
            raise ValueError("one FLOP count per prunable tensor expected")
        if sum(self.per_layer) > self.total * (1 + 1e-9):
            raise ValueError("the prunable layers cannot cost more than the whole model")

    @classmethod
    def from_model(cls, model: nn.Module, input_shape: Sequence[int], names: Sequence[str],
                   device: torch.device | None = None) -> LayerFlops:
        """Count one forward pass of one sample (zeros) in eval mode; the model is left as it was.

        A prunable tensor that is not the ``weight`` of a Linear or Conv module (``prunable.include``
        extras) cannot be attributed: its FLOPs stay in the dense part of the total, so the
        multiples are upper bounds, and the names are listed in ``unattributed``. The pass runs
        with autograd on (nothing is backpropagated): in eval mode without it,
        ``nn.MultiheadAttention`` takes a fused fast path the counter does not see.
        """
        from torch.utils.flop_counter import FlopCounterMode

        if device is None:
            p = next(iter(model.parameters()), None)
            device = p.device if p is not None else torch.device("cpu")
        modules = dict(model.named_modules())
        root = type(model).__name__
        was_training = model.training
        model.eval()
        try:
            with FlopCounterMode(display=False) as counter, torch.enable_grad():
                model(torch.zeros((1, *input_shape), device=device))
        finally:
            model.train(was_training)
        counts = counter.get_flop_counts()
        per_layer, unattributed = [], []
        for name in names:
            mod_name, _, attr = name.rpartition(".")
            mod = modules.get(mod_name)
            fqn = f"{root}.{mod_name}" if mod_name else root
            if attr == "weight" and isinstance(mod, _WEIGHT_BOUND) and fqn in counts:
                per_layer.append(float(sum(counts[fqn].values())))
            else:
                per_layer.append(0.0)
                unattributed.append(name)
        return cls(names, per_layer, float(counter.get_total_flops()), unattributed)

    def forward(self, densities: Sequence[float]) -> float:
        """Forward FLOPs per sample with layer l at density ``densities[l]``."""
        return self.total - sum((1.0 - d) * f for d, f in zip(densities, self.per_layer))

    def dense_train_step(self) -> float:
        """Dense training FLOPs per sample: 3 forward passes."""
        return 3.0 * self.total


class FlopMeter:
    """Integrates a run's training FLOPs over its steps and masks.

    The trainer calls ``step(step, samples)`` for every optimizer step (plain arithmetic, no host
    sync) and ``update(step)`` after every hook that changed the masks (one count of the masks).
    The totals are part of the trainer's checkpoint, so a resumed run counts exactly what an
    uninterrupted one does.
    """

    def __init__(self, layers: LayerFlops, method):
        self.layers = layers
        self.method = method
        self.train_total = 0.0
        self.samples = 0
        self._densities: list[float] | None = None
        self._cost: dict = {}

    # --- densities ----------------------------------------------------------------------------
    def refresh(self) -> None:
        masks = getattr(self.method, "masks", None)
        if masks is None:
            self._densities = [1.0] * len(self.layers.names)
        else:
            self._densities = [k / n for k, n in zip(masks.nnz(), masks.numels)]
        self._cost.clear()

    @property
    def densities(self) -> list[float]:
        if self._densities is None:
            self.refresh()
        return self._densities

    def weights(self, which: WeightSet) -> list[float]:
        if not isinstance(which, str):
            return [float(d) for d in which]
        if which == SPARSE:
            return self.densities
        if which == DENSE:
            return [1.0] * len(self.layers.names)
        return [float(d) for d in self.method.weight_set(which)]

    def pass_flops(self, which: WeightSet) -> float:
        """One forward-sized pass per sample at weight set `which`."""
        return self.layers.forward(self.weights(which))

    def step_flops(self, passes: Passes) -> float:
        """One training step per sample."""
        cost = self._cost.get(passes)
        if cost is None:
            self.densities  # noqa: B018 - counts the masks once after a change
            cost = sum(self.pass_flops(w) for w in (passes.forward, passes.grad_input, passes.grad_weight))
            self._cost[passes] = cost
        return cost

    # --- what the trainer calls -----------------------------------------------------------------
    def step(self, step: int, samples: int) -> None:
        """Training step `step` (0-based) ran on `samples` samples."""
        self.train_total += self.step_flops(self.method.step_passes(step)) * samples
        self.samples += samples

    def update(self, step: int) -> None:
        """A hook changed the masks after `step` steps: add the update's own passes (run with the
        masks before the change), then count the new masks."""
        for extra in self.method.update_cost(step) or ():
            self.train_total += extra.passes * self.pass_flops(extra.weights) * extra.samples
        self.refresh()

    def summary(self, epochs_done: int, base_epochs: int) -> dict:
        """The run's FLOP figures (see the module docstring)."""
        f_d = self.layers.total
        dense_per_sample = self.layers.dense_train_step()
        out = {"flops/train_total": self.train_total, "flops/dense_forward": f_d,
               "flops/test_forward": self.pass_flops(SPARSE),
               "flops/test_multiple": self.pass_flops(SPARSE) / f_d if f_d > 0 else None}
        if self.samples > 0 and dense_per_sample > 0 and epochs_done > 0:
            dense_1x = dense_per_sample * self.samples * base_epochs / epochs_done
            out["flops/train_multiple"] = self.train_total / dense_1x
        else:
            out["flops/train_multiple"] = None
        return out

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"train_total": self.train_total, "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        self.train_total = float(state.get("train_total", 0.0))
        self.samples = int(state.get("samples", 0))
        self._densities = None
        self._cost.clear()


def build_meter(model: nn.Module, input_shape, method, device=None) -> FlopMeter | None:
    """A FlopMeter for `method` on `model`, or None (one log line why) when the model cannot be
    counted on a zero input of `input_shape`."""
    names = list(method.masks.names) if getattr(method, "masks", None) is not None else []
    try:
        layers = LayerFlops.from_model(model, input_shape, names, device)
    except Exception as exc:  # a model the counter cannot trace must not stop training
        log.info(f"flops: not counted ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})")
        return None
    if layers.unattributed:
        log.info(f"flops: {', '.join(layers.unattributed)} are not Linear/Conv weights; counted dense")
    return FlopMeter(layers, method)
