"""The pruning stage of a compile: choose what to remove, prune, record it as ``pruning.json``.

Two paths:

- inside joint compression (``compile --prune ... --latency-target/--size-target``):
  :func:`plan_structured` chooses the amounts (:func:`~deploycomp.prune.planner.plan_amounts`:
  per group under the latency target, or one fraction), builds the one-shot pruned model the
  precision planner plans on, and the joint loop trains the units to zero with the quantizers
  (:class:`~deploycomp.prune.schedule.StructuredPruning`);
- before post-training INT8 (``compile --prune`` alone): :func:`prune_spec` runs
  :func:`~deploycomp.prune.train.prune_with_distillation` on the spec's training data (else its
  calibration batches).

The record (:func:`pruning_record`): per group its members, units before and after with the
reason, predicted saving and loss; per layer its channels and MACs before and after; the groups
refused and why; parameters and MACs before and after; predicted latencies.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from deploycomp.errors import DeployCompError
from deploycomp.hw.profile import HardwareProfile
from deploycomp.modelspec import ModelSpec
from deploycomp.plan.inventory import Layer
from deploycomp.prune.apply import prune_group
from deploycomp.prune.graph import build_groups
from deploycomp.prune.planner import AmountPlan, channel_effects, plan_amounts, pruned_layers
from deploycomp.prune.train import GroupPlan, channel_multiple, prune_with_distillation

DEFAULT_STEPS = 1000
LOSS_SAMPLES = 8  # calibration samples each pruning amount's loss is measured on
DEFAULT_LR = 1e-3  # AdamW; pretrained transformers want far less (MiniLM: 5e-5, BENCHMARKS.md)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _group_rows(plans: Sequence[GroupPlan]) -> list[dict[str, Any]]:
    return [
        {
            "members": sorted({s.module for s in p.group.slots}),
            "unit": p.group.unit,
            "before": p.group.size,
            "after": len(p.keep),
            "reason": p.reason,
            "predicted_saving_ms": p.predicted_saving_ms,
            "loss_increase": p.loss_increase,
        }
        for p in plans
    ]


def _layer_rows(before: Sequence[Layer], after: Sequence[Layer], batch: int) -> list[dict]:
    rows = []
    for a, b in zip(before, after):
        rows.append({"name": a.name, "kind": a.kind,
                     "in_before": a.in_channels, "in_after": b.in_channels,
                     "out_before": a.out_channels, "out_after": b.out_channels,
                     "macs_before": a.macs // batch, "macs_after": b.macs // batch})  # fmt: skip
    return rows


def pruning_record(
    model: torch.nn.Module,
    pruned: torch.nn.Module,
    plans: Sequence[GroupPlan],
    refused: dict[str, str],
    *,
    keep_fraction: float | None,
    multiple: int,
    steps: int,
    joint: bool,
    layers: tuple[Sequence[Layer], Sequence[Layer], int] | None = None,
    predicted: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What ``pruning.json`` holds (see the module docstring); ``layers`` is (inventory before,
    inventory after, its batch size), MACs are recorded per sample."""
    rows = _layer_rows(*layers) if layers else []
    return {
        "mode": "fixed" if keep_fraction is not None else "planned",
        "keep_fraction": keep_fraction,
        "joint": joint,
        "channel_multiple": multiple,
        "steps": steps,
        "params_before": _params(model),
        "params_after": _params(pruned),
        "macs_before": sum(r["macs_before"] for r in rows) if rows else None,
        "macs_after": sum(r["macs_after"] for r in rows) if rows else None,
        "groups": _group_rows(plans),
        "layers": rows,
        "refused": dict(refused),
        "predicted": predicted,
    }


@dataclasses.dataclass(frozen=True)
class StructuredPlan:
    """The amounts, the one-shot pruned model the precisions are planned on, and the record."""

    amounts: AmountPlan
    model: torch.nn.Module  # the fp32 model with the units removed, untrained
    layers_before: Sequence[Layer]
    layers_after: list[Layer]
    batch_size: int  # of both inventories
    refused: dict[str, str]
    multiple: int
    keep_fraction: float | None  # None: amounts planned under the latency target


