"""What a model brings into deploycomp: the module, example inputs, calibration and evaluation data.

Built-in zoo entries and user entrypoints (``file.py:function`` or ``package.module:function``)
both return a :class:`ModelSpec` (or a dict with the same keys), which
:func:`deploycomp.validate.validate_spec` checks once, at the boundary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class EvalSet:
    """Real evaluation data: batches of named inputs and, when labelled, the labels.

    ``labels`` (one per sample, in batch order) make the task metric (top-1 on output 0)
    available; without labels the set still measures agreement with the fp32 model.
    """

    name: str
    batches: Sequence[Batch]
    labels: np.ndarray | None = None
    metric: str = "top1"
    description: str = ""

    @property
    def num_samples(self) -> int:
        return sum(int(next(iter(b.values())).shape[0]) for b in self.batches)


@dataclasses.dataclass
class ModelSpec:
    """A model ready for compilation.

    Attributes:
        name: short name used in reports and file names.
        model: the fp32 ``nn.Module``; set to eval mode by deploycomp.
        example_inputs: one batch of named inputs (numpy arrays, batch on axis 0).
        calibration: real batches for calibration, same names and per-sample shapes.
        eval_sets: evaluation data (optional; omitted or None: only agreement on calibration data).
        dynamic_axes: per input, the axes that vary besides the batch (e.g. ``{1: "seq"}``).
        make_batch: returns inputs of a given batch size for latency runs; by default the
            example inputs are tiled.
        description: one line for the report.
        batch_sizes: the batch sizes latency is measured at (batch 1 and a larger one).
        onnx_path: for a model that arrived as ONNX, the file itself (used instead of an
            export; ``model`` then runs that file in ONNX Runtime as the fp32 reference).
        train_data: returns unlabelled training batches for compression-aware training
            (distillation needs no labels); without it, training cycles the calibration batches.
    """

    name: str
    model: torch.nn.Module
    example_inputs: Batch
    calibration: Sequence[Batch]
    eval_sets: Sequence[EvalSet] = ()
    dynamic_axes: dict[str, dict[int, str]] = dataclasses.field(default_factory=dict)
    make_batch: Callable[[int], Batch] | None = None
    description: str = ""
    batch_sizes: tuple[int, ...] = (1, 32)
    onnx_path: str | None = None
    train_data: Callable[[], Sequence[Batch]] | None = None

    def dims(self, batch_size: int) -> dict[str, int]:
        """Values of the exported graph's symbolic dimensions at ``batch_size``: ``batch`` and
        each dynamic axis at its size in the example inputs (e.g. ``{"batch": 1, "seq": 64}``)."""
        dims = {"batch": batch_size}
        for name, axes in self.dynamic_axes.items():
            for axis, label in axes.items():
                dims[label] = int(self.example_inputs[name].shape[axis])
        return dims

    @property
    def input_names(self) -> list[str]:
        return list(self.example_inputs)

    def batch_of(self, batch_size: int) -> Batch:
        """Inputs of ``batch_size`` samples for latency measurement."""
        if self.make_batch is not None:
            return self.make_batch(batch_size)
        out = {}
        for name, arr in self.example_inputs.items():
            reps = -(-batch_size // arr.shape[0])
            out[name] = np.concatenate([arr] * reps, axis=0)[:batch_size]
        return out
