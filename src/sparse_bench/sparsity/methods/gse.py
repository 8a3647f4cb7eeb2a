"""Always-sparse training with guided stochastic exploration (GSE; Heddes et al. 2024).

What the reference (mikeheddes/guided-stochastic-exploration, ``our_training.py``, ``grow.py``,
``prune.py``, ``layers.py``) does, step by step, and what this module does:

* Masks: Erdos-Renyi per layer (density_l proportional to (fan_in + fan_out) / (fan_in *
  fan_out), fan_in = C_in*kh*kw) over every Linear and Conv2d weight (``init: er``). Active
  weights are re-initialised U(-1, 1) * sqrt(3 / sparse fan-in of their output unit), the
  sparse fan-in being that unit's number of active inputs (at least 1); the bias of the unit is
  drawn with the same bound (``reinit: fan_in``).
* Every ``update_every`` (1000) optimizer steps while the step is before ``end`` (the milestone
  T_end; default ``{unit: fraction, value: 0.6}``, epoch 120 of 200; the experiment files give
  ``{unit: epoch, value: 120}``), with ``alpha_t = alpha (1 + cos(pi t / T_end))`` (alpha 0.1,
  so at most 0.2 of the active connections change per update):
  1. Per layer, ``round(gamma * |A_l|)`` (gamma 1) pairs ``(output unit i, input unit j)`` are
     drawn with replacement, i from g over outputs and j from f over inputs (``sampling``):
     ``uniform`` both uniform (the paper's headline method); ``grabo`` f_j ~ sum_r |x_rj|,
     g_i ~ sum_r |delta_ri|; ``graest`` f_j ~ |sum_r s_r x_rj|, g_i ~ |sum_r s_r delta_ri| with a
     random sign s_r per row, shared by inputs and outputs. Rows are the statistics batches'
     samples; for a conv every output position of every sample is a row (its input the image
     patch). Draws that hit an active connection and duplicates are dropped. A layer already at
     least ``all_candidates_density`` (0.5) dense takes all its inactive connections as
     candidates instead, as the reference does.
  2. The loss gradient is computed for the candidates only: ``g_ij = sum_r delta_ri x_rj``
     (``candidate_grad.candidate_gradients``, unfolded patches for convs, in bounded blocks).
  3. ``k = min(ceil(alpha_t |A|), |S|)`` candidates of largest |gradient| are grown (weights
     start at exactly 0, their optimizer momentum is zeroed, as the reference's
     ``reset_momentum``) and the ``k`` active weights of smallest |w| (among those active
     before this update, so never one just grown) are pruned. With ``scope: global`` (the
     reference's default) gradients and magnitudes are ranked across all layers, so layer
     densities move while the total stays exact; ``scope: layer`` ranks within each layer.
* Statistics come from ``stat_batches`` (1) training batches (the reference takes
  ceil(10 samples per class / batch size) batches: one batch of 128 on CIFAR-10, 8 on
  CIFAR-100), drawn fresh at every update from their own seeded stream (``ctx.batches(n,
  step)``), as the reference takes them from a new iterator of its shuffled loader; the epoch in
  progress is never disturbed and a resumed run draws the same batches.

Where this implementation differs, and why:

* The reference simulates the method: it computes the dense gradient of every layer and hides
  the non-sampled entries. Here the dense weight gradient is never formed. On update steps
  only, forward hooks on the prunable modules capture each layer's input and output for the
  statistics batches; ``torch.autograd.grad(loss, outputs)`` then yields the output gradients
  delta without computing (or touching) any parameter's ``.grad``, and the candidates'
  gradients are evaluated directly from those rows. The hooks return a copy of the output, so
  an in-place op after the layer (``ReLU(inplace=True)``) cannot alter the captured graph
  (full backward hooks fail on such models, and ``loss.backward()`` would compute the dense
  weight gradients). The hooks are removed after the pass, parameters' ``.grad`` stay what the
  trainer left, buffers (batch-norm running statistics) are restored and the global RNG is
  forked (``statistics.quiet_pass``), so the extra pass leaves no trace on training (the
  reference's pass in train mode also moves the batch-norm running statistics).
* Pruning ranks the |w| of the active weights only (gathered), not a dense score tensor.
* Masks hit the target density exactly (the reference's Bernoulli masks and ER clipping are
  exact only in expectation) and k is ``ceil(alpha_t |A|)`` rather than the reference's
  integer truncation of ``|A| (1 + alpha_t)``.
* GraEst's random signs are drawn from the run's generator (the reference hashes the row index
  with a 4-wise independent hash); for convs the reference sums only the first sample's output
  gradients in g (an indexing slip), here every row counts, as the paper defines it.
* With ``stat_batches > 1`` and a guided sampler the statistics batches are run twice (first
  for f and g, then for the candidates' gradients) under the same per-batch seeds, so memory
  holds one batch's activations at a time.
* The update runs after optimizer step t (the reference runs it before step t + 1: the same
  weights).

Under ``structure=nm|fan_in|block`` (``sparsity.structure``; GSE's paper has no structure): the
pruning selects as above, then, layer by layer, a block structure makes the drop whole blocks
(``Structure.whole_drops``) and every group (N:M group, output unit, block) regrows what it lost
from the sampled candidates of largest |gradient| within it; a group with too few candidates keeps
the weights it would have dropped (with their values). So each layer keeps its count (no
movement between layers under ``scope: global``). Under ``block`` a sampled candidate brings
its whole block in as candidates (their gradients are computed, so a block's score is the mean
over all of it). These updates form each layer's dense mask (``MaskSet.dense_view``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from omegaconf import MISSING
from torch import nn

from ... import schema as S
from ...errors import ConfigError
from ..candidate_grad import (
    SCORE_KINDS,
    candidate_gradients,
    check_layer,
    num_rows,
    unit_scores,
    weight_matrix_shape,
)
from ..flops import SPARSE, Extra
from ..ops import count_change_logs, fill_at_, floored
from ..reinit import REINITS
from ..schedules import decay
from ..statistics import quiet_pass
from .base import cadence_from, register
from .drop_grow import DropAndGrow, largest, smallest, to_indices
from .schemas import Milestone, init, interval, milestone, scope


def sampling_distribution(scores: torch.Tensor | None, n: int) -> torch.Tensor:
    """Normalised probabilities over `n` units from non-negative scores (uniform if degenerate)."""
    if scores is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    p = scores.detach().abs().to(device="cpu", dtype=torch.float64)
    total = float(p.sum())
    if not math.isfinite(total) or total <= 0.0:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    return p / total


def sample_candidates(
    p_out: torch.Tensor | None,
    p_in: torch.Tensor | None,
    n_out: int,
    fan_in: int,
    n: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` independent draws (output unit from p_out, input unit from p_in); None = uniform.

    Returns CPU int64 tensors. Uniform draws use ``randint`` (no probability vector at all).
    """
    if p_out is None:
        o = torch.randint(n_out, (n,), generator=generator)
    else:
        o = torch.multinomial(p_out, n, replacement=True, generator=generator)
    if p_in is None:
        j = torch.randint(fan_in, (n,), generator=generator)
    else:
        j = torch.multinomial(p_in, n, replacement=True, generator=generator)
    return o, j


