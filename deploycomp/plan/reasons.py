"""Reasons for the joint planner's choices: one sentence per layer, true for the plan's numbers.

Takes the joint planner's priced candidates for a layer (every option it was offered, the ones the
solver could choose, why the others were dropped or not offered), the option chosen, the hardware
profile, backend and budget; returns the human-readable strings the plan records in
:attr:`~deploycomp.artifacts.LayerDecision.reason`: why an option was chosen (how much faster or
smaller than fp32, by which cost source), why a layer kept fp32 (where it ranks by sensitivity, or
why no option paid), and why an option gained too little to be considered. Only wording lives
here; what counts as paying and which option wins is the planner's
(:mod:`deploycomp.plan.joint_planner`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from deploycomp.hw import HardwareProfile
from deploycomp.plan.inventory import Layer
from deploycomp.plan.options import ACT_UINT8, FP32, WEIGHT_INT8, Option

if TYPE_CHECKING:
    from deploycomp.plan.joint_planner import Budget, Candidates, Priced

_NOUNS = {
    "linear": "GEMM",
    "conv2d": "convolution",
    "conv2d_depthwise": "depthwise convolution",
    "conv2d_grouped": "grouped convolution",
    "embedding": "table",
}


def explain(
    c: Candidates,
    pick: Priced,
    hw: HardwareProfile,
    backend: str,
    budget: Budget,
    ranks: Mapping[str, str],
    *,
    min_gain: float,
) -> str:
    """Why ``pick`` for this layer, true for the numbers the plan records.

    Args:
        c: the layer's priced candidates.
        pick: the option the solver chose, one of ``c.kept``.
        hw: the target.
        backend: the backend the plan is for.
        budget: the budget the plan was made for.
        ranks: layer name -> its rank by sensitivity (:func:`sensitivity_ranks`).
        min_gain: the fraction of fp32 time (or bytes) an option must save to pay.

    Returns:
        The reason, then why options were not offered or were backed off, joined by ``"; "``.

    Example:
        >>> explain(cands, pick, load_profile("intel/xeon-icx"), "onnxruntime", Budget(),
        ...         ranks, min_gain=0.02)
        'int8: int8 GEMM 3.0x faster than fp32 on intel/xeon-icx (measured); no 2:4: ...'
    """
    tail = list(c.notes)
    if c.backed_off:
        tail.append(f"backed off by the accuracy loop: {', '.join(c.backed_off)}")
    if not pick.option.is_fp32:
        return "; ".join([_chosen(c, pick, hw, backend, budget), *tail])
    table = "embedding table, " if c.layer.kind == "embedding" else ""
    others = [p for p in c.kept if not p.option.is_fp32]
    if others:
        gentlest = min(others, key=lambda p: (p.sensitivity, p.option))
        head = (
            f"kept fp32: {table}{ranks[c.layer.name]} (loss +{gentlest.sensitivity:.3g} at "
            f"{gentlest.option.key}) and the budget is met without it"
        )
        return "; ".join([head, *tail])
    if c.why_dropped:
        dropped = "; ".join(f"{key} {why}" for key, why in c.why_dropped.items())
        gain = f"no option gains {min_gain:.0%} over fp32 on {hw.id}"
        return "; ".join([f"kept fp32: {table}{gain}: {dropped}", *tail])
    if c.backed_off:
        return f"kept fp32: {table}every option was backed off by the accuracy loop " + (
            f"({', '.join(c.backed_off)})"
        )
    return "; ".join([f"kept fp32: {table.rstrip(', ') or 'no compressed kernel'}", *tail])


def no_pay(
    p: Priced, fp32: Priced, layer: Layer, hw: HardwareProfile, backend: str, by_size: bool
) -> str:
    """Why ``p`` gains too little over fp32 on what the budget asks for.

    Args:
        p: the option that does not pay.
        fp32: the layer's fp32 option.
        layer: the inventory layer.
        hw: the target.
        backend: the backend the plan is for.
        by_size: the budget has a size target (the size gain is stated too).

    Returns:
        E.g. ``"1.01x faster than fp32 (roofline)"``.

    Example:
        >>> no_pay(int8, fp32, conv, load_profile("intel/xeon-icx"), "onnxruntime", False)
        '1.01x faster than fp32 (roofline)'
    """
    text = f"{_speed(p.ms, fp32.ms)} ({p.source})"
    if by_size:
        smaller = fp32.bytes / p.bytes if p.bytes else math.inf
        text += "; no smaller" if smaller <= 1 else f"; only {_ratio(smaller)} smaller"
    if _unfused(hw, backend, layer, p.option):
        text += f": {backend} dequantizes the whole {_weight_noun(layer)} on every run"
    return text


def sensitivity_ranks(cands: Sequence[Candidates]) -> dict[str, str]:
    """Layer -> where it ranks by its gentlest compressed option's loss, most sensitive first.

    Ties share a rank; layers the solver can only keep fp32 are not ranked.

    Args:
        cands: the priced candidates of every layer the solver chooses for.

    Returns:
        Layer name -> e.g. ``"most sensitive layer"``, ``"3rd most sensitive of 36, tied with 5"``.

    Example:
        >>> sensitivity_ranks(cands)["classifier.3"]
        '2nd most sensitive of 4'
    """
    gentlest = {
        c.layer.name: min(p.sensitivity for p in c.kept if not p.option.is_fp32)
        for c in cands
        if any(not p.option.is_fp32 for p in c.kept)
    }
    ranks = {}
    for name, loss in gentlest.items():
        rank = 1 + sum(other > loss for other in gentlest.values())
        ties = sum(other == loss for other in gentlest.values()) - 1
        text = "most sensitive layer" if rank == 1 else f"{_ordinal(rank)} most sensitive of "
        text += "" if rank == 1 else f"{len(gentlest)}"
        ranks[name] = text + (f", tied with {ties}" if ties else "")
    return ranks


def _chosen(c: Candidates, pick: Priced, hw: HardwareProfile, backend: str, budget: Budget) -> str:
    fp32, key = c.priced[0], pick.option.key
    text = f"{key}: {_describe(c.layer, pick)} {_speed(pick.ms, fp32.ms)} on {hw.id}"
    int8 = next(
        (
            p
            for p in c.priced
            if p.option.weight == WEIGHT_INT8
            and p.option.activation != FP32
            and p.option.sparsity == "none"
        ),
        None,
    )
    if pick.option.weight.startswith("int4") and int8 is not None:
        if pick.ms < int8.ms:
            text += f", {_ratio(int8.ms / pick.ms)} faster than {int8.option.key}"
        else:
            text += f", {_ratio(pick.ms / int8.ms)} slower than {int8.option.key}"
    same = pick.source == fp32.source
    text += f" ({pick.source})" if same else f" ({key} {pick.source}, fp32 {fp32.source})"
    if budget.size_target is not None and pick.bytes < fp32.bytes:
        text += f"; {_ratio(fp32.bytes / pick.bytes)} smaller than fp32"
    if _unfused(hw, backend, c.layer, pick.option):
        text += f"; {backend} dequantizes the whole {_weight_noun(c.layer)} on every run"
    return text


def _describe(layer: Layer, p: Priced) -> str:
    option, noun = p.option, _NOUNS.get(layer.kind, layer.kind)
    precision = option.weight.split("_")[0]
    if option.sparsity != "none":
        return f"sparse {precision} {noun}"
    if option.activation == FP32:
        text = f"{precision} weight-only {noun}"
        if layer.kind == "linear" and p.memory_bound and p.source == "roofline":
            text += f", memory-bound at M={layer.rows} rows,"
        return text
    if option.activation == ACT_UINT8:
        return f"int8 {noun} (uint8 input: never negative in calibration)"
    return f"int8 {noun}"


def _unfused(hw: HardwareProfile, backend: str, layer: Layer, option: Option) -> bool:
    """A weight-only option the backend expands to fp32 on every run instead of fusing."""
    cap = hw.capabilities.get(backend, {}).get(layer.kind)
    weight_only = option.activation == FP32 and option.weight != FP32
    return weight_only and cap is not None and not cap.weight_only_fused


def _speed(ms: float, fp32_ms: float) -> str:
    if ms < fp32_ms:
        return f"{_ratio(fp32_ms / ms)} faster than fp32"
    return f"{_ratio(ms / fp32_ms)} slower than fp32"


def _ratio(x: float) -> str:
    return f"{x:.1f}x" if x >= 1.095 else f"{x:.2f}x"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _weight_noun(layer: Layer) -> str:
    return "table" if layer.kind == "embedding" else "weight"
