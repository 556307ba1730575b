"""Accuracy measurement: the task metric on real evaluation data, and agreement with fp32.

:func:`evaluate` runs a session over the batches of an :class:`~deploycomp.modelspec.EvalSet`
and returns the concatenated logits (output 0) and top-1 accuracy when the set is labelled.
:func:`compare_outputs` compares a candidate's outputs with the fp32 reference (top-1 agreement,
mean cosine per sample, SQNR in dB, finiteness); :func:`accuracy_row` packs both into an
:class:`~deploycomp.artifacts.AccuracyRow`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
from tqdm import tqdm

from deploycomp.artifacts import AccuracyRow
from deploycomp.errors import BackendError, DataError, DeployCompError
from deploycomp.modelspec import EvalSet
from deploycomp.validate import check_labels

RunFn = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB; ``inf`` when the two are identical.

    Example:
        >>> sqnr_db(np.ones(4), np.ones(4) * 1.01)
        40.0
    """
    ref = np.asarray(reference, dtype=np.float64)
    noise_energy = float(np.sum((ref - np.asarray(candidate, dtype=np.float64)) ** 2))
    signal_energy = float(np.sum(ref**2))
    if noise_energy == 0.0:
        return math.inf
    if signal_energy == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_energy / noise_energy)


def _mean_row_cosine(ref: np.ndarray, cand: np.ndarray) -> float:
    ref_rows, cand_rows = ref.reshape(ref.shape[0], -1), cand.reshape(cand.shape[0], -1)
    ref_norm = np.linalg.norm(ref_rows, axis=1)
    cand_norm = np.linalg.norm(cand_rows, axis=1)
    dots = np.sum(ref_rows * cand_rows, axis=1)
    denom = ref_norm * cand_norm
    both_zero = (ref_norm == 0) & (cand_norm == 0)
    cosine = np.where(denom > 0, dots / np.where(denom > 0, denom, 1.0), 0.0)
    return float(np.mean(np.where(both_zero, 1.0, cosine)))


def compare_outputs(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """Compare a candidate engine's outputs with the fp32 reference, sample by sample.

    Args:
        reference: fp32 outputs, samples on axis 0 (a 1-D array is one sample).
        candidate: outputs of the engine under test, same shape.

    Returns:
        ``top1_agreement`` (fraction of samples whose argmax over the last axis matches),
        ``cosine`` (mean cosine similarity per sample), ``sqnr_db`` (``inf`` when identical)
        and ``finite`` (candidate has no NaN/inf). When the candidate is not finite, ``cosine``
        and ``sqnr_db`` are None.

    Raises:
        DataError: the shapes differ.

    Example:
        >>> compare_outputs(logits_fp32, logits_int8)["top1_agreement"]
        0.996
    """
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        raise DataError(
            f"cannot compare outputs of shape {cand.shape} with reference shape {ref.shape}; "
            "run both engines on the same batches."
        )
    if ref.ndim < 2:
        ref, cand = ref.reshape(1, -1), cand.reshape(1, -1)
    finite = bool(np.isfinite(cand).all())
    agreement = float(np.mean(np.argmax(ref, axis=-1) == np.argmax(cand, axis=-1)))
    if not finite or not np.isfinite(ref).all():
        return {"top1_agreement": agreement, "cosine": None, "sqnr_db": None, "finite": finite}
    return {
        "top1_agreement": agreement,
        "cosine": _mean_row_cosine(ref, cand),
        "sqnr_db": sqnr_db(ref, cand),
        "finite": finite,
    }


def evaluate(
    session_run: RunFn, eval_set: EvalSet, *, output_index: int = 0, progress: bool | None = None
) -> tuple[np.ndarray, float | None]:
    """Run every batch of ``eval_set`` and score output ``output_index`` against the labels.

    Args:
        session_run: e.g. ``session.run``: named inputs -> list of outputs.
        eval_set: the evaluation batches and optional labels (one per sample, in order).
        output_index: which output holds the logits.
        progress: show a progress bar; by default only when stderr is a terminal.

    Returns:
        ``(logits, top1)``: the concatenated outputs and top-1 accuracy in [0, 1], or None for
        an unlabelled set.

    Raises:
        DataError: the set is empty, or the labels are not one class index (an integer below
            the number of logits) per sample.
        BackendError: the session failed on a batch.

    Example:
        >>> logits, top1 = evaluate(session.run, spec.eval_sets[0])
    """
    if not eval_set.batches:
        raise DataError(f"evaluation set {eval_set.name!r} has no batches.")
    what = f"evaluation set {eval_set.name!r}"
    labels = None
    if eval_set.labels is not None:  # count and type checked before the (long) run
        labels = check_labels(eval_set.labels, eval_set.num_samples, None, what)
    show_progress = sys.stderr.isatty() if progress is None else progress
    outputs = []
    for index, batch in enumerate(
        tqdm(eval_set.batches, desc=f"eval {eval_set.name}", disable=not show_progress, leave=False)
    ):
        try:
            result = session_run(dict(batch))
        except DeployCompError:
            raise
        except Exception as exc:
            raise BackendError(
                f"evaluation on {eval_set.name!r} failed at batch {index}: {exc}"
            ) from exc
        outputs.append(np.asarray(result[output_index]))
    logits = np.concatenate(outputs, axis=0)
    if labels is None:
        return logits, None
    if logits.ndim != 2:
        raise DataError(
            f"{what} has labels, but output {output_index} has shape {logits.shape}; top-1 "
            "needs logits of shape (samples, classes). Drop the labels or return logits."
        )
    labels = check_labels(labels, logits.shape[0], logits.shape[1], what)
    return logits, float(np.mean(np.argmax(logits, axis=-1) == labels))


def accuracy_row(
    backend: str,
    variant: str,
    eval_set: EvalSet,
    logits: np.ndarray,
    top1: float | None,
    reference_logits: np.ndarray | None = None,
) -> AccuracyRow:
    """Build the :class:`AccuracyRow` of one engine on one evaluation set.

    Args:
        backend: backend name (``"torch"`` for the fp32 reference itself).
        variant: engine variant (``"compiled"``, ``"fp32"``, ``"default_precision"``).
        eval_set: the set evaluated.
        logits: the engine's outputs from :func:`evaluate`.
        top1: the task metric from :func:`evaluate`.
        reference_logits: the fp32 torch model's outputs on the same set; without them the
            agreement fields are None.

    Example:
        >>> row = accuracy_row("openvino", "compiled", eval_set, logits, top1, ref_logits)
    """
    if reference_logits is None:
        comparison: dict[str, Any] = {
            "top1_agreement": None,
            "cosine": None,
            "sqnr_db": None,
            "finite": bool(np.isfinite(logits).all()),
        }
    else:
        comparison = compare_outputs(reference_logits, logits)
    return AccuracyRow(
        backend=backend,
        variant=variant,
        eval_set=eval_set.name,
        metric=eval_set.metric if eval_set.labels is not None else "",
        value=top1,
        num_samples=int(logits.shape[0]),
        top1_agreement=comparison["top1_agreement"],
        cosine=comparison["cosine"],
        sqnr_db=comparison["sqnr_db"],
        finite=comparison["finite"],
    )
