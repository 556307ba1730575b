"""The joint-compression planner: one option per layer, chosen exactly under a budget.

Takes the inventory, the hardware profile and backend, a sensitivity table (the loss increase with
only one layer compressed one way) and a :class:`Budget`; returns a :class:`JointPlanResult`: the
:class:`~deploycomp.artifacts.CompressionPlan`, whose every decision says why (worded by
:mod:`deploycomp.plan.reasons`), and the totals and per-option prices the report shows. A layer's
options are those the backend accelerates on the device (:func:`layer_options`), priced by the one
cost model (:mod:`deploycomp.plan.cost`). Options that do not pay on what the budget asks for (time,
or size) and options dominated by another are dropped; choosing one option per layer is then a
multiple-choice knapsack, solved exactly by :mod:`deploycomp.plan.knapsack` with
``scipy.optimize.milp`` (HiGHS): minimise the summed sensitivity under the latency and size
constraints or, with neither target, minimise the predicted latency. A second solve breaks ties
lexicographically (latency after sensitivity, sensitivity after latency), so the same input always
gives the same plan.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

from deploycomp.artifacts import CompressionPlan, LayerDecision
from deploycomp.errors import BackendError, DeployCompError, closest_match_hint
from deploycomp.hw import HardwareProfile
from deploycomp.hw.profile import OpCapability
from deploycomp.plan import cost, knapsack, reasons
from deploycomp.plan.inventory import CONV_KINDS, Layer
from deploycomp.plan.options import (
    ACT_INT8,
    ACT_UINT8,
    BASELINE,
    FP32,
    SPARSE_2_4,
    WEIGHT_INT8,
    Option,
)

# An option must save this fraction of the layer's fp32 time (or bytes, under a size target) to
# count as paying: below it the roofline cannot tell the two apart.
MIN_GAIN = 0.02


@dataclasses.dataclass(frozen=True)
class Budget:
    """What the plan must reach; targets are fractions of the fp32 model's own numbers.

    Attributes:
        latency_target: predicted latency as a fraction of the fp32 predicted latency of the
            whole model (the inventory layers), in (0, 1]; 0.5 asks for twice as fast.
        size_target: stored weight bytes as a fraction of the fp32 weight bytes of the
            inventory layers, in (0, 1].
        max_accuracy_drop: points of the task metric the compressed model may lose; enforced by
            the closed loop after training, recorded here.

    Example:
        >>> Budget(latency_target=0.5, max_accuracy_drop=1.0)
        Budget(latency_target=0.5, size_target=None, max_accuracy_drop=1.0)
    """

    latency_target: float | None = None
    size_target: float | None = None
    max_accuracy_drop: float | None = None

    def __post_init__(self) -> None:
        for name, what in (("latency_target", "latency"), ("size_target", "weight bytes")):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise DeployCompError(
                    f"{name} must be a fraction of the fp32 model's {what} in (0, 1], got "
                    f"{value!r}; e.g. 0.5 asks for half. Pass a number in that range, or None for "
                    "no target."
                )
        drop = self.max_accuracy_drop
        if drop is not None and (
            isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop < math.inf
        ):
            raise DeployCompError(
                f"max_accuracy_drop must be a finite number of metric points >= 0, got {drop!r}; "
                "e.g. 1.0 allows one point of top-1 accuracy. Pass such a number, or None."
            )


@dataclasses.dataclass(frozen=True)
class JointPlanResult:
    """A joint plan with its totals and the prices of every option considered.

    Attributes:
        plan: one decision per inventory layer, in inventory order.
        predicted_ms: predicted latency of the plan (the inventory layers).
        fp32_ms: predicted latency of the same layers in fp32.
        bytes: stored weight bytes of the plan, scales and 2:4 metadata included.
        fp32_bytes: fp32 weight bytes of the inventory layers.
        options: layer name -> ``(option key, ms, bytes, sensitivity)`` of each option the layer
            was offered and not backed off, in :func:`layer_options` order (fp32 first), including
            those dropped for not paying or being dominated.
        budget: the budget the plan was made for.
    """

    plan: CompressionPlan
    predicted_ms: float
    fp32_ms: float
    bytes: int
    fp32_bytes: int
    options: dict[str, list[tuple[str, float, int, float]]]
    budget: Budget


@dataclasses.dataclass(frozen=True)
class Priced:
    """One option of one layer with its cost-model price and its sensitivity."""

    option: Option
    ms: float
    source: str
    bytes: int
    sensitivity: float
    memory_bound: bool


@dataclasses.dataclass
class Candidates:
    """A layer's priced options: all of them, those the solver may choose, and why not the rest."""

    layer: Layer
    priced: list[Priced]  # every option offered and not backed off, fp32 first
    kept: list[Priced]  # those the solver may choose
    notes: list[str]  # why options were not offered
    backed_off: list[str]
    why_dropped: dict[str, str]


