"""Where a model comes from: a zoo name, a Python entrypoint, or an existing ONNX file.

``load_model`` resolves the reference the user typed and returns a validated
:class:`~deploycomp.modelspec.ModelSpec`. Code from a file runs only when the user names an
entrypoint (``file.py:function`` or ``package.module:function``). An ``.onnx`` file needs real data
(``--data file.npz``: one array per input, samples on axis 0, optional ``labels``). Every bad
reference, file or array is refused here with one line, before any expensive work.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deploycomp.errors import (
    BackendError,
    DataError,
    DeployCompError,
    ModelLoadError,
    closest_match_hint,
)
from deploycomp.modelspec import EvalSet, ModelSpec
from deploycomp.validate import check_labels, one_line, spec_from_returned, validate_spec

CALIBRATION_SAMPLES = 256
BATCH = 32


def load_model(ref: str, data: str | None = None) -> ModelSpec:
    """Resolve ``ref`` (zoo name, ``file.py:fn``, ``pkg.mod:fn`` or ``model.onnx``)."""
    if not isinstance(ref, str) or not ref:
        raise ModelLoadError(
            f"model reference {ref!r} is empty or not a string; name a zoo model, an entrypoint "
            "('file.py:function') or an .onnx file."
        )
    if ref.endswith(".onnx"):
        return load_onnx(ref, data)
    if data is not None:
        raise DataError(
            f"--data {data!r} is only read for an .onnx model; {ref!r} brings its own data "
            "(an entrypoint returns calibration and eval sets). Drop --data."
        )
    if ":" in ref:
        return load_entrypoint(ref)
    from deploycomp import zoo

    if ref in zoo.names():
        return validate_spec(zoo.load(ref))
    if Path(ref).exists():
        raise ModelLoadError(
            f"{ref!r} is a file but neither an .onnx model nor an entrypoint; name the function "
            f"that builds the model, e.g. '{ref}:build' (see README: entrypoints)."
        )
    raise ModelLoadError(
        f"unknown model {ref!r}: not a zoo name ({', '.join(zoo.names())}), an entrypoint "
        f"('file.py:function' or 'package.module:function') or an .onnx file."
        f"{closest_match_hint(ref, zoo.names())}"
    )


def _run_user_code(run: Callable[[], Any], doing: str, fix: str) -> Any:
    """Run code from the user's file or module; an exception or sys.exit becomes one line."""
    try:
        return run()
    except SystemExit as exc:
        code = "" if exc.code is None else repr(exc.code)
        raise ModelLoadError(
            f"{doing} called sys.exit({code}); an entrypoint must return a deploycomp.ModelSpec "
            "(or a dict), not exit. Remove the call or guard script code with "
            "`if __name__ == '__main__':`."
        ) from exc
    except Exception as exc:
        raise ModelLoadError(f"{doing} raised {one_line(exc)}; {fix}") from exc


def _import_target(target: str, ref: str) -> Any:
    if not target.endswith(".py"):
        return _run_user_code(
            lambda: importlib.import_module(target),
            f"importing module {target!r} of entrypoint {ref!r}",
            "check the module name and that its package is importable (run with -v for the "
            "traceback).",
        )
    path = Path(target)
    if not path.is_file():
        raise ModelLoadError(f"entrypoint file {target!r} does not exist.")
    module_name = f"deploycomp_user_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"entrypoint file {target!r} cannot be imported as Python code.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        _run_user_code(
            lambda: spec.loader.exec_module(module),
            f"importing {target!r} (entrypoint {ref!r})",
            "fix the error in that file (run with -v for the traceback).",
        )
    except ModelLoadError:
        sys.modules.pop(module_name, None)
        raise
    return module


def load_entrypoint(ref: str) -> ModelSpec:
    target, _, func_name = ref.rpartition(":")
    if not target or not func_name:
        raise ModelLoadError(f"entrypoint {ref!r} must look like 'file.py:function'.")
    module = _import_target(target, ref)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ModelLoadError(f"{target!r} has no function {func_name!r} (entrypoint {ref!r}).")
    try:
        inspect.signature(func).bind()
    except TypeError:
        raise ModelLoadError(
            f"entrypoint {ref!r} takes arguments {inspect.signature(func)}; deploycomp calls it "
            "with none. Give the parameters defaults or wrap it in a function without them."
        ) from None
    except ValueError:  # no signature to inspect (a builtin): let the call decide
        pass
    returned = _run_user_code(
        func, f"entrypoint {ref!r}", f"fix the error in {func_name}() (run with -v for the "
        "traceback).",
    )
    return spec_from_returned(returned, ref)


