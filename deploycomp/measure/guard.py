"""The accuracy guard: a compile whose engines ruined the model does not end quietly.

Every compiled engine is compared with the fp32 torch model on every eval set: on a labelled set
its task metric may drop by at most ``max_drop_points``; on an unlabelled set its outputs must keep
a cosine similarity of at least ``min_cosine`` (top-1 agreement is not used: out-of-domain inputs
flip many low-margin classes even under a good INT8 model, while a broken model's outputs lose
their direction). A non-finite output always misses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from deploycomp.artifacts import AccuracyRow

DEFAULT_MAX_DROP_POINTS = 5.0
DEFAULT_MIN_COSINE = 0.9


@dataclasses.dataclass(frozen=True)
class AccuracyGuard:
    """What a compiled engine must keep; ``--max-accuracy-drop`` sets ``max_drop_points``."""

    max_drop_points: float = DEFAULT_MAX_DROP_POINTS
    min_cosine: float = DEFAULT_MIN_COSINE


DEFAULT_GUARD = AccuracyGuard()


def guard_misses(rows: Sequence[AccuracyRow], guard: AccuracyGuard) -> list[str]:
    """One phrase per (compiled engine, eval set) that misses the guard; empty when all hold."""
    reference = {r.eval_set: r for r in rows if r.backend == "torch"}
    misses = []
    for row in rows:
        if row.variant != "compiled" or row.eval_set not in reference:
            continue
        where = f"{row.backend} on {row.eval_set}"
        ref = reference[row.eval_set]
        if not row.finite:
            misses.append(f"{where} gives non-finite outputs")
        elif row.value is not None and ref.value is not None:
            drop = round(100 * (ref.value - row.value), 6)  # 10 of 200 samples is 5 points
            if drop > guard.max_drop_points:
                misses.append(f"{where} drops {drop:.2f} points (allowed "
                              f"{guard.max_drop_points:g})")
        elif row.cosine is not None and row.cosine < guard.min_cosine:
            misses.append(f"{where} keeps cosine {row.cosine:.3f} with fp32 (needs "
                          f">= {guard.min_cosine:g})")
    return misses