def layer_options(
    layer: Layer, hw: HardwareProfile, backend: str, *, unsigned_input: bool
) -> tuple[list[Option], list[str]]:
    """The options ``backend`` on ``hw`` accelerates for ``layer``, and why others are missing.

    fp32 first, then W8A8 INT8 (uint8 input where ``unsigned_input`` and the backend takes it),
    INT8 and INT4 weight-only where the profile lists them (INT4 never for convolutions, and never
    with INT8 activations: that form runs unfused and slow), then 2:4 variants where the backend
    has 2:4 kernels for the kind, the layer clears ``min_channels_for_2_4``, its reduction size is
    a multiple of 4 and the device has sparse units for the option's precision.

    Args:
        layer: an inventory layer.
        hw: the target.
        backend: the backend the plan is for.
        unsigned_input: calibration shows the layer's input is never negative.

    Returns:
        (options, reasons for the options not offered, e.g. ``"no 2:4: openvino on
        intel/xeon-icx has no 2:4 kernels"``).

    Example:
        >>> [o.key for o in layer_options(query, load_profile("nvidia/a100"), "tensorrt",
        ...                                 unsigned_input=False)[0]]
        ['fp32', 'int8', 'int4 w-only', '2:4+int8']
    """
    if not layer.eligible or layer.kind == "matmul":
        return [BASELINE], [layer.why_not or "no constant weight"]
    where = f"{backend} on {hw.id}"
    cap = hw.capabilities.get(backend, {}).get(layer.kind)
    if cap is None:
        return [BASELINE], [f"no compression: {where} lists no {layer.kind} kernels"]
    options, notes = [BASELINE], []

    def accelerated(option: Option, channels: int | None = -1) -> bool:
        if channels == -1:
            channels = min(layer.in_channels, layer.out_channels)
        return hw.accelerates(
            backend,
            layer.kind,
            option.weight,
            option.activation,
            option.sparsity,
            channels=channels,
        )

    w8a8 = Option(WEIGHT_INT8, ACT_UINT8 if unsigned_input else ACT_INT8)
    if not accelerated(w8a8):
        w8a8 = Option(WEIGHT_INT8, ACT_INT8)
    if accelerated(w8a8):
        options.append(w8a8)
    elif layer.kind != "embedding":
        notes.append(f"no int8: {where} has no INT8 {layer.kind} kernel")
    int4 = _int4_scheme(layer, cap)
    weight_only = [Option(WEIGHT_INT8)] + ([Option(int4)] if int4 else [])
    if layer.kind in CONV_KINDS:
        weight_only = weight_only[:1]
        notes.append(f"no int4: INT4 is never used for convolutions on {hw.id}")
    options += [o for o in weight_only if accelerated(o)]
    groups = _int4_groups(cap)
    if layer.kind == "embedding" and len(options) == 1:
        notes.append(f"no weight-only: {where} has no weight-only embedding kernel")
    elif layer.kind not in CONV_KINDS and groups and int4 is None:
        notes.append(
            f"no int4: the reduction size {layer.reduction_size} is not a multiple of any INT4 "
            f"group size {where} runs ({', '.join(map(str, groups))})"
        )
    elif not any(o.weight.startswith("int4") for o in options) and layer.kind not in CONV_KINDS:
        notes.append(f"no int4: {where} has no INT4 weight-only {layer.kind} kernel")
    if layer.kind != "embedding":
        sparse = [Option(FP32, FP32, SPARSE_2_4), dataclasses.replace(w8a8, sparsity=SPARSE_2_4)]
        if layer.reduction_size % 4:
            offered = []
        elif _has_measured_2_4(hw, backend, layer.kind):
            # measured timings decide, at the shapes measured, instead of min_channels_for_2_4
            runs = [o for o in sparse if accelerated(o, channels=None)]
            offered = [o for o in runs if cost.measured_entry(hw, backend, layer, o) is not None]
            if runs and not offered:
                notes.append(
                    f"no 2:4 at shape {layer.shape_key}: {hw.id} has measured 2:4 timings for "
                    f"{backend}, but not at this shape (time it with deploycomp calibrate-target)"
                )
        else:
            offered = [o for o in sparse if accelerated(o)]
        # Without sparse units for its precision a 2:4 layer is stored and run dense: it can
        # only cost accuracy, so it is not offered (nor scored).
        units = [o for o in offered if cost.sparse_units(hw, o)]
        options += units
        if not offered:
            notes.append(_why_no_2_4(layer, hw, backend))
        for option in offered:
            if option not in units:
                precision = cost.compute_precision(option)
                notes.append(f"no {precision} 2:4: {hw.id} has no {precision} sparse units")
    return options, notes