class _OnnxModule(torch.nn.Module):
    """Runs an ONNX file in ONNX Runtime so an .onnx input has the same reference as a module."""

    def __init__(self, path: str, input_names: list[str]):
        super().__init__()
        import onnxruntime as ort

        self.path = path
        self.input_names = input_names
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        feeds = {n: t.numpy() for n, t in zip(self.input_names, inputs)}
        return torch.from_numpy(self.session.run(None, feeds)[0])


def _read_onnx(path_str: str) -> Any:
    """The checked ONNX graph, with exactly one output."""
    import onnx

    path = Path(path_str)
    if not path.is_file():
        raise ModelLoadError(f"ONNX file {path_str!r} does not exist.")
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as exc:
        context = [ln for ln in str(exc).splitlines() if ln.startswith("==> Context:")]
        where = f" ({context[0][len('==> Context:'):].strip()})" if context else ""
        raise ModelLoadError(
            f"{path_str!r} is not a valid ONNX model: {one_line(exc)}{where}; re-export it or "
            "fix the file (onnx.checker.check_model shows the details)."
        ) from exc
    outputs = [o.name for o in proto.graph.output]
    if len(outputs) != 1:
        raise ModelLoadError(
            f"{path_str!r} has {len(outputs)} outputs {outputs}; deploycomp compiles ONNX models "
            "with exactly one output (logits or embeddings). Re-export it with one output."
        )
    return proto


def _onnx_inputs(proto: Any) -> dict[str, tuple[Any, list[int | None] | None]]:
    """Graph input name -> (ONNX tensor type or None, dims or None for an unknown rank)."""
    init_names = {i.name for i in proto.graph.initializer}
    inputs = {}
    for value in proto.graph.input:
        if value.name in init_names:
            continue
        tensor = value.type.tensor_type if value.type.HasField("tensor_type") else None
        dims = None
        if tensor is not None and tensor.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        inputs[value.name] = (tensor, dims)
    return inputs


def _output_classes(proto: Any) -> int | None:
    """The class count of a (batch, classes) output with a fixed last axis, else None."""
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    return (dims[1].dim_value or None) if len(dims) == 2 else None


def _input_dtypes(path_str: str, inputs: dict) -> dict[str, np.dtype]:
    """The numpy dtype of each input, refusing inputs a batch of .npz arrays cannot feed."""
    import onnx

    if not inputs:
        raise ModelLoadError(f"{path_str!r} has no graph inputs; deploycomp needs at least one.")
    dtypes = {}
    for name, (tensor, dims) in inputs.items():
        if tensor is None:
            raise ModelLoadError(
                f"input {name!r} of {path_str!r} is not a tensor; deploycomp feeds one array "
                "per input. Re-export the model with tensor inputs."
            )
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        except (KeyError, TypeError, ValueError):
            dtype = np.dtype("V")
        if dtype.kind not in "biuf":
            elem = onnx.TensorProto.DataType.Name(tensor.elem_type)
            raise ModelLoadError(
                f"input {name!r} of {path_str!r} has element type {elem}; deploycomp feeds "
                "float, integer or bool arrays. Re-export the model with such an input."
            )
        if dims is not None and (not dims or dims[0] is not None):
            raise ModelLoadError(
                f"input {name!r} of {path_str!r} has shape {dims} with no dynamic batch axis; "
                "deploycomp runs batches of several samples. Re-export it with a dynamic axis 0, "
                f"e.g. torch.onnx.export(..., dynamic_axes={{{name!r}: {{0: 'batch'}}}})."
            )
        dtypes[name] = dtype
    return dtypes


