"""Small mask operations shared by the methods."""

from __future__ import annotations

import torch


def smallest_active(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Bool tensor marking the `k` active (mask True) entries of smallest score."""
    out = torch.zeros_like(mask)
    if k <= 0:
        return out
    s = torch.where(mask, scores, torch.full_like(scores, float("inf"))).flatten()
    idx = torch.topk(s, k, largest=False, sorted=False).indices
    out.view(-1)[idx] = True
    return out


def largest_inactive(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Bool tensor marking the `k` inactive (mask False) entries of largest score."""
    out = torch.zeros_like(mask)
    if k <= 0:
        return out
    s = torch.where(mask, torch.full_like(scores, float("-inf")), scores).flatten()
    idx = torch.topk(s, k, largest=True, sorted=False).indices
    out.view(-1)[idx] = True
    return out


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
    counts = torch.stack([torch.stack([(o & ~n).sum(), (n & ~o).sum(), o.sum()])
                          for o, n in zip(old, new)]).cpu().tolist()
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