def _has_measured_2_4(hw: HardwareProfile, backend: str, op_kind: str) -> bool:
    """Whether the profile holds measured 2:4 timings for this backend and op kind: then "2:4
    pays above N channels at this batch" comes from the measurement (an option is priced, and
    offered, only at a measured shape), not from the declared ``min_channels_for_2_4``."""
    return any(
        (e.backend, e.op_kind, e.sparsity) == (backend, op_kind, SPARSE_2_4) for e in hw.measured
    )


def _int4_groups(cap: OpCapability) -> list[int]:
    """Group sizes of the symmetric INT4 weight-only schemes a capability lists, largest first."""
    found = (re.fullmatch(r"int4_sym_group(\d+)", s) for s in cap.weight_only_schemes)
    return sorted((int(m.group(1)) for m in found if m), reverse=True)


def _int4_scheme(layer: Layer, cap: OpCapability) -> str | None:
    """The INT4 scheme with the largest listed group that divides the layer's reduction size
    (fewest scales; 128 for MiniLM's 384-wide rows, 32 for a 3136-wide one), or None."""
    for group in _int4_groups(cap):
        if layer.reduction_size % group == 0:
            return f"int4_sym_group{group}"
    return None


def _why_no_2_4(layer: Layer, hw: HardwareProfile, backend: str) -> str:
    where = f"{backend} on {hw.id}"
    caps = hw.capabilities.get(backend, {})
    cap = caps[layer.kind]
    if SPARSE_2_4 not in cap.sparsity:
        if any(SPARSE_2_4 in c.sparsity for c in caps.values()):
            return f"no 2:4: {where} has no 2:4 kernels for {layer.kind}"
        return f"no 2:4: {where} has no 2:4 kernels"
    if layer.reduction_size % 4:
        return f"no 2:4: reduction size {layer.reduction_size} is not a multiple of 4"
    channels = min(layer.in_channels, layer.out_channels)
    if cap.min_channels_for_2_4 is not None and channels < cap.min_channels_for_2_4:
        minimum = cap.min_channels_for_2_4
        return f"no 2:4: {channels} channels < {minimum}, the sparse kernel does not pay"
    return f"no 2:4: {where} runs no 2:4 kernel for this layer's schemes"


