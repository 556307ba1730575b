"""Export a torch model to an fp32 ONNX graph and check it against the torch model.

The fp32 graph is both the baseline engine's source and the graph that quantization rewrites
(``deploycomp.export.qdq``); it is simplified by ONNX Runtime's hardware-independent optimizations
first. It is exported with the TorchScript-based exporter at opset 17, whose
node names keep the module scope ("/features/features.0/Conv"), so layer names in the plan read
like the torch module names.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from deploycomp.errors import ExportError
from deploycomp.modelspec import Batch, ModelSpec

OPSET = 17


def export_fp32(spec: ModelSpec, path: str | Path, opset: int = OPSET) -> onnx.ModelProto:
    """Export ``spec.model`` to ``path`` with a dynamic batch axis (and the spec's dynamic axes).

    Raises:
        ExportError: the exporter failed (an unsupported operator, data-dependent control flow).
    """
    model = spec.model.eval()
    names = spec.input_names
    example = tuple(torch.from_numpy(spec.example_inputs[n]) for n in names)
    dynamic_axes = {n: {0: "batch", **spec.dynamic_axes.get(n, {})} for n in names}
    dynamic_axes["output"] = {0: "batch"}
    path = Path(path)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                example,
                str(path),
                input_names=names,
                output_names=["output"],
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as exc:
        path.unlink(missing_ok=True)
        raise ExportError(
            f"could not export {spec.name!r} to ONNX: {exc}. deploycomp needs a model that "
            "torch.onnx.export can trace (no data-dependent control flow, standard operators)."
        ) from exc
    proto = simplify(path)
    if len(proto.graph.output) != 1:
        raise ExportError(
            f"{spec.name!r} has {len(proto.graph.output)} outputs; deploycomp compiles models "
            "with one output tensor (logits or embeddings). Wrap the model to return one tensor."
        )
    return proto


def simplify(path: str | Path) -> onnx.ModelProto:
    """Rewrite ``path`` with ONNX Runtime's hardware-independent (basic) graph optimizations.

    Constant folding and fusions such as Pad into Conv and BatchNorm into Conv remove the shape
    arithmetic that some models compute at run time (TF-style "same" padding), so the Q/DQ
    pairs land next to the layers they quantize. Node and weight names are kept.
    """
    import onnxruntime as ort  # the reference runtime; a core dependency

    path = Path(path)
    tmp = path.with_name(f".{path.name}.simplified")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp)
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return onnx.load(str(path))


def torch_outputs(model: torch.nn.Module, batch: Batch, names: list[str]) -> np.ndarray:
    with torch.no_grad():
        out = model(*(torch.from_numpy(batch[n]) for n in names))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.detach().float().numpy()


def fp32_model(spec: ModelSpec, path: Path, log=print) -> onnx.ModelProto:
    """The spec's fp32 ONNX graph at ``path``: its own .onnx file copied and simplified, or the
    torch model exported (:func:`export_fp32`)."""
    if spec.onnx_path:
        shutil.copyfile(spec.onnx_path, path)
        return simplify(path)
    log(f"export   {spec.name} -> fp32 ONNX (opset {OPSET})")
    return export_fp32(spec, path)
