"""What a model brings into deploycomp: the module, example inputs, calibration and evaluation data.

Built-in zoo entries and user entrypoints (``file.py:function`` or ``package.module:function``)
both return a :class:`ModelSpec` (or a dict with the same keys). ``validate_spec`` checks it once,
at the boundary, and raises :class:`~deploycomp.errors.DataError` with what was wrong.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from deploycomp.errors import DataError, ModelLoadError

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
        eval_sets: evaluation data (optional; without it only agreement on calibration data).
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


_SPEC_KEYS = {f.name for f in dataclasses.fields(ModelSpec)}


def _as_numpy_batch(value: Any, what: str) -> Batch:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = {"input": value}
    if not isinstance(value, dict) or not value:
        raise DataError(
            f"{what} must be a dict of input name -> array, got {type(value).__name__}. "
            "Return e.g. {'input': np.ndarray of shape (batch, ...)}."
        )
    out = {}
    for name, arr in value.items():
        if isinstance(arr, torch.Tensor):
            arr = arr.detach().cpu().numpy()
        if not isinstance(arr, np.ndarray):
            raise DataError(
                f"{what}[{name!r}] must be a numpy array or torch tensor, got "
                f"{type(arr).__name__}."
            )
        if arr.ndim == 0:
            raise DataError(f"{what}[{name!r}] is a scalar; expected a batch on axis 0.")
        out[str(name)] = arr
    return out


def spec_from_returned(value: Any, source: str) -> ModelSpec:
    """Turn what an entrypoint returned into a validated ModelSpec."""
    if isinstance(value, ModelSpec):
        return validate_spec(value)
    if isinstance(value, dict):
        unknown = set(value) - _SPEC_KEYS - {"eval"}
        if unknown:
            raise ModelLoadError(
                f"entrypoint {source!r} returned unknown keys {sorted(unknown)}; expected a "
                f"subset of {sorted(_SPEC_KEYS)}."
            )
        missing = {"model", "example_inputs", "calibration"} - set(value)
        if missing:
            raise ModelLoadError(
                f"entrypoint {source!r} returned a dict without {sorted(missing)}; it must "
                "hold 'model', 'example_inputs' and 'calibration' (see README: entrypoints)."
            )
        value = dict(value)
        if "eval" in value:
            value["eval_sets"] = value.pop("eval")
        value.setdefault("name", source.rsplit(":", 1)[-1])
        return validate_spec(ModelSpec(**value))
    raise ModelLoadError(
        f"entrypoint {source!r} returned {type(value).__name__}; expected a deploycomp.ModelSpec "
        "or a dict with 'model', 'example_inputs', 'calibration' (see README: entrypoints)."
    )


def validate_spec(spec: ModelSpec) -> ModelSpec:
    """Check a spec once at the boundary; return it with inputs converted to numpy."""
    if not isinstance(spec.model, torch.nn.Module):
        raise ModelLoadError(
            f"model of {spec.name!r} must be a torch.nn.Module, got {type(spec.model).__name__}."
        )
    spec.example_inputs = _as_numpy_batch(spec.example_inputs, "example_inputs")
    if isinstance(spec.calibration, (dict, np.ndarray, torch.Tensor)):
        spec.calibration = [spec.calibration]
    try:
        calibration = list(spec.calibration)
    except TypeError:
        raise DataError(
            f"calibration must be a list of batches, got {type(spec.calibration).__name__}."
        ) from None
    if not calibration:
        raise DataError("calibration is empty; give at least one batch of real inputs.")
    spec.calibration = [_as_numpy_batch(b, f"calibration[{i}]") for i, b in enumerate(calibration)]
    for i, batch in enumerate(spec.calibration):
        _check_batch(batch, spec, f"calibration[{i}]")
    eval_sets = list(spec.eval_sets)
    for es in eval_sets:
        if not isinstance(es, EvalSet):
            raise DataError(f"eval_sets must hold deploycomp.EvalSet, got {type(es).__name__}.")
        es.batches = [_as_numpy_batch(b, f"eval set {es.name!r}") for b in es.batches]
        for j, batch in enumerate(es.batches):
            _check_batch(batch, spec, f"eval set {es.name!r} batch {j}")
        if es.labels is not None and len(es.labels) != es.num_samples:
            raise DataError(
                f"eval set {es.name!r} has {len(es.labels)} labels for {es.num_samples} samples; "
                "give one label per sample."
            )
    spec.eval_sets = eval_sets
    return spec


def _check_batch(batch: Batch, spec: ModelSpec, what: str) -> None:
    expected = spec.example_inputs
    if set(batch) != set(expected):
        raise DataError(
            f"{what} has inputs {sorted(batch)}; expected {sorted(expected)} "
            "(the names of example_inputs)."
        )
    for name, arr in batch.items():
        ref = expected[name]
        dyn = set(spec.dynamic_axes.get(name, {}))
        if arr.ndim != ref.ndim or any(
            a != b for ax, (a, b) in enumerate(zip(arr.shape, ref.shape)) if ax > 0 and ax not in dyn
        ):
            raise DataError(
                f"{what}[{name!r}] has shape {tuple(arr.shape)}; expected (batch, "
                f"{', '.join(map(str, ref.shape[1:]))}) like example_inputs. Reshape the data "
                "to the model's input shape."
            )
        if arr.dtype.kind != ref.dtype.kind:
            raise DataError(
                f"{what}[{name!r}] has dtype {arr.dtype}; expected {ref.dtype} like example_inputs."
            )
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise DataError(
                f"{what}[{name!r}] contains {bad} NaN or infinite values; calibration and "
                "evaluation data must be finite. Clean or drop those samples."
            )
