"""Structured pruning inside the joint compression loop (QASSO-like, with the quantizers on).

:func:`~deploycomp.compress.joint.train_joint` calls :meth:`StructuredPruning.after_step` after
every optimizer step. Until ``removal_step`` the chosen units of every group are multiplied by
``(S - t) / (S - t + 1)`` (exactly zero at step ``S``) while the 2:4 masks and fake quantizers
train around them; at step ``S`` they are removed physically (the wrappers' masks and steps are
sliced with them, :func:`~deploycomp.prune.apply.prune_group`) and the quantization ranges are
re-estimated on the pruned student: the weight steps of every layer that lost input or output
channels from its surviving weights, every input step from ``max |x|`` over the calibration
batches through the pruned student. Training then continues on the smaller dense student.

Removal computes exactly what the zeroed units computed, quantizers included, except in a 2:4
layer that loses input columns: the groups of 4 along its reduction shift, so it re-selects its
mask on the surviving weights. The removal step (60% of the steps by default) therefore comes
before the masks freeze (75%), and training after it recovers the difference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from deploycomp.compress.modules import _CompressedLayer
from deploycomp.errors import DeployCompError
from deploycomp.prune.apply import prune_group, scale_units
from deploycomp.prune.attention import attention_spec
from deploycomp.prune.train import GroupPlan


@dataclasses.dataclass
class StructuredPruning:
    """The units to drive to zero during joint training, and when to remove them.

    Attributes:
        plans: per group the units to remove (groups built on the uncompressed model: the
            wrappers keep their module paths).
        steps: the training run's steps; units reach zero after ``shrink_fraction`` of them.
        calibration: model inputs for re-estimating the input ranges after removal; each is
            passed as ``run(model, batch)``.
        run: calls the model on one calibration batch.
    """

    plans: Sequence[GroupPlan]
    steps: int
    calibration: Sequence[Any]
    run: Callable[[nn.Module, Any], Any]
    shrink_fraction: float = 0.6
    removed: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.shrink_fraction < 1 or self.steps < 2:
            raise DeployCompError(
                f"structured pruning needs at least 2 training steps and a shrink fraction in "
                f"(0, 1); got steps={self.steps!r}, shrink_fraction={self.shrink_fraction!r}"
            )

    @property
    def removal_step(self) -> int:
        """The (1-based) step after which the units are zero and removed."""
        return max(1, int(self.steps * self.shrink_fraction))

    def after_step(self, student: nn.Module, step: int) -> bool:
        """Shrink or remove after optimizer step ``step``; True when Parameters were replaced
        (the caller rebuilds its optimizer)."""
        if self.removed or step > self.removal_step:
            return False
        left = self.removal_step - step
        for plan in self.plans:
            if plan.drop:
                scale_units(student, plan.group, plan.drop, left / (left + 1))
        if left:
            return False
        self.remove(student)
        self.reestimate_ranges(student)
        return True

    def remove(self, student: nn.Module) -> None:
        """Remove every plan's units physically (also how a resumed run rebuilds the shapes)."""
        for plan in self.plans:
            if plan.drop:
                prune_group(student, plan.group, plan.keep)
        self.removed = True

    def touched(self, student: nn.Module) -> list[_CompressedLayer]:
        """The compressed layers that lost channels."""
        names: set[str] = set()
        for plan in self.plans:
            if not plan.drop:
                continue
            for slot in plan.group.slots:
                names.add(slot.module)
                if slot.role == "head":
                    spec = attention_spec(student.get_submodule(slot.module))
                    names.update(f"{slot.module}.{c}" for c in spec.projections)
        modules = [student.get_submodule(n) for n in sorted(names)]
        return [m for m in modules if isinstance(m, _CompressedLayer)]

    @torch.no_grad()
    def reestimate_ranges(self, student: nn.Module) -> dict[str, float]:
        """Re-initialise the quantization ranges on the pruned student; returns the new input
        clip of every compressed layer with an input quantizer."""
        for layer in self.touched(student):
            if layer.weight_quant is not None:
                layer.weight_quant.reinit(layer.weight.detach(), layer.mask)
        layers = {
            n: m
            for n, m in student.named_modules()
            if isinstance(m, _CompressedLayer) and m.input_quant is not None
        }
        clips = dict.fromkeys(layers, 0.0)

        def hook(name: str):
            def record(_module: nn.Module, args: tuple) -> None:
                clips[name] = max(clips[name], float(args[0].detach().abs().amax()))

            return record

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
        was = student.training
        student.eval()
        try:
            for batch in self.calibration:
                self.run(student, batch)
        finally:
            student.train(was)
            for h in handles:
                h.remove()
        for name, layer in layers.items():
            quant = layer.input_quant
            if clips[name] > 0:
                quant.step.fill_(clips[name] / quant.qmax)
                quant.initialized.fill_(True)
        return clips
