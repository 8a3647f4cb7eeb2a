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
    pruned = [int((o & ~n).sum()) for o, n in zip(old, new)]
    grown = [int((n & ~o).sum()) for o, n in zip(old, new)]
    before = sum(int(o.sum()) for o in old)
    logs = {
        "mask/pruned": sum(pruned),
        "mask/grown": sum(grown),
        "mask/churn": sum(grown) / max(before, 1),
        "mask/change_pct": 100.0 * (sum(pruned) + sum(grown)) / max(sum(o.numel() for o in old), 1),
    }
    for name, n in zip(names, new):
        logs[f"density/{name}"] = float(n.sum()) / n.numel()
    return logs