@dataclass
class GSESchema:
    """The options of ``method=gse`` (their values: ``conf/method/gse.yaml``)."""

    name: str = MISSING
    init: str = init()
    reinit: str = S.choice(REINITS)
    alpha: float = S.num(gt=0.0, le=0.5, hint="the paper uses 0.1 (at most 0.2 per update)")
    update_every: Any = interval()
    end: Optional[Milestone] = milestone()
    gamma: float = S.num(gt=0.0, hint="the paper uses 1 (CIFAR) or 2 (ImageNet)")
    sampling: str = S.choice(("uniform", *SCORE_KINDS))  # uniform, or a guided sampler of candidate_grad
    scope: str = scope()
    stat_batches: int = S.count(ge=1)
    chunk_size: int = S.count(ge=1)
    all_candidates_density: float = S.num(gt=0.0, le=1.0)


@register("gse", schema=GSESchema)
class GSE(DropAndGrow):
    """Guided stochastic exploration: grow the sampled candidates of largest |gradient|."""

    # updates use index-level MaskSet calls only: no dense weight, gradient, momentum or mask of
    # a sparse layer is ever formed
    sparse_execution = True
    keeps_structure = True  # groups regrow from their sampled candidates (``_within_structure``)
    needs_dense_views = False
    regrown = "restart"  # never happens: candidates are inactive, drops active
    reset = ("grown",)

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.sampling = cfg.sampling
        self.scope = cfg.scope
        self.alpha = cfg.alpha
        self.gamma = cfg.gamma
        self.stat_batches = cfg.stat_batches
        self.chunk_size = cfg.chunk_size
        self.all_candidates_density = cfg.all_candidates_density
        self.cadence = cadence_from(cfg, ctx)
        self.t_end = self.cadence.end
        self._find_modules()  # checks every prunable weight belongs to a Linear or Conv2d
        self.last_update: dict = {}
        self._last_cost: list[Extra] = []

    @property
    def modules(self) -> list[nn.Module]:
        """The prunable modules, as they are now (execution=sparse replaces them after setup)."""
        return [owner[0] for owner in self.masks.owners]

    def _find_modules(self) -> list[nn.Module]:
        owner = {}
        for name, mod in self.ctx.model.named_modules():
            w = getattr(mod, "weight", None)
            if isinstance(w, nn.Parameter):
                owner.setdefault(id(w), (name, mod))
        modules = []
        for pname, p in zip(self.masks.names, self.masks.params):
            if id(p) not in owner:
                raise ConfigError(
                    f"method=gse: {pname} is not a module's weight; GSE handles Linear and Conv2d "
                    f"weights only, drop it from prunable.include"
                )
            mname, mod = owner[id(p)]
            check_layer(mod, mname or pname.rsplit(".", 1)[0])
            modules.append(mod)
        return modules

    # --- schedule -----------------------------------------------------------------------------
    def alpha_at(self, step: int) -> float:
        """alpha (1 + cos(pi t / T_end)): 2 alpha at t = 0, 0 from T_end on."""
        return decay("cosine", 2.0 * self.alpha, 0.0, step, self.t_end)

    rate = alpha_at

    # --- the statistics pass ------------------------------------------------------------------
    def _layer_calls(self, x, y, seed: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """One forward/backward: per prunable module, the (input, output-gradient) of each call."""
        captured: list[list] = [[] for _ in self.modules]
        handles = []

        def make_hook(i):
            def hook(mod, args, out):
                captured[i].append((args[0].detach(), out))
                return out.clone()  # later in-place ops act on the copy, not on `out`

            return hook

        try:
            for i, mod in enumerate(self.modules):
                handles.append(mod.register_forward_hook(make_hook(i)))
            torch.manual_seed(seed)
            with torch.enable_grad():
                loss_fn = self.ctx.loss_fn or nn.functional.cross_entropy
                loss = loss_fn(self.ctx.model(x), y)
                outs = [o for calls in captured for _, o in calls if o.requires_grad]
                grads = iter(torch.autograd.grad(loss, outs, allow_unused=True)) if outs else iter(())
        finally:
            for h in handles:
                h.remove()
        result = []
        for calls in captured:
            layer = []
            for inp, out in calls:
                d = next(grads) if out.requires_grad else None
                if d is not None:
                    layer.append((inp, d.detach()))
            result.append(layer)
        return result

    def _scores(self, calls_per_layer, scores):
        """Accumulate GraBo / GraEst unit sums (g, f) for one batch into `scores`."""
        gen = self.ctx.generator
        for i, (mod, calls) in enumerate(zip(self.modules, calls_per_layer)):
            for inp, d in calls:
                signs = None
                if self.sampling == "graest":
                    signs = (torch.randint(0, 2, (num_rows(mod, d),), generator=gen) * 2 - 1).to(inp.device)
                g, f = unit_scores(mod, inp, d, self.sampling, signs, self.chunk_size)
                if scores[i] is None:
                    scores[i] = [g, f]
                else:
                    scores[i][0] += g
                    scores[i][1] += f

    # --- candidates ---------------------------------------------------------------------------
    def _candidates(self, scores, nnz):
        """Per layer (out_idx, in_idx) of distinct inactive candidates, plus counts for the logs."""
        gen = self.ctx.generator
        cands, drawn, hit, dup = [], 0, 0, 0
        masks = self.masks
        for i, mod in enumerate(self.modules):
            n_out, fan_in = weight_matrix_shape(mod)
            numel = n_out * fan_in
            device = self.ctx.device
            if nnz[i] >= numel:
                empty = torch.zeros(0, dtype=torch.long, device=device)
                cands.append((empty, empty))
                continue
            if nnz[i] / numel >= self.all_candidates_density:
                lin = masks.inactive_indices(i)
            else:
                n = int(round(self.gamma * nnz[i]))
                if scores is None or scores[i] is None:
                    p_out = p_in = None
                    if scores is not None:  # guided sampler, layer never reached: uniform
                        p_out = sampling_distribution(None, n_out)
                        p_in = sampling_distribution(None, fan_in)
                else:
                    p_out = sampling_distribution(scores[i][0], n_out)
                    p_in = sampling_distribution(scores[i][1], fan_in)
                o, j = sample_candidates(p_out, p_in, n_out, fan_in, n, gen)
                lin = (o * fan_in + j).to(device)
                active = masks.is_active(i, lin)
                n_active = int(active.sum())
                lin = torch.unique(lin[~active])
                drawn += n
                hit += n_active
                dup += n - n_active - lin.numel()
                if self.structure.kind == "block":
                    lin = self._whole_blocks(i, lin)
            cands.append((lin // fan_in, lin % fan_in))
        return cands, {"drawn": drawn, "already_active": hit, "duplicate": dup}

    def _whole_blocks(self, i: int, lin: torch.Tensor) -> torch.Tensor:
        """Every position of the blocks that the candidates `lin` (inactive, so in inactive blocks)
        fall in, sorted."""
        shape = tuple(self.masks.shapes[i])
        members = self.structure.groups(torch.arange(math.prod(shape), device=lin.device).view(shape))
        block_of = torch.empty(members.numel(), dtype=torch.long, device=lin.device)
        block_of[members.reshape(-1)] = torch.arange(members.shape[0], device=lin.device).repeat_interleave(
            members.shape[1])
        return members[torch.unique(block_of[lin])].reshape(-1).sort().values

    def _within_structure(self, cands, scores_abs, prune_idx: list[torch.Tensor]):
        """The update's (prune, grow) positions per layer under a structure (module docstring):
        the drop made whole blocks where the structure is blocks, then every group regrows what it
        lost from its candidates by |gradient|, else keeps what it dropped."""
        masks, st = self.masks, self.structure
        prunes, grows = [], []
        with masks.dense_view():
            for i, (p, m) in enumerate(zip(masks.params, masks.masks)):
                old = m.clone()
                chosen = fill_at_(torch.zeros_like(old), prune_idx[i].to(old.device), True)
                dropped = st.whole_drops(chosen, old, p.detach().abs())
                after = old & ~dropped
                o, j = cands[i]
                score = torch.full(old.shape, float("-inf"), device=old.device)
                score.view(-1)[(o * (old.numel() // old.shape[0]) + j).to(old.device)] = scores_abs[i].to(old.device)
                score[dropped] = -1.0  # below every candidate: a group short of candidates keeps these
                grown = st.regrow(score, old, after, blocked=after)
                prunes.append(to_indices([dropped & ~grown])[0])
                grows.append(to_indices([grown & ~old])[0])
        return prunes, grows

    def _candidate_grads(self, calls_per_layer, cands, acc):
        for i, (mod, calls) in enumerate(zip(self.modules, calls_per_layer)):
            o, j = cands[i]
            for inp, d in calls:
                g = candidate_gradients(mod, inp, d, o, j, self.chunk_size)
                acc[i] = g if acc[i] is None else acc[i] + g

    # --- one update ---------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, step: int) -> dict:
        masks = self.masks
        nnz = masks.nnz()
        alpha = self.alpha_at(step)
        batches = self.ctx.batches(self.stat_batches, step) if self.ctx.batches is not None else []
        if len(batches) == 0:
            raise ConfigError("method=gse needs training batches for its statistics (ctx.batches)")
        seeds = [int(s) for s in torch.randint(0, 2**62, (len(batches),), generator=self.ctx.generator)]

        grads: list = [None] * len(self.modules)
        runs = 1 if self.sampling == "uniform" or len(batches) == 1 else 2
        with quiet_pass(self.ctx.model, self.ctx.device):
            if self.sampling == "uniform":
                cands, counts = self._candidates(None, nnz)
                for (x, y), seed in zip(batches, seeds):
                    self._candidate_grads(self._layer_calls(x, y, seed), cands, grads)
            else:
                scores: list = [None] * len(self.modules)
                cached = None
                for (x, y), seed in zip(batches, seeds):
                    calls = self._layer_calls(x, y, seed)
                    self._scores(calls, scores)
                    cached = calls if len(batches) == 1 else None
                    del calls
                cands, counts = self._candidates(scores, nnz)
                if cached is not None:
                    self._candidate_grads(cached, cands, grads)
                else:
                    for (x, y), seed in zip(batches, seeds):
                        self._candidate_grads(self._layer_calls(x, y, seed), cands, grads)
                del cached
        scores_abs = [
            g.abs() if g is not None else torch.zeros(c[0].numel(), device=c[0].device)
            for g, c in zip(grads, cands)
        ]
        sizes = [c[0].numel() for c in cands]

        # choose the k candidates to grow and the k active weights to prune (exact selections over
        # the candidates' and the active weights' vectors; all commits go through commit_indices)
        active_idx = [masks.active_indices(i) for i in range(len(masks))]
        active_mag = [masks.active_values(i).abs() for i in range(len(masks))]
        if self.scope == "layer":
            budget = floored([min(math.ceil(alpha * a), s) for a, s in zip(nnz, sizes)], nnz, masks.floor)
            k_total = sum(budget)
        else:
            budget = k_total = min(math.ceil(alpha * sum(nnz)), sum(sizes))
        low = to_indices(smallest(active_mag, None, budget, masks.floor))
        prune_idx = [a[d.to(a.device)] for a, d in zip(active_idx, low)]
        if self.structure.active:  # each group regrows from its own candidates (its own count)
            prune_idx, grow_idx = self._within_structure(cands, scores_abs, prune_idx)
            k_total = sum(g.numel() for g in grow_idx)
        else:
            top = to_indices(largest(scores_abs, None, budget))
            fan_ins = [weight_matrix_shape(mod)[1] for mod in self.modules]
            grow_idx = [o[t.to(o.device)] * f + j[t.to(o.device)] for (o, j), t, f in zip(cands, top, fan_ins)]
        self.commit_indices(prune_idx, grow_idx)  # grown at 0 with zeroed optimizer state
        if self.structure.active:
            self.check_structure()

        n_cand = sum(sizes)
        # what this update computed beyond the training step, for sparsity/flops.py: `runs`
        # sparse forward passes and output-gradient (input-gradient sized) passes over the
        # statistics samples, and the candidates' gradients (a weight-gradient pass at the
        # candidates' density)
        samples = sum(int(y.shape[0]) for _, y in batches)
        self._last_cost = [Extra(samples, SPARSE, 2.0 * runs),
                           Extra(samples, [s / n for s, n in zip(sizes, masks.numels)], 1.0)]
        self.last_update = {
            "step": step,
            "alpha": alpha,
            "k": k_total,
            "candidates": cands,
            "grown": grow_idx,
            "pruned": prune_idx,
        }
        logs = {
            "gse/alpha": alpha,
            "gse/candidates": n_cand,
            "gse/candidates_drawn": counts["drawn"],
            "gse/candidates_already_active": counts["already_active"] / max(counts["drawn"], 1),
            "gse/candidates_duplicate": counts["duplicate"] / max(counts["drawn"], 1),
            "gse/grown": k_total,
            **count_change_logs(masks.names, nnz, [p.numel() for p in prune_idx],
                                [g.numel() for g in grow_idx], masks.numels),
        }
        return logs

    def update_cost(self, step):
        """GSE's sparse statistics passes plus its candidate gradients (the last update's)."""
        cost, self._last_cost = self._last_cost, []
        return cost

