"""Structured pruning trained with distillation: choose units, shrink them to zero, remove them.

:func:`plan_pruning` picks, for every prunable zero-invariant group, the least important units
(:func:`best_removal`: by group L2 norm or by the output change of zeroing each, whichever
measures the lower KL on the first training batches) so that the group keeps
``keep_fraction`` of its units, rounded up to the target's channel multiple
(:func:`channel_multiple`). :func:`prune_with_distillation` then trains a copy of the model
against the original (KL divergence of the outputs, no labels): during the first
``shrink_fraction`` of the steps the chosen units are projected toward zero after every optimizer
step (multiplied by ``(T - t - 1) / (T - t)``, exactly zero at step ``T``, a progressive
projection in the spirit of GETA's QASSO rather than a penalty, so the amount removed is the
plan's, not a side effect of a penalty weight), the rest of the network adapting around them;
then the units are removed physically and training continues on the smaller dense model. The
caller quantizes the result (ranges are calibrated on the pruned model).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from deploycomp.compress.joint import distillation_loss, distillation_mode
from deploycomp.errors import DeployCompError
from deploycomp.hw.profile import HardwareProfile
from deploycomp.prune.apply import group_importance, input_energy, prune_group, scale_units
from deploycomp.prune.graph import build_groups
from deploycomp.prune.groups import ChannelGroup

Forward = Callable[[nn.Module, Any], torch.Tensor]
RANKING_BATCHES = 4  # training batches the units to remove are chosen on


def channel_multiple(hw: HardwareProfile) -> int:
    """The channel count multiple the target runs at full speed: 16 on GPUs (INT8 tensor-core
    tiles) and AVX-512 CPUs (16 int8 x 4 lanes per VNNI instruction), 8 elsewhere (AVX2)."""
    if hw.kind == "gpu" or any(f.startswith("avx512") for f in hw.isa_flags):
        return 16
    return 8


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    """One group's pruning: the units removed and why."""

    group: ChannelGroup
    drop: tuple[int, ...]
    reason: str
    predicted_saving_ms: float | None = None  # the cost model's saving of this amount alone
    loss_increase: float | None = None  # KL of the outputs with only these units zeroed

    @property
    def keep(self) -> list[int]:
        dropped = set(self.drop)
        return [u for u in range(self.group.size) if u not in dropped]


def fixed_keep(group: ChannelGroup, keep_fraction: float, multiple: int) -> int:
    """The units a group keeps at ``keep_fraction``: rounded up to ``multiple`` channels (whole
    heads for attention), at least one step, at most the group."""
    step = 1 if group.unit == "head" else multiple
    return min(group.size, max(step, math.ceil(group.size * keep_fraction / step) * step))


class Removal(NamedTuple):
    """The units a group loses at one amount, the ranking that chose them, and the KL of the
    outputs with only those units zeroed (None where no data measured it)."""

    drop: tuple[int, ...]
    ranking: str
    kl: float | None


def candidate_orders(
    model: nn.Module, group: ChannelGroup, energy: dict[str, torch.Tensor] | None
) -> dict[str, list[int]]:
    """Ranking name -> the group's units, least important first: by output change (with
    ``energy``) and by group L2 norm (:func:`~deploycomp.prune.apply.group_importance`)."""
    orders = {}
    if energy is not None:
        orders["output change"] = drop_order(model, group, energy)
    orders["group L2 norm"] = drop_order(model, group)
    return orders


