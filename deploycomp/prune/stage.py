"""The pruning stage of a compile: prune a model spec's model, record what was removed.

:func:`prune_spec` runs :func:`~deploycomp.prune.train.prune_with_distillation` on a
:class:`~deploycomp.modelspec.ModelSpec` (its training data, else its calibration batches) and
returns a spec holding the pruned model plus the record the run writes as ``pruning.json``: per
group its members, channels before and after with the reason, the groups refused and why, and the
parameter counts before and after.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from deploycomp.errors import DeployCompError
from deploycomp.hw.profile import HardwareProfile
from deploycomp.modelspec import ModelSpec
from deploycomp.prune.graph import build_groups
from deploycomp.prune.train import channel_multiple, prune_with_distillation

DEFAULT_STEPS = 1000


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_spec(
    spec: ModelSpec,
    hw: HardwareProfile,
    keep_fraction: float,
    *,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    progress: bool = True,
) -> tuple[ModelSpec, dict[str, Any]]:
    """``spec`` with its model pruned to ``keep_fraction`` of each group, and the record.

    Raises:
        DeployCompError: the model does not trace, nothing can be pruned, or the settings are
            out of range (see :func:`prune_with_distillation`).
    """
    if spec.model is None or spec.onnx_path:
        raise DeployCompError(
            f"structured pruning needs a torch model, and {spec.name!r} is an ONNX file; pass a "
            "zoo name or an entrypoint (file.py:function), or compile without --prune."
        )
    if steps < 2:
        raise DeployCompError(f"--prune-steps {steps!r}: pass at least 2 training steps.")
    example = tuple(torch.from_numpy(spec.example_inputs[n]) for n in spec.input_names)
    refused = build_groups(spec.model, example).refused
    multiple = channel_multiple(hw)
    data = spec.train_data or (lambda: [dict(b) for b in spec.calibration])
    pruned, plans = prune_with_distillation(
        spec.model, example, data, spec.input_names, keep_fraction=keep_fraction,
        multiple=multiple, steps=steps, seed=seed, progress=progress,
    )  # fmt: skip
    record = {
        "keep_fraction": keep_fraction,
        "channel_multiple": multiple,
        "steps": steps,
        "params_before": _params(spec.model),
        "params_after": _params(pruned),
        "groups": [
            {
                "members": sorted({s.module for s in p.group.slots}),
                "unit": p.group.unit,
                "before": p.group.size,
                "after": len(p.keep),
                "reason": p.reason,
            }
            for p in plans
        ],
        "refused": dict(refused),
    }
    return dataclasses.replace(spec, model=pruned), record
