"""Validation of what a model brings, once, at the boundary: the entrypoint's result, its arrays and
batches, latency batch sizes and labels, and one run of the model on its example inputs (which must
return one tensor). Each failure is a one-line :class:`~deploycomp.errors.DataError` or
:class:`~deploycomp.errors.ModelLoadError` saying what was wrong, the value and how to fix it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from deploycomp.errors import DataError, ModelLoadError
from deploycomp.modelspec import Batch, EvalSet, ModelSpec

_SPEC_KEYS = {f.name for f in dataclasses.fields(ModelSpec)}
_REQUIRED_KEYS = ("model", "example_inputs", "calibration")
_ARRAY_KINDS = "biuf"  # bool, signed and unsigned integers, floating point
METRICS = ("top1",)


def one_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception, so that a message quoting it stays on one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def _as_array(value: Any, what: str) -> np.ndarray:
    """A numpy array (native byte order, contiguous, at least 1-D) from an array or a tensor."""
    if isinstance(value, torch.Tensor):
        try:
            value = value.detach().cpu().numpy()
        except (TypeError, RuntimeError) as exc:
            raise DataError(
                f"{what} is a torch tensor of dtype {value.dtype}, which numpy cannot hold "
                f"({one_line(exc)}); convert it first, e.g. with .float()."
            ) from None
    if not isinstance(value, np.ndarray):
        raise DataError(
            f"{what} must be a numpy array or torch tensor, got {type(value).__name__}."
        )
    if value.ndim == 0:
        raise DataError(
            f"{what} is a 0-d scalar; expected an array with samples on axis 0, shape (N, ...)."
        )
    if value.dtype.kind not in _ARRAY_KINDS:
        raise DataError(
            f"{what} has dtype {value.dtype}; expected a float, integer or bool array. "
            "Convert the data to numbers first."
        )
    if not value.dtype.isnative:
        value = value.astype(value.dtype.newbyteorder("="))
    return np.ascontiguousarray(value)


def _as_numpy_batch(value: Any, what: str) -> Batch:
    """``{name: array}`` with the same positive number of samples in every array."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = {"input": value}
    if not isinstance(value, dict) or not value:
        found = "an empty dict" if isinstance(value, dict) else type(value).__name__
        raise DataError(
            f"{what} must be a dict of input name -> array, got {found}. "
            "Return e.g. {'input': np.ndarray of shape (batch, ...)}."
        )
    out = {}
    for name, arr in value.items():
        if not isinstance(name, str) or not name:
            raise DataError(
                f"{what} has input name {name!r}; input names must be non-empty strings, "
                "e.g. 'input'."
            )
        out[name] = _as_array(arr, f"{what}[{name!r}]")
    counts = {name: int(arr.shape[0]) for name, arr in out.items()}
    empty = [name for name, count in counts.items() if count == 0]
    if empty:
        raise DataError(
            f"{what}[{empty[0]!r}] has 0 samples (shape {out[empty[0]].shape}); every batch "
            "needs at least one sample on axis 0. Drop the empty batch."
        )
    if len(set(counts.values())) > 1:
        raise DataError(
            f"{what} has inputs with different sample counts {counts}; every input of a batch "
            "needs the same number of samples on axis 0."
        )
    return out