@torch.no_grad()
def measure_for_ranking(
    model: nn.Module, groups: Sequence[ChannelGroup], batches: Sequence[Any], forward: Forward
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """What choosing the units to remove measures on ``batches``, once for all groups: the
    readers' input energy (:func:`~deploycomp.prune.apply.input_energy`) and the unpruned
    model's outputs, the reference of :func:`zeroed_kl`."""
    energy = input_energy(model, groups, batches, forward)
    return energy, [forward(model, b) for b in batches]


@torch.no_grad()
def zeroed_kl(
    model: nn.Module,
    group: ChannelGroup,
    units: Sequence[int],
    batches: Sequence[Any],
    forward: Forward,
    reference: Sequence[torch.Tensor],
) -> float:
    """KL of ``forward(model, batch)`` from ``reference`` with ``units`` of ``group`` zeroed
    (which is what removing them computes: the groups are zero-invariant)."""
    trial = copy.deepcopy(model)
    scale_units(trial, group, units, 0.0)
    kls = [float(distillation_loss(forward(trial, b), r, 1.0)) for b, r in zip(batches, reference)]
    return max(0.0, sum(kls) / len(kls))


def best_removal(
    model: nn.Module,
    group: ChannelGroup,
    keep: int,
    orders: dict[str, list[int]],
    batches: Sequence[Any],
    forward: Forward,
    reference: Sequence[torch.Tensor],
) -> Removal:
    """Of the candidate ``orders``, the removal of ``group.size - keep`` units that moves the
    outputs least (KL on ``batches``; ties go to the order listed first).

    Neither ranking wins everywhere (bench/prune_ranking.py): the output change is far better on
    a pretrained EfficientNet, the group norm on the first convolutions of a small CNN trained
    from scratch; measuring both costs two forward passes per group and amount.
    """
    best = None
    for ranking, order in orders.items():
        drop = tuple(sorted(order[: group.size - keep]))
        if best is not None and drop == best.drop:
            continue  # the rankings agree: nothing new to measure
        kl = zeroed_kl(model, group, drop, batches, forward, reference) if drop else 0.0
        if best is None or kl < best.kl:
            best = Removal(drop, ranking, kl)
    return best


def plan_pruning(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    keep_fraction: float,
    multiple: int,
    batches: Sequence[Any] = (),
    forward: Forward | None = None,
) -> list[GroupPlan]:
    """The units to remove from each group.

    A group keeps ``ceil(size * keep_fraction / multiple) * multiple`` units (never more than it
    has); groups that are not zero-invariant (a LayerNorm over the channels) are left whole.
    With calibration ``batches`` (run as ``forward(model, batch)``), the units are those of the
    better ranking, group L2 norm or output change (:func:`best_removal`); without, the lowest
    group L2 norm.
    """
    if not 0 < keep_fraction <= 1:
        raise DeployCompError(
            f"keep_fraction {keep_fraction!r} is not in (0, 1]; pass the fraction of each "
            "group's channels to keep, e.g. 0.5."
        )
    energy, reference = measure_for_ranking(model, groups, batches, forward) if batches else (None, [])
    plans = []
    for group in groups:
        unit = "heads" if group.unit == "head" else "channels"
        if not group.zero_invariant:
            plans.append(
                GroupPlan(group, (), f"kept whole: {group.reason or 'not zero-invariant'}")
            )
            continue
        step = 1 if group.unit == "head" else multiple
        keep = fixed_keep(group, keep_fraction, multiple)
        if batches:
            orders = candidate_orders(model, group, energy)
            removal = best_removal(model, group, keep, orders, batches, forward, reference)
        else:
            removal = Removal(tuple(sorted(drop_order(model, group)[: group.size - keep])),
                              "group L2 norm", None)  # fmt: skip
        why = (
            f"{group.size} -> {keep} {unit} (keep {keep_fraction:.0%}, rounded up to a multiple "
            f"of {step}; {removal_note(removal)})"
        )
        plans.append(GroupPlan(group, removal.drop, why, loss_increase=removal.kl))
    return plans


def drop_order(
    model: nn.Module, group: ChannelGroup, energy: dict[str, torch.Tensor] | None = None
) -> list[int]:
    """The group's units, least important first (:func:`group_importance`)."""
    scores = group_importance(model, group, energy)
    return sorted(range(group.size), key=lambda u: (float(scores[u]), u))


def removal_note(removal: Removal) -> str:
    """How a plan's reason names the units it removed."""
    if removal.kl is None:
        return f"lowest {removal.ranking} removed"
    return f"lowest {removal.ranking} removed, KL +{removal.kl:.4f}"


def _inputs(batch: dict, input_names: Sequence[str]) -> list[torch.Tensor]:
    return [torch.as_tensor(batch[n]) for n in input_names]


def prune_with_distillation(
    model: nn.Module,
    example_inputs: tuple,
    batches: Callable[[], Sequence[dict[str, torch.Tensor]]],
    input_names: Sequence[str],
    *,
    keep_fraction: float,
    multiple: int,
    steps: int,
    shrink_fraction: float = 0.6,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> tuple[nn.Module, list[GroupPlan]]:
    """A pruned copy of ``model`` trained to match it, and the per-group plan.

    Args:
        model: the fp32 model (left unchanged; it is the teacher).
        example_inputs: positional inputs for tracing (:func:`build_groups`).
        batches: returns training batches (name -> tensor or array); cycled for ``steps``.
        input_names: the order of the model's positional inputs.
        keep_fraction, multiple: see :func:`plan_pruning`.
        steps: optimizer steps in all; units reach zero at ``shrink_fraction * steps``.

    Raises:
        DeployCompError: no group can be pruned, or the settings are out of range.
    """
    if steps < 2 or not 0 < shrink_fraction < 1:
        raise DeployCompError(
            f"steps={steps!r}, shrink_fraction={shrink_fraction!r}: need steps >= 2 and "
            "0 < shrink_fraction < 1."
        )
    torch.manual_seed(seed)
    teacher = copy.deepcopy(model).eval()
    student = copy.deepcopy(model).eval()
    graph = build_groups(student, example_inputs)
    data = list(batches())
    plans = plan_pruning(
        student, graph.prunable(), keep_fraction, multiple, data[:RANKING_BATCHES],
        lambda m, b: m(*_inputs(b, input_names)),
    )  # fmt: skip
    if not any(p.drop for p in plans):
        raise DeployCompError(
            f"nothing to prune: {len(graph.prunable())} prunable groups, none with units to "
            f"remove at keep_fraction {keep_fraction}; refused: {graph.refused}"
        )
    distillation_mode(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    shrink_steps = max(1, int(steps * shrink_fraction))
    bar = tqdm(range(steps), desc="prune", unit="step", disable=not progress)
    for step in bar:
        inputs = _inputs(data[step % len(data)], input_names)
        with torch.no_grad():
            target = teacher(*inputs)
        loss = distillation_loss(student(*inputs), target, 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step < shrink_steps:
            factor = (shrink_steps - step - 1) / (shrink_steps - step)
            for plan in plans:
                if plan.drop:
                    scale_units(student, plan.group, plan.drop, factor)
        if step == shrink_steps - 1:  # the units are exactly zero: remove them
            for plan in plans:
                if plan.drop:
                    prune_group(student, plan.group, plan.keep)
            optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
        bar.set_postfix(kl=f"{loss.item():.4f}")
    return student.eval(), plans