def plan_joint(
    layers: Sequence[Layer],
    hw: HardwareProfile,
    backend: str,
    *,
    sensitivity: Mapping[str, Mapping[str, float]],
    budget: Budget,
    batch_size: int,
    model_name: str,
    seed: int,
    unsigned_inputs: Mapping[str, bool] | None = None,
    exclude: Mapping[str, set[str]] | None = None,
) -> JointPlanResult:
    """Choose one compression option per layer for ``backend`` on ``hw`` under ``budget``.

    With a latency and/or size target, the plan minimises the summed sensitivity subject to the
    targets; with neither, it is the fastest plan (least sensitive among equally fast ones).
    Layers that are not eligible, and ``matmul`` layers, stay fp32 with their reason.

    Args:
        layers: the inventory at ``batch_size``.
        hw: the target.
        backend: the backend the plan is for; one of ``hw.backends``.
        sensitivity: layer name -> option key -> loss increase with only that layer compressed
            that way (>= 0; fp32 counts as 0). Every option a layer is offered and not excluded
            needs an entry.
        budget: latency / size targets (the accuracy drop is the closed loop's).
        batch_size: the batch size the inventory was built for (recorded in the plan).
        model_name: recorded in the plan.
        seed: recorded in the plan.
        unsigned_inputs: layer name -> its input is never negative (uint8 input where the backend
            takes it); absent means signed.
        exclude: layer name -> option keys the closed loop backed off; never chosen again.

    Returns:
        The plan, its predicted latency and size against fp32, and every option's price.

    Raises:
        DeployCompError: the budget cannot be met (the message names the best fraction
            reachable), a sensitivity entry is missing or invalid, ``exclude`` names an unknown
            layer or fp32.
        BackendError: ``backend`` is not one of the profile's backends.

    Example:
        >>> result = plan_joint(layers, load_profile("nvidia/a100"), "tensorrt",
        ...                     sensitivity=table, budget=Budget(latency_target=0.8),
        ...                     batch_size=1, model_name="minilm-l6", seed=0)
        >>> result.predicted_ms <= 0.8 * result.fp32_ms
        True
    """
    unsigned_inputs = unsigned_inputs or {}
    exclude = exclude or {}
    _check_arguments(layers, hw, backend, exclude)
    fixed = {  # layers that stay fp32 whatever the budget -> their predicted ms
        la.name: cost.option_ms(hw, backend, la, BASELINE)[0]
        for la in layers
        if not la.eligible or la.kind == "matmul"
    }
    candidates = [
        _candidates(
            la,
            hw,
            backend,
            sensitivity,
            budget,
            unsigned_inputs.get(la.name, False),
            set(exclude.get(la.name, ())),
        )
        for la in layers
        if la.name not in fixed
    ]
    fixed_ms = sum(fixed.values())
    fixed_bytes = sum(la.weight_bytes_fp32 for la in layers if la.name in fixed)
    fp32_ms = fixed_ms + sum(c.priced[0].ms for c in candidates)
    fp32_bytes = fixed_bytes + sum(c.priced[0].bytes for c in candidates)
    excluded = sum(len(c.backed_off) for c in candidates)
    where = f"with {backend} on {hw.id}"
    if excluded:
        where += f" ({excluded} options excluded by earlier back-offs)"
    ordered = sorted(candidates, key=lambda c: c.layer.name)
    picks = knapsack.solve(ordered, budget, (fixed_ms, fixed_bytes), (fp32_ms, fp32_bytes), where)
    chosen = {c.layer.name: pick for c, pick in zip(ordered, picks)}
    ranks = reasons.sensitivity_ranks(candidates)
    by_name = {c.layer.name: c for c in candidates}
    decisions = []
    for layer in layers:
        cand = by_name.get(layer.name)
        if cand is None:
            reason = f"kept fp32: {layer.why_not or 'not compressible'}"
            decisions.append(
                _decision(layer, BASELINE, reason, fixed[layer.name], fixed[layer.name])
            )
            continue
        pick = chosen[layer.name]
        reason = reasons.explain(cand, pick, hw, backend, budget, ranks, min_gain=MIN_GAIN)
        decisions.append(_decision(layer, pick.option, reason, cand.priced[0].ms, pick.ms))
    plan = CompressionPlan(
        model_name=model_name,
        target_id=hw.id,
        batch_size=batch_size,
        layers=tuple(decisions),
        seed=seed,
    )
    return JointPlanResult(
        plan=plan,
        predicted_ms=fixed_ms + sum(p.ms for p in chosen.values()),
        fp32_ms=fp32_ms,
        bytes=fixed_bytes + sum(p.bytes for p in chosen.values()),
        fp32_bytes=fp32_bytes,
        options={
            c.layer.name: [(p.option.key, p.ms, p.bytes, p.sensitivity) for p in c.priced]
            for c in candidates
        },
        budget=budget,
    )


