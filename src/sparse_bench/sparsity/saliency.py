"""Saliency scores for pruning at initialisation (SNIP, GraSP, SynFlow) and exact top-k masks.

Every score function works on a private deep copy of the model (as GraSP's official code
does), so scoring leaves the model untouched: no ``.grad`` is written, batch-norm running
statistics do not move, the train/eval flag stays as it was and parameters are not modified.
``preserved_rng`` keeps the global RNG streams (dropout during a train-mode scoring pass) where
they were, so training after a prune-at-init setup sees the same random numbers as after any
other setup.

The scores are returned as one tensor per prunable parameter, in the MaskSet's order:

* ``snip_scores``: |g ⊙ θ| with g the gradient of the loss averaged over the given batches
  (Lee et al. 2019, "connection sensitivity"; the reference normalises by the sum, which does
  not change the ranking).
* ``grasp_scores``: S = -θ ⊙ (H g), g and H the gradient and Hessian of the loss of the
  temperature-scaled logits (output / T), averaged over the batches (Wang et al. 2020). GraSP
  REMOVES the weights of largest S (keeps the smallest), see ``methods/grasp.py``.
* ``SynFlowScorer``: (dR/dθ) ⊙ θ on the "linearised" network (every parameter and buffer
  replaced by its absolute value, eval mode), R = sum of the output for an all-ones input of the
  data's shape (Tanaka et al. 2020). Called once per pruning iteration with the current masks.
  ``linearise=True`` also replaces LayerNorm, GELU and softmax attention by the identity (GSE's
  ``utils.prepare_synflow_model``, which makes SynFlow meaningful on its ViT).

``keep_top`` turns scores into bool masks with exactly ``n_keep`` active weights, ranked over
all layers (``global``) or per layer at a uniform density (``layer``), among the currently
active weights only.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import ConfigError
from .distributions import allocate
from .ops import guard_layers, lifted

SCOPES = ("global", "layer")


# --- shared by the prune-at-init methods -------------------------------------------------------
def scoring_batches(ctx, n: int, what: str):
    """`n` statistics batches from the context, drawn for step 0 (an error naming the method
    when there are none). The result may be iterated more than once (GraSP does)."""
    if ctx.batches is None:
        raise ConfigError(f"method={what} needs training batches to score weights, and none were given")
    batches = ctx.batches(n, 0)
    if len(batches) == 0:
        raise ConfigError(f"method={what}: the training set gave no batches to score weights with")
    return batches


@contextlib.contextmanager
def preserved_rng(device: torch.device):
    """Run the block without advancing the global CPU (and the device's CUDA) RNG streams."""
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def _copy_with(model: nn.Module, names: Sequence[str]) -> tuple[nn.Module, list[nn.Parameter]]:
    net = copy.deepcopy(model)
    for p in net.parameters():
        p.grad = None
    named = dict(net.named_parameters())
    params = [named[n] for n in names]
    for p in params:
        p.requires_grad_(True)
    return net, params


def _grads(out: torch.Tensor, params: list[nn.Parameter], create_graph: bool = False) -> list[torch.Tensor]:
    grads = torch.autograd.grad(out, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


# --- the scores ------------------------------------------------------------------------------
def snip_scores(model: nn.Module, names: Sequence[str], batches, loss_fn,
                train_mode: bool = True) -> list[torch.Tensor]:
    """|g ⊙ θ|, g = mean over `batches` of dL/dθ (SNIP's connection sensitivity)."""
    net, params = _copy_with(model, names)
    net.train(train_mode)
    total = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        grads = _grads(loss_fn(net(x), y), params)
        for t, g in zip(total, grads):
            t.add_(g)
    return [(t / len(batches) * p.detach()).abs() for t, p in zip(total, params)]


def grasp_scores(model: nn.Module, names: Sequence[str], batches, loss_fn, temperature: float = 200.0,
                 train_mode: bool = True) -> list[torch.Tensor]:
    """S = -θ ⊙ (H g) for the loss of output / `temperature`, averaged over `batches`.

    g = mean_b dL_b/dθ (no graph); H g = mean_b d(g · dL_b/dθ)/dθ (double backward), which is
    the reference's two passes (it sums instead of averaging: the same ranking).
    """
    net, params = _copy_with(model, names)
    net.train(train_mode)
    g = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        for acc, gb in zip(g, _grads(loss_fn(net(x) / temperature, y), params)):
            acc.add_(gb)
    g = [t / len(batches) for t in g]
    hg = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        # double backward: the fused attention kernels have no second derivative, the math one has
        with sdpa_kernel(SDPBackend.MATH):
            grads = _grads(loss_fn(net(x) / temperature, y), params, create_graph=True)
        z = sum((gi * fi).sum() for gi, fi in zip(g, grads) if fi.requires_grad)
        if not torch.is_tensor(z) or not z.requires_grad:
            continue  # the loss is linear in every scored weight: H g = 0
        for acc, h in zip(hg, _grads(z, params)):
            acc.add_(h)
    return [-(p.detach() * h / len(batches)) for p, h in zip(params, hg)]


def linearise_for_synflow(net: nn.Module) -> None:
    """Make a (copied) network linear in its positive domain, as GSE's ``prepare_synflow_model``:
    every LayerNorm and GELU becomes the identity, and modules with an ``attention_softmax`` flag
    (``models/vit.py``'s attention) compute ``(q k^T / sqrt(d)) v`` without the softmax. Position
    embeddings stored as buffers are made absolute with every other buffer by the scorer (GSE's
    ``PosembSincos2dABS``)."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.LayerNorm, nn.GELU, nn.Softmax)):
                setattr(parent, name, nn.Identity())
    for mod in net.modules():
        if hasattr(mod, "attention_softmax"):
            mod.attention_softmax = False


class SynFlowScorer:
    """The linearised copy of a model; ``scorer(masks)`` gives |(dR/dθ) ⊙ θ| under `masks`.

    The copy holds |θ| for every floating parameter and buffer (the reference takes the absolute
    value of the whole state dict), runs in eval mode (batch norm uses its running statistics, as
    the reference prunes in eval mode), in `dtype`. Masked weights are zero in the copy, so their
    score is 0 and no signal flows through them.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], input_shape: Sequence[int], device,
                 dtype: torch.dtype = torch.float32, linearise: bool = False):
        net, params = _copy_with(model, names)
        if linearise:
            linearise_for_synflow(net)
        net.eval()
        net.to(dtype=dtype)
        with torch.no_grad():
            for t in list(net.parameters()) + list(net.buffers()):
                if t.is_floating_point():
                    t.abs_()
        self.net = net
        self.params = params
        self.magnitudes = [p.detach().clone() for p in params]
        self.ones = torch.ones((1, *input_shape), dtype=dtype, device=device)

    def __call__(self, masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            for p, w, m in zip(self.params, self.magnitudes, masks):
                p.copy_(w * m)
        r = self.net(self.ones).sum()
        grads = _grads(r, self.params)
        return [(g * p.detach()).abs() for g, p in zip(grads, self.params)]


# --- exact top-k selection -------------------------------------------------------------------
def layer_keep_counts(n_keep: int, numels: Sequence[int], caps: Sequence[int]) -> list[int]:
    """Per-layer counts at a uniform density summing exactly to `n_keep` (largest remainder)."""
    total = sum(numels)
    return allocate([n_keep * n / total for n in numels], list(caps), n_keep)


def _top(flat_scores: torch.Tensor, flat_active: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros_like(flat_active)
    if k <= 0:
        return out
    s = torch.where(flat_active, flat_scores, torch.full_like(flat_scores, float("-inf")))
    out[torch.topk(s, k, largest=True, sorted=False).indices] = True
    return out


@torch.no_grad()
def keep_top(scores: Sequence[torch.Tensor], n_keep: int, scope: str = "global",
             active: Sequence[torch.Tensor] | None = None, floor: int = 1, structure=None) -> list[torch.Tensor]:
    """Bool masks keeping exactly `n_keep` of the `active` weights, those of largest score, and
    at least `floor` in every layer (``MaskSet.floor``: a layer's best are kept first).

    ``global``: one ranking over all layers. ``layer``: every layer keeps the same fraction of
    its weights (counts by largest remainder, capped by what is active in the layer).
    Ties go to torch.topk's order. Under a `structure` (``sparsity.structure.Structure``) the
    selection is then made structured (``Structure.keep``: per layer the count chosen here).
    """
    if active is None:
        active = [torch.ones_like(s, dtype=torch.bool) for s in scores]
    if structure is not None and structure.active:
        chosen = keep_top(scores, n_keep, scope, active, floor)
        return structure.keep(scores, active, chosen, n_keep / sum(s.numel() for s in scores))
    n_active = [int(a.sum()) for a in active]
    if not 0 <= n_keep <= sum(n_active):
        raise ValueError(f"cannot keep {n_keep} weights out of {sum(n_active)} active ones")
    if scope == "global":
        flat = _top(torch.cat([s.flatten() for s in guard_layers(scores, active, floor)]),
                    torch.cat([a.flatten() for a in active]), n_keep)
        return [f.view_as(s) for f, s in zip(torch.split(flat, [s.numel() for s in scores]), scores)]
    if scope == "layer":
        counts = lifted(layer_keep_counts(n_keep, [s.numel() for s in scores], n_active), n_active, floor)
        return [_top(s.flatten(), a.flatten(), k).view_as(s) for s, a, k in zip(scores, active, counts)]
    raise ValueError(f"unknown scope '{scope}'; choose one of {SCOPES}")


def check_finite(scores: Sequence[torch.Tensor], what: str, fix: str) -> None:
    if not all(bool(torch.isfinite(s).all()) for s in scores):
        raise ConfigError(f"method={what}: some scores are not finite (inf/nan); {fix}")
