"""Where a model comes from: a zoo name, a Python entrypoint, or an existing ONNX file.

``load_model`` resolves the reference the user typed and returns a validated
:class:`~deploycomp.modelspec.ModelSpec`. Code from a file runs only when the user names an
entrypoint (``file.py:function`` or ``package.module:function``). An ``.onnx`` file needs real data
(``--data file.npz``: one array per input, samples on axis 0, optional ``labels``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

from deploycomp.errors import BackendError, DataError, ModelLoadError, closest_match_hint
from deploycomp.modelspec import EvalSet, ModelSpec, spec_from_returned

CALIBRATION_SAMPLES = 256
BATCH = 32


def load_model(ref: str, data: str | None = None) -> ModelSpec:
    """Resolve ``ref`` (zoo name, ``file.py:fn``, ``pkg.mod:fn`` or ``model.onnx``)."""
    if ref.endswith(".onnx"):
        return load_onnx(ref, data)
    if ":" in ref:
        return load_entrypoint(ref)
    from deploycomp import zoo

    if ref in zoo.names():
        return zoo.load(ref)
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


def load_entrypoint(ref: str) -> ModelSpec:
    target, _, func_name = ref.rpartition(":")
    if not target or not func_name:
        raise ModelLoadError(f"entrypoint {ref!r} must look like 'file.py:function'.")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ModelLoadError(f"entrypoint file {target!r} does not exist.")
        module_name = f"deploycomp_user_{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise ModelLoadError(f"importing {target!r} failed: {exc!r}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise ModelLoadError(f"cannot import module {target!r} of entrypoint {ref!r}: {exc}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ModelLoadError(f"{target!r} has no function {func_name!r} (entrypoint {ref!r}).")
    try:
        returned = func()
    except Exception as exc:
        raise ModelLoadError(f"entrypoint {ref!r} raised {exc!r}") from exc
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


def load_onnx(path_str: str, data: str | None) -> ModelSpec:
    import onnx

    path = Path(path_str)
    if not path.is_file():
        raise ModelLoadError(f"ONNX file {path_str!r} does not exist.")
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelLoadError(
            f"{path_str!r} is not a valid ONNX model ({exc}); re-export it or check the file."
        ) from exc
    init_names = {i.name for i in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in init_names]
    try:
        reference = _OnnxModule(str(path), names)
    except Exception as exc:
        raise BackendError(
            f"onnxruntime, which deploycomp uses to calibrate and check every model, cannot run "
            f"{path_str!r}: {str(exc).splitlines()[0]}. Replace the unsupported operator or "
            "export the model with standard ONNX operators."
        ) from exc
    if data is None:
        raise DataError(
            f"an .onnx model needs real calibration data: pass --data file.npz with one array "
            f"per input ({[i.name for i in proto.graph.input]}), samples on axis 0."
        )
    try:
        arrays = dict(np.load(data, allow_pickle=False))
    except Exception as exc:
        raise DataError(f"cannot read data file {data!r} as .npz: {exc}") from exc
    missing = set(names) - set(arrays)
    if missing:
        raise DataError(
            f"data file {data!r} has arrays {sorted(arrays)}; it needs one per model input: "
            f"missing {sorted(missing)}."
        )
    labels = arrays.get("labels")
    n = min(len(arrays[k]) for k in names)
    n_cal = min(CALIBRATION_SAMPLES, max(1, n // 2))
    cal = [{k: arrays[k][i:i + BATCH] for k in names} for i in range(0, n_cal, BATCH)]
    evals = []
    if n > n_cal:
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
    from deploycomp.modelspec import validate_spec

    return validate_spec(spec)