def _check_arguments(
    layers: Sequence[Layer], hw: HardwareProfile, backend: str, exclude: Mapping[str, set[str]]
) -> None:
    if backend not in hw.backends:
        raise BackendError(
            f"backend {backend!r} is not one of {hw.id}'s backends ({', '.join(hw.backends)})."
            f"{closest_match_hint(backend, hw.backends)} Plan for one of those."
        )
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise DeployCompError("the inventory repeats layer names; build it with build_inventory")
    for name, keys in exclude.items():
        if name not in names:
            raise DeployCompError(
                f"exclude names layer {name!r}, which the inventory does not have."
                f"{closest_match_hint(name, names)} Use the inventory's layer names."
            )
        if FP32 in keys:
            raise DeployCompError(
                f"exclude forbids 'fp32' for layer {name!r}; fp32 is the fallback every layer "
                "keeps. Exclude compressed options only."
            )


def _decision(
    layer: Layer, option: Option, reason: str, fp32_ms: float, ms: float
) -> LayerDecision:
    return LayerDecision(
        layer.name,
        layer.node,
        layer.kind,
        layer.weight_shape,
        layer.macs,
        option.weight,
        option.activation,
        option.sparsity,
        reason,
        fp32_ms,
        ms,
    )


def _candidates(
    layer: Layer,
    hw: HardwareProfile,
    backend: str,
    sensitivity: Mapping[str, Mapping[str, float]],
    budget: Budget,
    unsigned_input: bool,
    excluded: set[str],
) -> Candidates:
    """Price a layer's options, then drop those that do not pay and those dominated."""
    options, notes = layer_options(layer, hw, backend, unsigned_input=unsigned_input)
    backed_off = [o.key for o in options if o.key in excluded]
    priced = []
    for option in options:
        if option.key in excluded:
            continue
        ms, source = cost.option_ms(hw, backend, layer, option)
        roof = cost.roofline(hw, backend, layer, option)
        sens = 0.0 if option.is_fp32 else _sensitivity(sensitivity, layer.name, option.key)
        priced.append(
            Priced(
                option, ms, source, cost.option_bytes(layer, option, hw), sens, roof.memory_bound
            )
        )
    fp32 = priced[0]
    by_time = budget.latency_target is not None or budget.size_target is None
    by_size = budget.size_target is not None
    why_dropped: dict[str, str] = {}
    paying = [fp32]
    for p in priced[1:]:
        faster = p.ms < (1 - MIN_GAIN) * fp32.ms
        smaller = p.bytes < (1 - MIN_GAIN) * fp32.bytes
        if (by_time and faster) or (by_size and smaller):
            paying.append(p)
        else:
            why_dropped[p.option.key] = reasons.no_pay(p, fp32, layer, hw, backend, by_size)
    kept = []
    for p in paying:
        better = next((q for q in paying if q is not p and _dominates(q, p, by_size)), None)
        if better is None:
            kept.append(p)
        else:
            why_dropped[p.option.key] = f"dominated by {better.option.key}"
    return Candidates(layer, priced, kept, notes, backed_off, why_dropped)


def _sensitivity(table: Mapping[str, Mapping[str, float]], name: str, key: str) -> float:
    row = table.get(name)
    if row is None or key not in row:
        known = sorted(row) if row is not None else []
        raise DeployCompError(
            f"the sensitivity table has no entry for layer {name!r}, option {key!r} (it has "
            f"{known or 'no row for this layer'}). Score every option layer_options() offers "
            "(deploycomp.plan.sensitivity.measure_sensitivity), or exclude the option."
        )
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise DeployCompError(
            f"sensitivity of layer {name!r}, option {key!r} is {value!r}; expected a finite loss "
            "increase >= 0. Rescore the layer."
        )
    return float(value)


def _dominates(q: Priced, p: Priced, by_size: bool) -> bool:
    """q is no slower, no more sensitive (and, under a size target, no larger) than p, and better
    on one of them; among equals, the earlier option wins."""
    qs = (q.ms, q.sensitivity) + ((q.bytes,) if by_size else ())
    ps = (p.ms, p.sensitivity) + ((p.bytes,) if by_size else ())
    if qs == ps:
        return q.option < p.option
    return all(a <= b for a, b in zip(qs, ps))