def load_onnx(path_str: str, data: str | None) -> ModelSpec:
    path = Path(path_str)
    proto = _read_onnx(path_str)
    inputs = _onnx_inputs(proto)
    names = list(inputs)
    try:
        reference = _OnnxModule(str(path), names)
    except Exception as exc:
        raise BackendError(
            f"onnxruntime, which deploycomp uses to calibrate and check every model, cannot run "
            f"{path_str!r}: {one_line(exc)}. Replace the unsupported operator or "
            "export the model with standard ONNX operators."
        ) from exc
    dtypes = _input_dtypes(path_str, inputs)
    if data is None:
        raise DataError(
            f"an .onnx model needs real calibration data: pass --data file.npz with one array "
            f"per input ({names}), samples on axis 0."
        )
    arrays = _read_npz(data)
    label_key = "labels" if "labels" not in names else None
    _check_names(arrays, names, label_key, data)
    for name in names:
        _check_onnx_array(arrays[name], name, dtypes[name], inputs[name][1], data)
    counts = {name: int(arrays[name].shape[0]) for name in names}
    if len(set(counts.values())) > 1:
        raise DataError(
            f"data file {data!r} has different sample counts per input {counts}; every input "
            "array needs the same number of samples on axis 0."
        )
    n = counts[names[0]]
    labels = arrays.get(label_key) if label_key else None
    if labels is not None:
        labels = check_labels(labels, n, _output_classes(proto), f"data file {data!r}")
    n_cal = min(CALIBRATION_SAMPLES, max(1, n // 2))
    cal = [{k: arrays[k][i:min(i + BATCH, n_cal)] for k in names} for i in range(0, n_cal, BATCH)]
    evals = []
    if n > n_cal:  # held out: no sample both calibrates and evaluates
        batches = [{k: arrays[k][i:i + BATCH] for k in names} for i in range(n_cal, n, BATCH)]
        evals.append(EvalSet("held-out", batches, labels[n_cal:n] if labels is not None else None))
    spec = ModelSpec(
        name=path.stem,
        model=reference,
        example_inputs={k: arrays[k][:1] for k in names},
        calibration=cal,
        eval_sets=evals,
        description=f"ONNX model {path.name}",
        onnx_path=str(path),
    )
    return validate_spec(spec)


def _read_npz(data: str) -> dict[str, np.ndarray]:
    """Every array of an .npz file; never unpickles (an object array is refused)."""
    path = Path(data)
    if not path.is_file():
        raise DataError(f"data file {data!r} does not exist; pass --data with an .npz file.")
    with path.open("rb") as f:
        magic = f.read(6)
    fix = "save one array per model input with np.savez(path, <input name>=array, labels=labels)"
    if not magic.startswith(b"PK"):
        kind = "a single .npy array" if magic.startswith(b"\x93NUMPY") else "not an .npz file"
        raise DataError(f"data file {data!r} is {kind}; {fix}.")
    arrays = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                try:
                    arrays[key] = npz[key]
                except ValueError as exc:
                    if "allow_pickle" not in str(exc):
                        raise
                    raise DataError(
                        f"array {key!r} in data file {data!r} holds Python objects (dtype "
                        "object), which deploycomp never unpickles; save numeric arrays."
                    ) from exc
    except DeployCompError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read data file {data!r} as .npz: {one_line(exc)}; {fix}.") from exc
    return arrays


def _check_names(
    arrays: dict[str, np.ndarray], names: list[str], label_key: str | None, data: str
) -> None:
    missing = [n for n in names if n not in arrays]
    extra = sorted(set(arrays) - set(names) - {label_key})
    if missing:
        raise DataError(
            f"data file {data!r} has arrays {sorted(arrays)}; it needs one per model input "
            f"{names}: missing {missing}.{closest_match_hint(missing[0], extra)}"
        )
    if extra:
        raise DataError(
            f"data file {data!r} has arrays {extra} that are neither model inputs {names} nor "
            f"'labels'; rename or drop them.{closest_match_hint(extra[0], [*names, 'labels'])}"
        )


def _check_onnx_array(
    arr: np.ndarray, name: str, dtype: np.dtype, dims: list[int | None] | None, data: str
) -> None:
    what = f"array {name!r} in {data!r}"
    if arr.ndim == 0:
        raise DataError(f"{what} is a 0-d scalar; expected samples on axis 0, shape (N, ...).")
    if dims is not None and (
        arr.ndim != len(dims) or any(d is not None and d != s for d, s in zip(dims, arr.shape))
    ):
        expected = ", ".join(["N", *("?" if d is None else str(d) for d in dims[1:])])
        raise DataError(
            f"{what} has shape {arr.shape}; the ONNX input expects ({expected}) with N samples "
            "on axis 0. Reshape the data to the model's input shape."
        )
    if arr.shape[0] == 0:
        raise DataError(f"{what} has 0 samples (shape {arr.shape}); give at least one sample.")
    if arr.dtype != dtype:
        raise DataError(
            f"{what} has dtype {arr.dtype}; the ONNX input expects {dtype}. Save it converted, "
            f"e.g. with .astype(np.{dtype.name})."
        )
