"""Pure schedule helpers for the dense-to-sparse methods (GMP and AC/DC).

Nothing here holds state: every answer is a function of its arguments, so a resumed run
recomputes the same events and phases from the step / epoch counter.

* ``gmp_sparsity``: Zhu & Gupta's cubic schedule
  ``s(t) = s_f - (s_f - s_i) (1 - (t - t0) / (t1 - t0))^3``, clamped to s_i before t0 and s_f
  after t1, or a cosine ramp between the same end points (GSE's GMP).
* ``gmp_events``: the times at which GMP prunes: t0, t0 + f, t0 + 2f, ... below t1, and t1
  itself (always, so the run ends at s_f exactly even when f does not divide t1 - t0).
* ``acdc_phases``: AC/DC's dense / sparse phase list (Peste et al. 2021), see its docstring.
"""

from __future__ import annotations

import math

DENSE, SPARSE = "dense", "sparse"


def gmp_sparsity(t: float, start: float, end: float, initial: float, final: float, power: float = 3.0,
                 curve: str = "polynomial") -> float:
    """Sparsity at time `t`, from `initial` at `start` to `final` at `end`.

    ``polynomial``: Zhu & Gupta's ``final - (final - initial) (1 - progress)^power`` (cubic for 3);
    ``cosine``: ``final + (initial - final) (1 + cos(pi progress)) / 2`` (GSE's
    gradual_sparse_training.py: its target ``s_f (1 - (1 + cos(pi t / T)) / 2)`` from 0).
    """
    if end <= start:
        return final if t >= start else initial
    progress = min(max((t - start) / (end - start), 0.0), 1.0)
    if curve == "cosine":
        return final + (initial - final) * (1.0 + math.cos(math.pi * progress)) / 2.0
    return final - (final - initial) * (1.0 - progress) ** power


def gmp_events(start: int, end: int, frequency: int) -> list[int]:
    """Pruning times ``start, start + frequency, ... < end`` plus ``end`` (sorted, unique)."""
    if frequency <= 0:
        raise ValueError("frequency must be positive")
    if end < start:
        raise ValueError("end must not come before start")
    events = list(range(int(start), int(end), int(frequency)))
    events.append(int(end))
    return sorted(set(events))


def acdc_phases(total: int, warmup: int = 10, phase_length: int = 5, final_dense: int = 10,
                final_sparse: int = 15) -> list[tuple[int, int, str]]:
    """AC/DC's phases as ``[(start, end, 'dense' | 'sparse'), ...]`` covering ``[0, total)``.

    Every argument is in the same unit (optimizer steps in the method; epochs in the examples):

    1. dense warm-up ``[0, warmup)``;
    2. alternating phases of ``phase_length``, sparse first, up to
       ``total - final_dense - final_sparse`` (the last one is cut short if the lengths do not divide);
    3. a dense phase of ``final_dense``;
    4. the final sparse (fine-tuning) phase of ``final_sparse``, ending at ``total``.

    Adjacent phases of the same kind are merged and empty ones dropped. With the defaults and
    ``total=100`` this is the reference's ResNet-50 pattern: dense to 10, sparse 10-15, dense
    15-20, ..., sparse 70-75, dense 75-85, sparse 85-100 (compress at 10, 20, ..., 70 and 85;
    decompress at 15, 25, ..., 65 and 75). With ``total=200`` it is the reference's 200-epoch
    configuration (5-epoch phases up to 175, dense 175-185, sparse 185-200).

    Raises ``ValueError`` naming the offending argument when the pattern does not fit.
    """
    if phase_length <= 0:
        raise ValueError("phase_length must be positive")
    if final_sparse <= 0:
        raise ValueError("final_sparse must be positive (the run has to end sparse)")
    if warmup < 0 or final_dense < 0:
        raise ValueError("warmup and final_dense must not be negative")
    alt_end = total - final_dense - final_sparse
    if alt_end < warmup:
        raise ValueError(f"warmup + final_dense + final_sparse = {warmup + final_dense + final_sparse:g} "
                         f"exceeds the run's {total:g}")

    raw: list[tuple[int, int, str]] = [(0, int(warmup), DENSE)]
    t, kind = int(warmup), SPARSE
    while t < alt_end:
        e = min(t + phase_length, alt_end)
        raw.append((t, e, kind))
        kind = DENSE if kind == SPARSE else SPARSE
        t = e
    raw.append((alt_end, alt_end + final_dense, DENSE))
    raw.append((alt_end + final_dense, int(total), SPARSE))

    out: list[tuple[int, int, str]] = []
    for s_, e_, k in raw:
        if e_ <= s_:
            continue
        if out and out[-1][2] == k:
            out[-1] = (out[-1][0], e_, k)
        else:
            out.append((s_, e_, k))
    return out


def phase_at(phases: list[tuple[int, int, str]], t: int) -> str:
    """The kind of phase that trains index `t` (0-based: index t covers [t, t+1))."""
    for s, e, k in phases:
        if s <= t < e:
            return k
    return phases[-1][2] if phases else DENSE
