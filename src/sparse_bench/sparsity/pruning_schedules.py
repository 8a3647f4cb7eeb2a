"""Pure schedule helpers for the dense-to-sparse methods (GMP and AC/DC).

Nothing here holds state: every answer is a function of its arguments, so a resumed run
recomputes the same events and phases from the step / epoch counter.

* ``gmp_sparsity``: Zhu & Gupta's cubic schedule
  ``s(t) = s_f - (s_f - s_i) (1 - (t - t0) / (t1 - t0))^3``, clamped to s_i before t0 and s_f
  after t1.
* ``gmp_events``: the times at which GMP prunes: t0, t0 + f, t0 + 2f, ... below t1, and t1
  itself (always, so the run ends at s_f exactly even when f does not divide t1 - t0).
* ``acdc_phases``: AC/DC's dense / sparse phase list (Peste et al. 2021), see its docstring.
"""

from __future__ import annotations

DENSE, SPARSE = "dense", "sparse"


def gmp_sparsity(t: float, start: float, end: float, initial: float, final: float, power: float = 3.0) -> float:
    """Sparsity of the cubic (``power``) schedule at time `t`, from `initial` at `start` to `final` at `end`."""
    if end <= start:
        return final if t >= start else initial
    progress = min(max((t - start) / (end - start), 0.0), 1.0)
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


def acdc_phases(epochs: int, warmup_epochs: float = 10, phase_length: float = 5, final_dense: float = 10,
                final_sparse: float = 15, multiplier: float = 1.0) -> list[tuple[int, int, str]]:
    """AC/DC's phases as ``[(start_epoch, end_epoch, 'dense' | 'sparse'), ...]`` covering ``[0, epochs)``.

    The pattern is laid out on the base (1x) schedule of ``B = epochs / multiplier`` epochs, with
    every length in epochs of that base schedule:

    1. dense warm-up ``[0, warmup_epochs)``;
    2. alternating phases of ``phase_length`` epochs, sparse first, up to
       ``B - final_dense - final_sparse`` (the last one is cut short if the lengths do not divide);
    3. a dense phase of ``final_dense`` epochs;
    4. the final sparse (fine-tuning) phase of ``final_sparse`` epochs, ending at ``B``.

    Every boundary is then multiplied by ``multiplier`` and rounded to a whole epoch, so a 2x
    schedule doubles every boundary. Adjacent phases of the same kind are merged and empty ones
    dropped. With the defaults and 100 epochs this is the reference's ResNet-50 pattern: dense to
    10, sparse 10-15, dense 15-20, ..., sparse 70-75, dense 75-85, sparse 85-100 (compress at
    10, 20, ..., 70 and 85; decompress at 15, 25, ..., 65 and 75). With ``multiplier=1`` and 200
    epochs it is the reference's 200-epoch configuration (5-epoch phases up to 175, dense
    175-185, sparse 185-200).

    Raises ``ValueError`` naming the offending argument when the pattern does not fit.
    """
    if multiplier <= 0:
        raise ValueError("multiplier must be positive")
    if phase_length <= 0:
        raise ValueError("phase_length must be positive")
    if final_sparse <= 0:
        raise ValueError("final_sparse must be positive (the run has to end sparse)")
    if warmup_epochs < 0 or final_dense < 0:
        raise ValueError("warmup_epochs and final_dense must not be negative")
    base = epochs / multiplier
    alt_end = base - final_dense - final_sparse
    if alt_end < warmup_epochs:
        raise ValueError(
            f"warmup_epochs + final_dense + final_sparse = {warmup_epochs + final_dense + final_sparse:g} "
            f"exceeds the {base:g}-epoch base schedule")

    raw: list[tuple[float, float, str]] = [(0.0, float(warmup_epochs), DENSE)]
    t, kind = float(warmup_epochs), SPARSE
    while t < alt_end:
        e = min(t + phase_length, alt_end)
        raw.append((t, e, kind))
        kind = DENSE if kind == SPARSE else SPARSE
        t = e
    raw.append((alt_end, alt_end + final_dense, DENSE))
    raw.append((alt_end + final_dense, base, SPARSE))

    out: list[tuple[int, int, str]] = []
    for s, e, k in raw:
        s_i = int(round(s * multiplier))
        e_i = int(epochs) if e >= base else int(round(e * multiplier))
        if e_i <= s_i:
            continue
        if out and out[-1][2] == k:  # consecutive boundaries round alike, so phases stay contiguous
            out[-1] = (out[-1][0], e_i, k)
        else:
            out.append((s_i, e_i, k))
    return out


def phase_at(phases: list[tuple[int, int, str]], epoch: int) -> str:
    """The kind of phase that trains epoch index `epoch` (0-based: epoch e covers [e, e+1))."""
    for s, e, k in phases:
        if s <= epoch < e:
            return k
    return phases[-1][2] if phases else DENSE
