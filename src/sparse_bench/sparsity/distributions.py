"""Initial per-layer densities that hit a global density exactly, and random masks.

`layer_counts` turns a global density into an integer number of active weights per layer:

* ``uniform``: every layer at the same density.
* ``er``: Erdos-Renyi, density_l proportional to (fan_in + fan_out) / (fan_in * fan_out), with
  fan_in = C_in * kh * kw and fan_out = C_out (as GSE uses it).
* ``erk``: Erdos-Renyi-Kernel (RigL), density_l proportional to sum(shape) / prod(shape).

For ER and ERK the scale is solved so the global count is exact; layers that would exceed
density 1 are made dense and the rest rescaled. Counts are rounded with the largest-remainder
rule, so the total is exactly ``round(density * total_weights)`` (to the weight).

``bernoulli`` is the sparse momentum reference's initialisation: every weight is kept
independently with probability ``density`` (exact only in expectation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import ConfigError

DISTRIBUTIONS = ("uniform", "er", "erk", "bernoulli")


def _raw_scores(shapes: Sequence[Sequence[int]], kind: str) -> list[float]:
    scores = []
    for shape in shapes:
        numel = math.prod(shape)
        if kind == "uniform" or len(shape) < 2:
            scores.append(1.0)
        elif kind == "er":
            fan_out = shape[0]
            fan_in = numel // fan_out
            scores.append((fan_in + fan_out) / (fan_in * fan_out))
        elif kind == "erk":
            scores.append(sum(shape) / numel)
        else:
            raise ConfigError(f"method.init={kind} is unknown; choose one of: {', '.join(DISTRIBUTIONS)}")
    return scores


def allocate(targets: Sequence[float], caps: Sequence[int], total: int) -> list[int]:
    """Integers near `targets`, each <= its cap, summing exactly to `total`.

    Floors every target, then hands out the remaining units one by one to the entries with the
    largest fractional remainder that still have room (largest-remainder rounding). If the
    targets overshoot (after capping), the entries with the smallest remainders give units back.
    """
    if total > sum(caps):
        raise ValueError(f"cannot place {total} units in capacity {sum(caps)}")
    counts = [min(int(math.floor(t)), c) for t, c in zip(targets, caps)]
    counts = [max(0, x) for x in counts]
    rema = [t - math.floor(t) for t in targets]
    diff = total - sum(counts)
    order = sorted(range(len(targets)), key=lambda i: (-rema[i], i))
    while diff > 0:
        progressed = False
        for i in order:
            if diff == 0:
                break
            if counts[i] < caps[i]:
                counts[i] += 1
                diff -= 1
                progressed = True
        if not progressed:  # pragma: no cover - guarded by the capacity check above
            raise ValueError("allocation did not converge")
    for i in reversed(order):
        if diff >= 0:
            break
        take = min(counts[i], -diff)
        counts[i] -= take
        diff += take
    return counts


def layer_densities(shapes: Sequence[Sequence[int]], density: float, kind: str) -> list[float]:
    """Real-valued per-layer densities whose weighted sum is `density` (before rounding)."""
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density={density} is outside (0, 1]; pass e.g. density=0.05")
    numels = [math.prod(s) for s in shapes]
    raw = _raw_scores(shapes, "uniform" if kind == "bernoulli" else kind)
    budget = density * sum(numels)
    dense: set[int] = set()
    while True:
        free = [i for i in range(len(shapes)) if i not in dense]
        left = budget - sum(numels[i] for i in dense)
        denom = sum(raw[i] * numels[i] for i in free)
        if not free or denom == 0:
            break
        eps = left / denom
        newly = {i for i in free if eps * raw[i] > 1.0}
        if not newly:
            break
        dense |= newly
    out = []
    for i in range(len(shapes)):
        out.append(1.0 if i in dense else min(1.0, eps * raw[i]))
    return out


def layer_counts(shapes: Sequence[Sequence[int]], density: float, kind: str,
                 names: Sequence[str] | None = None) -> list[int]:
    """Active weights per layer, summing exactly to round(density * total).

    A density so low that some layer would get no weight at all is refused (the network would
    be cut in two), naming the layer and the smallest density that gives every layer a weight.
    """
    numels = [math.prod(s) for s in shapes]
    dens = layer_densities(shapes, density, kind)
    total = int(round(density * sum(numels)))
    counts = allocate([d * n for d, n in zip(dens, numels)], numels, total)
    if 0 in counts:
        i = counts.index(0)
        layer = names[i] if names is not None else f"prunable tensor {i} (shape {list(shapes[i])})"
        raise ConfigError(f"density={density:g} leaves {layer} without a single active weight under init={kind}; "
                          f"use density >= {min_density(shapes, kind):.3g}")
    return counts


def min_density(shapes: Sequence[Sequence[int]], kind: str) -> float:
    """About the smallest global density at which every layer keeps at least one weight."""
    numels = [math.prod(s) for s in shapes]
    lo, hi = 0.0, 1.0
    for _ in range(60):  # bisection on the real-valued layer densities
        mid = (lo + hi) / 2
        if all(d * n >= 1.0 for d, n in zip(layer_densities(shapes, mid, kind), numels)):
            hi = mid
        else:
            lo = mid
    return hi


def random_masks(
    shapes: Sequence[Sequence[int]],
    density: float,
    kind: str,
    generator: torch.Generator,
    names: Sequence[str] | None = None,
) -> list[torch.Tensor]:
    """Bool masks (on CPU) with the distribution's counts placed uniformly at random per layer."""
    if kind == "bernoulli":
        return [torch.rand(tuple(s), generator=generator) < density for s in shapes]
    masks = []
    for shape, k in zip(shapes, layer_counts(shapes, density, kind, names)):
        n = math.prod(shape)
        flat = torch.zeros(n, dtype=torch.bool)
        flat[torch.randperm(n, generator=generator)[:k]] = True
        masks.append(flat.view(tuple(shape)))
    return masks
