"""Small mask operations shared by the methods."""

from __future__ import annotations

from collections.abc import Sequence

import torch

SAMPLE = 1 << 16  # entries a threshold is estimated from


def _full_topk(values, k, largest, eligible):
    if eligible is not None:
        values = torch.where(eligible, values, torch.full_like(values, float("-inf") if largest else float("inf")))
    return torch.topk(values, k, largest=largest, sorted=False).indices


def topk_indices(values: torch.Tensor, k: int, largest: bool = True,
                 eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the `k` largest (or smallest) entries of the 1-D `values` among the `eligible`
    ones (all if None); the caller guarantees at least k are eligible.

    Exact, like ``torch.topk`` (ties at the boundary are broken by index order among the
    candidates), but for large inputs it first estimates a threshold from an evenly strided
    sample of about 65k entries, keeps only the entries beyond it (about twice k) and ranks
    those: two O(n) passes and a small top-k instead of a top-k over everything. If fewer than k
    entries pass the estimate it falls back to the full top-k.
    """
    n = values.numel()
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=values.device)
    if n <= 4 * SAMPLE or k > n // 8 or values.device.type != "cpu":
        return _full_topk(values, k, largest, eligible)  # on a GPU: no host sync, topk is fast
    stride = n // SAMPLE
    sample = values[::stride]
    if eligible is not None:
        sample = sample[eligible[::stride]]
        frac = sample.numel() / max(int(torch.count_nonzero(eligible)), 1)
    else:
        frac = sample.numel() / n
    r = min(sample.numel(), int(2 * k * frac) + 16)
    if r < 1:
        return _full_topk(values, k, largest, eligible)
    thr = torch.topk(sample, r, largest=largest, sorted=True).values[-1]
    keep = values >= thr if largest else values <= thr
    if eligible is not None:
        keep &= eligible
    cand = keep.nonzero().squeeze(1)
    if cand.numel() < k:
        return _full_topk(values, k, largest, eligible)
    return cand[torch.topk(values[cand], k, largest=largest, sorted=False).indices]


def fill_at_(t: torch.Tensor, idx: torch.Tensor, value) -> torch.Tensor:
    """``t.view(-1)[idx] = value`` for flat indices in `t`'s logical (row-major) order, in place,
    for a contiguous or a channels_last `t` (a conv weight under ``channels_last=true``, and the
    masks and optimizer state made like it), without a host sync on a GPU (``index_fill_`` takes
    the value as a scalar; an indexed assignment copies it from the host first)."""
    if t.is_contiguous():
        t.view(-1).index_fill_(0, idx, value)
        return t
    where = torch.unravel_index(idx, t.shape)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):  # dense storage, other order
        offsets = sum(i * s for i, s in zip(where, t.stride()))
        t.as_strided((t.numel(),), (1,)).index_fill_(0, offsets, value)
    else:
        t[where] = value
    return t


def smallest_active(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Bool tensor marking the `k` active (mask True) entries of smallest score (ranked among
    the active entries only)."""
    out = torch.zeros_like(mask)
    if k <= 0:
        return out
    if mask.device.type != "cpu":  # no host sync on a GPU
        idx = topk_indices(scores.reshape(-1), k, largest=False, eligible=mask.reshape(-1))
    else:
        active = mask.reshape(-1).nonzero().squeeze(1)
        idx = active[topk_indices(scores.reshape(-1)[active], k, largest=False)]
    return fill_at_(out, idx, True)


def guard_layers(scores: Sequence[torch.Tensor], masks: Sequence[torch.Tensor] | None, floor: int
                 ) -> list[torch.Tensor]:
    """Copies of `scores` in which each layer's `floor` largest active entries are +inf, so a
    ranking over all layers at once that drops the smallest active entries never takes a layer's
    last `floor` weights (``prunable.allow_empty: false``, the default: floor 1). `masks` None:
    every entry is active (vectors of active values). No host sync; `floor` 0 returns `scores`."""
    if floor <= 0:
        return list(scores)
    out = []
    for s, m in zip(scores, masks if masks is not None else [None] * len(scores)):
        s = s.clone()
        if s.numel():
            idx = topk_indices(s.reshape(-1), min(floor, s.numel()), largest=True,
                               eligible=None if m is None else m.reshape(-1))
            fill_at_(s, idx, float("inf"))
        out.append(s)
    return out


def floored(counts: Sequence[int], active: Sequence[int], floor: int) -> list[int]:
    """Per-layer prune counts that leave every layer at least `floor` of its active weights."""
    return [min(c, max(a - floor, 0)) for c, a in zip(counts, active)]


def lifted(keep: Sequence[int], active: Sequence[int], floor: int) -> list[int]:
    """Per-layer keep counts with every layer at least min(`floor`, its active weights), the
    total unchanged: what a layer is lifted by is taken, one at a time, from the layers keeping
    the most. Counts already at the floor come back as they are."""
    keep = list(keep)
    need = 0
    for i, a in enumerate(active):
        want = min(floor, a)
        if keep[i] < want:
            need += want - keep[i]
            keep[i] = want
    while need > 0:
        spare = [i for i, a in enumerate(active) if keep[i] > min(floor, a)]
        if not spare:
            break
        i = max(spare, key=lambda j: keep[j])
        keep[i] -= 1
        need -= 1
    return keep


def largest_inactive(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Bool tensor marking the `k` inactive (mask False) entries of largest score."""
    out = torch.zeros_like(mask)
    if k <= 0:
        return out
    idx = topk_indices(scores.reshape(-1), k, largest=True, eligible=~mask.reshape(-1))
    return fill_at_(out, idx, True)


def random_inactive(mask: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Bool tensor marking `k` inactive entries drawn uniformly at random (CPU generator)."""
    scores = torch.rand(mask.shape, generator=generator).to(mask.device)
    return largest_inactive(scores, mask, k)


def mask_change_logs(names, old, new) -> dict:
    """What a researcher reads after a mask update: pruned, grown, churn, per-layer density.

    ``mask/pruned`` and ``mask/grown`` count positions that left / joined the active set,
    ``mask/churn`` is grown / active-before (the fraction of the active set replaced),
    ``mask/change_pct`` the Hamming distance between the masks as a percentage of all prunable
    weights (Kuznedelev et al.'s mask-change diagnostic).
    """
    if not old:
        return count_change_logs(names, [], [], [], [])
    # every count in one stacked tensor: one host sync for the whole update
    nz = torch.count_nonzero  # counts bools without converting them to integers first
    counts = torch.stack([torch.stack([nz(o & ~n), nz(n & ~o), nz(o)]) for o, n in zip(old, new)]).cpu().tolist()
    pruned = [int(c[0]) for c in counts]
    grown = [int(c[1]) for c in counts]
    before = [int(c[2]) for c in counts]
    return count_change_logs(names, before, pruned, grown, [o.numel() for o in old])


def count_change_logs(names, before, pruned, grown, numels) -> dict:
    """``mask_change_logs`` from per-layer counts: active before, pruned and grown (disjoint)."""
    logs = {
        "mask/pruned": sum(pruned),
        "mask/grown": sum(grown),
        "mask/churn": sum(grown) / max(sum(before), 1),
        "mask/change_pct": 100.0 * (sum(pruned) + sum(grown)) / max(sum(numels), 1),
    }
    for name, b, p, g, n in zip(names, before, pruned, grown, numels):
        logs[f"density/{name}"] = (b - p + g) / n
    return logs