def _as_batches(value: Any, what: str) -> list[Batch]:
    """A non-empty list of batches from a list (or one batch) of dicts of arrays."""
    if isinstance(value, (dict, np.ndarray, torch.Tensor)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise DataError(
            f"{what} must be a list of batches (dicts of input name -> array), got "
            f"{type(value).__name__}."
        )
    if not value:
        raise DataError(f"{what} is empty; give at least one batch of real inputs.")
    return [_as_numpy_batch(b, f"{what}[{i}]") for i, b in enumerate(value)]


def check_batch_sizes(value: Any) -> tuple[int, ...]:
    """The latency batch sizes as a tuple of positive ints, or ModelLoadError naming the value."""
    if isinstance(value, (list, tuple)) and value and all(
        isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b >= 1 for b in value
    ):
        return tuple(int(b) for b in value)
    raise ModelLoadError(
        f"batch_sizes is {value!r}; expected a non-empty tuple of positive integers (the latency "
        "batch sizes), e.g. batch_sizes=(1, 32)."
    )


def check_labels(
    labels: Any, num_samples: int, num_classes: int | None, what: str
) -> np.ndarray:
    """Labels as a 1-D int64 array of class indices, one per sample, below ``num_classes``.

    Raises:
        DataError: wrong count, non-integer values, or indices outside ``[0, num_classes)``.
    """
    try:
        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().numpy()
        arr = np.asarray(labels)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(
            f"{what} labels cannot be read as an array ({one_line(exc)}); expected one integer "
            "class index per sample."
        ) from None
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise DataError(
            f"{what} labels have shape {arr.shape}; expected one class index per sample, "
            f"shape ({num_samples},)."
        )
    if len(arr) != num_samples:
        raise DataError(
            f"{what} has {len(arr)} labels for {num_samples} samples; give one label per "
            "sample, in batch order."
        )
    if arr.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(arr) | (arr != np.round(arr)) | (np.abs(arr) >= 2**62)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(
                f"{what} has label {arr[i].item()!r} at index {i}, which is not an integer; "
                "labels are class indices (convert whole numbers with labels.astype(np.int64))."
            )
    elif arr.dtype.kind not in "iu":
        first = arr[0].item() if len(arr) else None
        raise DataError(
            f"{what} labels have dtype {arr.dtype} (first {first!r}); expected integer class "
            "indices from 0: map class names or flags to integers, e.g. labels.astype(np.int64)."
        )
    arr = arr.astype(np.int64)
    high = num_classes if num_classes is not None else np.iinfo(np.int64).max
    bad = (arr < 0) | (arr >= high)
    if bad.any():
        i = int(np.argmax(bad))
        classes = f", and the model returns {num_classes} classes" if num_classes else ""
        raise DataError(
            f"{what} has label {int(arr[i])} at index {i}{classes}; expected class indices from "
            f"0 to {'C-1' if num_classes is None else num_classes - 1}. Check the label mapping."
        )
    return arr


def spec_from_returned(value: Any, source: str) -> ModelSpec:
    """Turn what an entrypoint returned into a validated ModelSpec."""
    if isinstance(value, ModelSpec):
        return validate_spec(value)
    if isinstance(value, dict):
        unknown = set(value) - _SPEC_KEYS - {"eval"}
        if unknown:
            raise ModelLoadError(
                f"entrypoint {source!r} returned unknown keys {sorted(unknown, key=str)}; "
                f"expected a subset of {sorted(_SPEC_KEYS)}."
            )
        missing = [key for key in _REQUIRED_KEYS if key not in value]
        if missing:
            raise ModelLoadError(
                f"entrypoint {source!r} returned a dict without {missing}; it must "
                "hold 'model', 'example_inputs' and 'calibration' (see README: entrypoints)."
            )
        value = dict(value)
        if "eval" in value:
            if "eval_sets" in value:
                raise ModelLoadError(
                    f"entrypoint {source!r} returned both 'eval' and 'eval_sets'; keep one "
                    "('eval_sets')."
                )
            value["eval_sets"] = value.pop("eval")
        value.setdefault("name", source.rsplit(":", 1)[-1])
        return validate_spec(ModelSpec(**value))
    raise ModelLoadError(
        f"entrypoint {source!r} returned {type(value).__name__}; expected a deploycomp.ModelSpec "
        "or a dict with 'model', 'example_inputs', 'calibration' (see README: entrypoints)."
    )


def validate_spec(spec: ModelSpec) -> ModelSpec:
    """Check a spec once at the boundary, cheapest checks first, then run the model once on the
    example inputs (to know its output); return it with inputs as numpy and labels as int64."""
    if not isinstance(spec, ModelSpec):
        raise ModelLoadError(f"expected a deploycomp.ModelSpec, got {type(spec).__name__}.")
    _check_fields(spec)
    spec.example_inputs = _as_numpy_batch(spec.example_inputs, "example_inputs")
    _check_dynamic_axes(spec)
    spec.calibration = _as_batches(spec.calibration, "calibration")
    for i, batch in enumerate(spec.calibration):
        _check_batch(batch, spec, f"calibration[{i}]")
    eval_sets = _check_eval_sets(spec)
    output_shape = _run_example(spec)
    for es in eval_sets:
        if es.labels is None:
            continue
        if len(output_shape) != 2:
            raise DataError(
                f"eval set {es.name!r} has labels, but the model returns shape {output_shape}; "
                "top-1 needs logits of shape (batch, classes). Drop the labels to measure "
                "agreement with fp32 only."
            )
        es.labels = check_labels(es.labels, es.num_samples, output_shape[1], f"eval set {es.name!r}")
    spec.eval_sets = eval_sets
    return spec


def _check_fields(spec: ModelSpec) -> None:
    """The fields that are not data: types, and the batch sizes normalized to a tuple."""
    if not isinstance(spec.name, str) or not spec.name:
        raise ModelLoadError(f"name is {spec.name!r}; expected a non-empty string, e.g. 'my-cnn'.")
    if not isinstance(spec.model, torch.nn.Module):
        raise ModelLoadError(
            f"model of {spec.name!r} must be a torch.nn.Module, got {type(spec.model).__name__}."
        )
    if not isinstance(spec.description, str):
        raise ModelLoadError(
            f"description of {spec.name!r} is {type(spec.description).__name__}; expected a "
            "string (one line for the report)."
        )
    if spec.onnx_path is not None and not isinstance(spec.onnx_path, str):
        raise ModelLoadError(f"onnx_path is {spec.onnx_path!r}; expected a path string or None.")
    for field in ("make_batch", "train_data"):
        value = getattr(spec, field)
        if value is not None and not callable(value):
            raise ModelLoadError(
                f"{field} of {spec.name!r} is {type(value).__name__}; expected a function or None."
            )
    spec.batch_sizes = check_batch_sizes(spec.batch_sizes)


def _check_dynamic_axes(spec: ModelSpec) -> None:
    axes = {} if spec.dynamic_axes is None else spec.dynamic_axes
    if not isinstance(axes, dict):
        raise ModelLoadError(
            f"dynamic_axes is {type(axes).__name__}; expected a dict like {{'input_ids': {{1: "
            "'seq'}}}."
        )
    for name, per_input in axes.items():
        if name not in spec.example_inputs:
            raise ModelLoadError(
                f"dynamic_axes names input {name!r}, which is not in example_inputs "
                f"{spec.input_names}; use the names of example_inputs."
            )
        ndim = spec.example_inputs[name].ndim
        if not isinstance(per_input, dict):
            raise ModelLoadError(
                f"dynamic_axes[{name!r}] is {per_input!r}; expected a dict of axis -> name, "
                "e.g. {1: 'seq'}."
            )
        for axis, label in per_input.items():
            if not isinstance(axis, int) or isinstance(axis, bool) or not 1 <= axis < ndim:
                raise ModelLoadError(
                    f"dynamic_axes[{name!r}] has axis {axis!r}; expected an integer from 1 to "
                    f"{ndim - 1} (axis 0 is the batch, already dynamic)."
                )
            if not isinstance(label, str) or not label or label == "batch":
                raise ModelLoadError(
                    f"dynamic_axes[{name!r}][{axis}] is {label!r}; expected a name such as "
                    "'seq' (not 'batch', the name of axis 0)."
                )
    spec.dynamic_axes = axes


def _check_eval_sets(spec: ModelSpec) -> list[EvalSet]:
    """The eval sets (None or a single set allowed) with batches checked and labels counted."""
    value = spec.eval_sets
    if value is None:
        return []
    if isinstance(value, EvalSet):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise DataError(
            f"eval_sets must be a list of deploycomp.EvalSet, got {type(value).__name__}."
        )
    seen: set[str] = set()
    for es in value:
        if not isinstance(es, EvalSet):
            raise DataError(f"eval_sets must hold deploycomp.EvalSet, got {type(es).__name__}.")
        if not isinstance(es.name, str) or not es.name or es.name in seen:
            raise DataError(
                f"eval set name {es.name!r} is empty, not a string or used twice; give each "
                "eval set its own name."
            )
        seen.add(es.name)
        if es.metric not in METRICS:
            raise DataError(
                f"eval set {es.name!r} has metric {es.metric!r}; deploycomp measures "
                f"{', '.join(METRICS)} (with labels) and agreement with fp32 (always)."
            )
        es.batches = _as_batches(es.batches, f"eval set {es.name!r} batches")
        for j, batch in enumerate(es.batches):
            _check_batch(batch, spec, f"eval set {es.name!r} batches[{j}]")
        if es.labels is not None:
            es.labels = check_labels(es.labels, es.num_samples, None, f"eval set {es.name!r}")
    return list(value)


def _run_example(spec: ModelSpec) -> tuple[int, ...]:
    """Run the model once on its example inputs: it must return one tensor, samples on axis 0."""
    names = spec.input_names
    model = spec.model.eval()
    try:
        with torch.no_grad():
            out = model(*(torch.from_numpy(spec.example_inputs[n]) for n in names))
    except (Exception, SystemExit) as exc:
        shapes = ", ".join(f"{n} {a.shape} {a.dtype}" for n, a in spec.example_inputs.items())
        raise ModelLoadError(
            f"model {spec.name!r} failed on its example_inputs ({shapes}): {one_line(exc)}. "
            f"It is called as model({', '.join(names)}); make it accept these inputs."
        ) from exc
    if not isinstance(out, torch.Tensor):
        if isinstance(out, dict):
            found, fix = f"a {type(out).__name__} with keys {list(out)[:5]}", "out['logits']"
        elif isinstance(out, (tuple, list)):
            found, fix = f"a {type(out).__name__} of {len(out)} items", "outputs[0]"
        else:
            found, fix = type(out).__name__, "a torch.Tensor"
        raise ModelLoadError(
            f"model {spec.name!r} returned {found} on its example_inputs; deploycomp compiles "
            f"models that return one tensor (logits or embeddings): wrap the model so that "
            f"forward returns one tensor, e.g. {fix}."
        )
    batch = next(iter(spec.example_inputs.values())).shape[0]
    if out.ndim == 0 or out.shape[0] != batch:
        raise ModelLoadError(
            f"model {spec.name!r} returned shape {tuple(out.shape)} for {batch} example samples; "
            f"expected samples on axis 0, shape ({batch}, ...). Keep the batch axis."
        )
    return tuple(out.shape)


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
        if arr.dtype != ref.dtype:
            raise DataError(
                f"{what}[{name!r}] has dtype {arr.dtype}; expected {ref.dtype} like "
                f"example_inputs. Convert it with .astype(np.{ref.dtype.name})."
            )
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise DataError(
                f"{what}[{name!r}] contains {bad} NaN or infinite values; calibration and "
                "evaluation data must be finite. Clean or drop those samples."
            )