def plan_structured(
    spec: ModelSpec,
    hw: HardwareProfile,
    backend: str,
    layers: Sequence[Layer],
    prune: float | str,
    latency_target: float | None,
) -> StructuredPlan:
    """Choose the amounts for joint compression (``prune``: a keep fraction or "auto") and
    build the one-shot pruned model.

    Raises:
        DeployCompError: the model does not trace or nothing can be pruned.
    """
    _check_torch(spec)
    example = _example(spec)
    graph = build_groups(spec.model, example)
    multiple = channel_multiple(hw)
    first = spec.calibration[0]  # one small batch: the loss is evaluated once per group and level
    batches = [tuple(torch.from_numpy(first[n][:LOSS_SAMPLES]) for n in spec.input_names)]
    amounts = plan_amounts(
        spec.model, graph.prunable(), layers, hw, backend,
        latency_target=latency_target if prune == "auto" else None,
        keep_fraction=None if prune == "auto" else float(prune),
        multiple=multiple, batches=batches, forward=_logits,
    )  # fmt: skip
    if not any(p.drop for p in amounts.plans):
        raise DeployCompError(
            f"nothing to prune in {spec.name!r}: {len(graph.prunable())} prunable groups, none "
            f"with channels to remove at --prune {prune}; refused: {graph.refused}"
        )
    shrunk = copy.deepcopy(spec.model).eval()
    for plan in amounts.plans:
        if plan.drop:
            prune_group(shrunk, plan.group, plan.keep)
    groups = [p.group for p in amounts.plans if p.group.zero_invariant]
    keep = [len(p.keep) for p in amounts.plans if p.group.zero_invariant]
    after = pruned_layers(layers, channel_effects(spec.model, groups), groups, keep)
    return StructuredPlan(
        amounts, shrunk, layers, after, spec.batch_sizes[0], dict(graph.refused), multiple,
        None if prune == "auto" else float(prune),
    )  # fmt: skip


def _logits(model: torch.nn.Module, inputs: tuple) -> torch.Tensor:
    out = model(*inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_torch(spec: ModelSpec) -> None:
    if spec.model is None or spec.onnx_path:
        raise DeployCompError(
            f"structured pruning needs a torch model, and {spec.name!r} is an ONNX file; pass a "
            "zoo name or an entrypoint (file.py:function), or compile without --prune."
        )


def _example(spec: ModelSpec) -> tuple:
    return tuple(torch.from_numpy(spec.example_inputs[n]) for n in spec.input_names)


def prune_spec(
    spec: ModelSpec,
    hw: HardwareProfile,
    keep_fraction: float,
    *,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    progress: bool = True,
) -> tuple[ModelSpec, dict[str, Any]]:
    """``spec`` with its model pruned to ``keep_fraction`` of each group, and the record.

    Raises:
        DeployCompError: the model does not trace, nothing can be pruned, or the settings are
            out of range (see :func:`prune_with_distillation`).
    """
    _check_torch(spec)
    if steps < 2:
        raise DeployCompError(f"--prune-steps {steps!r}: pass at least 2 training steps.")
    example = _example(spec)
    refused = build_groups(spec.model, example).refused
    multiple = channel_multiple(hw)
    data = spec.train_data or (lambda: [dict(b) for b in spec.calibration])
    pruned, plans = prune_with_distillation(
        spec.model, example, data, spec.input_names, keep_fraction=keep_fraction,
        multiple=multiple, steps=steps, lr=lr, seed=seed, progress=progress,
    )  # fmt: skip
    record = pruning_record(
        spec.model, pruned, plans, refused, keep_fraction=keep_fraction, multiple=multiple,
        steps=steps, joint=False,
    )  # fmt: skip
    return dataclasses.replace(spec, model=pruned), record
