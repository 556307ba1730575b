"""Hardware-aware pruning amounts: how many channels each group keeps, under a latency target.

The cost model prices a pruned model without building it: every inventory layer whose module
loses input or output channels (:func:`channel_effects`) is rescaled (:func:`shrink_layer`: MACs,
weight and activation bytes, shapes) and priced by the roofline of the profile at the fastest
option the target accelerates for it (:func:`layer_ms`), so the amounts assume the precisions
the joint planner can give each layer afterwards. Activation x activation matmuls (attention
scores) are priced unpruned, which understates what removing heads buys.

:func:`plan_amounts` chooses per group a kept count from a grid of fractions rounded up to the
target's channel multiple (whole heads for attention), greedily: while the predicted latency is
above the target, take the one-level step of the group with the smallest loss increase per
predicted millisecond saved. The loss of a group at a level is the KL divergence of the model's
outputs from the unpruned ones on calibration batches with only that group's chosen units
zeroed, which is what removing them computes (the groups are zero-invariant). Deterministic:
ties go to the group listed first.

Two levels of choice: *which* units of a group go is decided per unit by a ranking, the group L2
norm or how much zeroing the unit moves its readers' outputs on the calibration batches
(:func:`~deploycomp.prune.apply.group_importance`), whichever measures the lower KL for that
group and amount (:func:`~deploycomp.prune.train.best_removal`; a first-order gradient score
needs labels or a loss landscape that distillation at step 0 does not have: student and teacher
agree, so the gradients are zero); *how many* go is decided by the measured KL above, because
amounts trade accuracy between groups of very different sensitivity, which per-unit scores do
not compare.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from deploycomp.errors import DeployCompError
from deploycomp.hw.profile import HardwareProfile
from deploycomp.plan.cost import roofline
from deploycomp.plan.inventory import CONV_KINDS, Layer
from deploycomp.plan.joint_planner import layer_options
from deploycomp.plan.options import BASELINE
from deploycomp.prune.attention import attention_spec
from deploycomp.prune.groups import ChannelGroup
from deploycomp.prune.train import (
    Forward,
    GroupPlan,
    Removal,
    best_removal,
    candidate_orders,
    fixed_keep,
    measure_for_ranking,
    removal_note,
)

# Fractions of a group's units the planner may keep (then rounded up to the channel multiple).
KEEP_GRID = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25)


@dataclasses.dataclass(frozen=True)
class ChannelEffect:
    """One group's hold on one layer: removing a unit removes ``per_unit`` of its ``axis``
    ("in" or "out") channels; a depthwise layer is held on both axes."""

    group: int
    axis: str
    per_unit: int


def channel_effects(
    model: nn.Module, groups: Sequence[ChannelGroup]
) -> dict[str, list[ChannelEffect]]:
    """Module path -> the groups that shrink its input or output channels."""
    effects: dict[str, list[ChannelEffect]] = {}
    for index, group in enumerate(groups):
        for slot in group.slots:
            if slot.role in ("out", "in"):
                targets = [(slot.module, slot.role)]
            elif slot.role == "depthwise":
                targets = [(slot.module, "out"), (slot.module, "in")]
            elif slot.role == "head":
                spec = attention_spec(model.get_submodule(slot.module))
                targets = [(f"{slot.module}.{c}", "out") for c in spec.projections]
            else:  # BatchNorm / LayerNorm: no compute of their own in the inventory
                continue
            for module, axis in targets:
                effects.setdefault(module, []).append(ChannelEffect(index, axis, slot.unit))
    return effects


def shrink_layer(layer: Layer, removed_in: int, removed_out: int) -> Layer:
    """``layer`` with ``removed_in`` input and ``removed_out`` output channels gone."""
    if not removed_in and not removed_out:
        return layer
    old_in, old_out = layer.in_channels, layer.out_channels
    new_in, new_out = old_in - removed_in, old_out - removed_out
    if new_in <= 0 or new_out <= 0:
        raise DeployCompError(
            f"layer {layer.name!r}: pruning leaves {new_in} input and {new_out} output channels"
        )
    r_in, r_out = new_in / old_in, new_out / old_out
    depthwise = layer.kind == "conv2d_depthwise"
    work = r_out if depthwise else r_in * r_out
    shape = list(layer.weight_shape)
    if layer.kind in CONV_KINDS:
        groups = new_out if depthwise else layer.groups
        shape[0], shape[1] = new_out, new_in // groups
    elif len(shape) == 2:  # Gemm stores [out, in]; MatMul [in, out]
        shape = [new_out, new_in] if shape == [old_out, old_in] else [new_in, new_out]
    out_shape = list(layer.output_shape)
    in_shape = list(layer.input_shape)
    axis = 1 if layer.kind in CONV_KINDS else -1
    if out_shape:
        out_shape[axis] = new_out
    if in_shape:
        in_shape[axis] = new_in
    out_bytes = 4 * math.prod(layer.output_shape) if layer.output_shape else 0
    in_bytes = layer.activation_bytes_fp32 - out_bytes
    return dataclasses.replace(
        layer,
        weight_shape=tuple(shape),
        output_shape=tuple(out_shape),
        input_shape=tuple(in_shape),
        in_channels=new_in,
        out_channels=new_out,
        macs=round(layer.macs * work),
        weight_bytes_fp32=round(layer.weight_bytes_fp32 * work),
        activation_bytes_fp32=round(in_bytes * r_in + out_bytes * r_out),
        groups=new_out if depthwise else layer.groups,
    )


def removed_channels(
    layer: Layer,
    effects: Mapping[str, Sequence[ChannelEffect]],
    groups: Sequence[ChannelGroup],
    keep: Sequence[int],
) -> tuple[int, int]:
    """The (input, output) channels ``layer`` loses with every group at ``keep[i]`` units."""
    removed = {"in": 0, "out": 0}
    for e in effects.get(layer.name, ()):
        removed[e.axis] += (groups[e.group].size - keep[e.group]) * e.per_unit
    return removed["in"], removed["out"]


def pruned_layers(
    layers: Sequence[Layer],
    effects: Mapping[str, Sequence[ChannelEffect]],
    groups: Sequence[ChannelGroup],
    keep: Sequence[int],
) -> list[Layer]:
    """The inventory with every group at ``keep[i]`` units."""
    return [shrink_layer(la, *removed_channels(la, effects, groups, keep)) for la in layers]


def layer_ms(layer: Layer, hw: HardwareProfile, backend: str, *, fastest: bool) -> float:
    """Roofline milliseconds of ``layer`` in fp32, or at the fastest option the target offers."""
    if not fastest:
        return roofline(hw, backend, layer, BASELINE).total_ms
    options, _ = layer_options(layer, hw, backend, unsigned_input=False)
    return min(roofline(hw, backend, layer, o).total_ms for o in options)


def keep_levels(group: ChannelGroup, multiple: int) -> list[int]:
    """The kept counts the planner may choose for ``group``, largest first (the whole group)."""
    step = 1 if group.unit == "head" else multiple
    levels = {group.size}
    for fraction in KEEP_GRID:
        keep = math.ceil(group.size * fraction / step) * step
        if step <= keep < group.size:
            levels.add(keep)
    return sorted(levels, reverse=True)


@torch.no_grad()
def group_losses(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    levels: Sequence[Sequence[int]],
    batches: Sequence[Any],
    forward: Forward,
) -> list[dict[int, Removal]]:
    """Per group and kept count: the units to remove (:func:`best_removal` of the two rankings)
    and the KL of the outputs with only them zeroed, from the model's own outputs, on
    ``batches``."""
    model = model.eval()
    energy, reference = measure_for_ranking(model, groups, batches, forward)
    losses = []
    for group, counts in zip(groups, levels):
        orders = candidate_orders(model, group, energy)
        table = {group.size: Removal((), next(iter(orders)), 0.0)}
        for keep in counts[1:]:
            table[keep] = best_removal(model, group, keep, orders, batches, forward, reference)
        losses.append(table)
    return losses


@dataclasses.dataclass(frozen=True)
class AmountPlan:
    """What :func:`plan_amounts` chose and what the cost model predicts of it."""

    plans: tuple[GroupPlan, ...]
    fp32_ms: float  # unpruned, fp32
    fastest_ms: float  # unpruned, every layer at its fastest option
    pruned_fp32_ms: float
    pruned_fastest_ms: float
    target_ms: float | None
    reached: bool


def plan_amounts(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    layers: Sequence[Layer],
    hw: HardwareProfile,
    backend: str,
    *,
    latency_target: float | None,
    keep_fraction: float | None,
    multiple: int,
    batches: Sequence[Any],
    forward: Forward,
) -> AmountPlan:
    """Per group, the units to remove: a fixed ``keep_fraction`` of every group, or the amounts
    that bring the predicted latency (each layer at its fastest option) to ``latency_target``
    times the unpruned fp32 prediction, removing the least loss per millisecond saved first.

    Args:
        model: the fp32 model the groups were built on.
        groups: its prunable groups (:meth:`PruneGraph.prunable`).
        layers: its inventory at the planned batch size (names are module paths).
        hw, backend: the target and the backend the plan is for.
        latency_target: fraction of the unpruned fp32 prediction to reach (planned amounts).
        keep_fraction: fraction of every group to keep (fixed amounts); exactly one of the two.
        multiple: kept channel counts are multiples of this (heads are kept whole).
        batches: calibration inputs for the loss of each amount; ``forward(model, batch)``
            returns the logits.

    Raises:
        DeployCompError: both or neither of ``latency_target`` and ``keep_fraction``.
    """
    if (latency_target is None) == (keep_fraction is None):
        raise DeployCompError(
            "pass either a latency target (the planner chooses each group's amount) or a keep "
            "fraction (the same for every group), not both or neither"
        )
    whole = [
        GroupPlan(g, (), f"kept whole: {g.reason or 'not zero-invariant'}")
        for g in groups
        if not g.zero_invariant
    ]
    groups = [g for g in groups if g.zero_invariant]
    effects = channel_effects(model, groups)
    if keep_fraction is None:
        levels = [keep_levels(g, multiple) for g in groups]
    else:
        levels = [sorted({g.size, fixed_keep(g, keep_fraction, multiple)}, reverse=True)
                  for g in groups]  # fmt: skip
    losses = group_losses(model, groups, levels, batches, forward)
    full = [g.size for g in groups]
    priced: dict[tuple[str, int, int, bool], float] = {}

    def cost(keep: Sequence[int], fastest: bool) -> float:
        total = 0.0
        for layer in layers:
            removed = removed_channels(layer, effects, groups, keep)
            key = (layer.name, *removed, fastest)
            if key not in priced:
                priced[key] = layer_ms(shrink_layer(layer, *removed), hw, backend, fastest=fastest)
            total += priced[key]
        return total

    fp32_ms, fastest_ms = cost(full, False), cost(full, True)
    target_ms = None if latency_target is None else latency_target * fp32_ms
    position = [0] * len(groups)
    if keep_fraction is not None:
        position = [len(lv) - 1 for lv in levels]
    else:
        current = fastest_ms
        while current > target_ms:
            best = None
            for i, lv in enumerate(levels):
                if position[i] + 1 >= len(lv):
                    continue
                trial = [lv[p] for lv, p in zip(levels, position)]
                trial[i] = lv[position[i] + 1]
                saved = current - cost(trial, True)
                if saved <= 0:
                    continue
                extra = losses[i][trial[i]].kl - losses[i][lv[position[i]]].kl
                score = max(extra, 0.0) / saved
                if best is None or score < best[0]:
                    best = (score, i, current - saved)
            if best is None:
                break
            position[best[1]] += 1
            current = best[2]
    keep = [lv[p] for lv, p in zip(levels, position)]
    plans = []
    for i, group in enumerate(groups):
        alone = list(full)
        alone[i] = keep[i]
        saving = fastest_ms - cost(alone, True)
        removal = losses[i][keep[i]]
        unit = "heads" if group.unit == "head" else "channels"
        how = (
            f"keep {keep_fraction:.0%}, rounded up to "
            + ("whole heads" if group.unit == "head" else f"a multiple of {multiple}")
            if keep_fraction is not None
            else f"planned for {latency_target:.0%} of fp32 latency"
        )
        reason = (
            f"{group.size} -> {keep[i]} {unit} ({how}; {removal_note(removal)}; predicted "
            f"-{saving:.4f} ms)"
        )
        plans.append(GroupPlan(group, removal.drop, reason, saving, removal.kl))
    pruned_fastest = cost(keep, True)
    return AmountPlan(
        plans=tuple(plans + whole),
        fp32_ms=fp32_ms,
        fastest_ms=fastest_ms,
        pruned_fp32_ms=cost(keep, False),
        pruned_fastest_ms=pruned_fastest,
        target_ms=target_ms,
        reached=target_ms is None or pruned_fastest <= target_ms,
    )
