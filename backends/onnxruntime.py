"""ONNX Runtime on the CPU execution provider: the embedded default backend.

``build`` validates the ONNX file (onnx.checker, then a session on the CPU EP, which fails on an
operator the EP cannot run), and saves the graph as optimized for this EP (``model.ort.onnx``);
``load`` opens that file in a session with explicit, recorded threading. ONNX Runtime runs fp32
models in fp32 by default, so the ``default_precision`` variant is the same engine as ``fp32``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from deploycomp.artifacts import Engine
from deploycomp.backends.base import Availability, Backend, BuildConfig, Session
from deploycomp.errors import BackendError

ENGINE_FILE = "model.ort.onnx"
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_PROVIDERS = ["CPUExecutionProvider"]
MATMULNBITS_ACCURACY_LEVEL = 4  # int8 compute in MatMulNBits; see OnnxRuntimeBackend._build


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on, sorted (all CPUs where affinity is not supported)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def validate_onnx(onnx_path: Path) -> Any:
    """Load and check an ONNX file; return the ``ModelProto`` (weights not loaded).

    Raises:
        BackendError: the file is not a valid ONNX model.
    """
    import onnx  # a core dependency, imported here to keep `import deploycomp.backends` light

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
        onnx.checker.check_model(str(onnx_path))
    except Exception as exc:
        raise BackendError(
            f"{str(onnx_path)!r} is not a valid ONNX model ({type(exc).__name__}: "
            f"{str(exc).strip()[:300]}). Re-export the model; check that the file was copied "
            "completely."
        ) from exc
    return model


def requantize_after_transparent_ops(model: Any) -> int:
    """Repeat a per-tensor Q/DQ pair after each MaxPool/Flatten/Reshape/... that reads a DQ output.

    The exported model places one Q/DQ pair above such ops (they commute with per-tensor
    quantization). ONNX Runtime fuses a GEMM or convolution into its integer kernel only when a
    DequantizeLinear feeds it directly, so this lowerer repeats the pair, with the same scale and
    zero point, after the op: exact (re-quantizing a dequantized value is the identity) and it
    lets ``DQ -> Flatten -> Gemm`` become an integer GEMM. Edits ``model`` in place; returns the
    number of pairs added.
    """
    from onnx import helper

    from deploycomp.export.qdq import constant_values, is_transparent

    producer = {o: n for n in model.graph.node for o in n.output}
    constants = constant_values(model)
    scalar_inits = {i.name for i in model.graph.initializer if not list(i.dims)}
    graph_outputs = {o.name for o in model.graph.output}
    nodes, added = [], 0
    for node in model.graph.node:
        nodes.append(node)
        src = producer.get(node.input[0]) if node.input else None
        if not is_transparent(node, constants) or src is None or src.op_type != "DequantizeLinear":
            continue
        if src.input[1] not in scalar_inits or node.output[0] in graph_outputs:
            continue  # a per-channel DQ is a weight's; a graph output keeps its name
        out = node.output[0]
        q_out, dq_out = f"{out}_requantized", f"{out}_redequantized"
        scale, zero_point = src.input[1], src.input[2]
        for other in model.graph.node:
            for idx, name in enumerate(other.input):
                if name == out:
                    other.input[idx] = dq_out
        nodes.append(helper.make_node("QuantizeLinear", [out, scale, zero_point], [q_out],
                                      name=f"{q_out}_QuantizeLinear"))
        dq = helper.make_node("DequantizeLinear", [q_out, scale, zero_point], [dq_out],
                              name=f"{dq_out}_DequantizeLinear")
        nodes.append(dq)
        producer[dq_out] = dq
        added += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return added


def signed_activations_to_uint8(model: Any) -> int:
    """Store int8 activations (zero point 0) as uint8 with zero point 128, exactly.

    On x86, onnxruntime fuses a convolution into its integer kernel only for uint8 activations
    (u8 x s8); signed int8 inputs leave it in float behind DequantizeLinear. ``q + 128`` in uint8
    with zero point 128 dequantizes to the same values as ``q`` in int8 with zero point 0, so the
    rewrite changes no number. Weights stay int8. Edits ``model`` in place; returns the number of
    zero points changed.
    """
    from onnx import TensorProto, numpy_helper

    activation_zps = {n.input[2] for n in model.graph.node
                      if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    changed = 0
    for init in model.graph.initializer:
        if init.name in activation_zps and init.data_type == TensorProto.INT8 and not init.dims:
            if int(numpy_helper.to_array(init)) != 0:
                continue
            init.CopyFrom(numpy_helper.from_array(np.array(128, np.uint8), init.name))
            changed += 1
    return changed


def onnx_precision(model: Any) -> str:
    """``"int4+int8"`` if the graph stores INT4 weights besides other quantized ones, ``"int4"``
    if only INT4, ``"int8"`` if it carries Quantize/DequantizeLinear nodes, else ``"fp32"``."""
    import onnx

    if not any(n.op_type in _QDQ_OPS for n in model.graph.node):
        return "fp32"
    types = {i.data_type for i in model.graph.initializer}
    int4 = bool(types & {onnx.TensorProto.INT4, onnx.TensorProto.UINT4})
    int8 = bool(types & {onnx.TensorProto.INT8, onnx.TensorProto.UINT8})
    if int4:
        return "int4+int8" if int8 else "int4"
    return "int8"


def _unsupported_op_error(exc: Exception, onnx_path: Path) -> BackendError:
    text = str(exc)
    match = re.search(r"implementation for (\S+?)\(\d+\) node with name '([^']*)'", text)
    if match is None:
        match = re.search(r"(\S+?)\(-?\d+\) is not a registered function/op", text)
    where = ""
    if match is not None:
        op = match.group(1)
        node = f" (node {match.group(2)!r})" if match.lastindex and match.lastindex > 1 else ""
        where = f" operator {op!r}{node} is not supported by the CPU execution provider;"
    return BackendError(
        f"onnxruntime cannot run {onnx_path.name!r}:{where} {text.strip()[:400]}. "
        "Export with a supported opset and standard operators, or pick another backend."
    )


class OnnxRuntimeSession(Session):
    """An ``InferenceSession`` behind the :class:`Session` interface."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self._output_names = [o.name for o in session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session.run(self._output_names, inputs)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    engine_file = ENGINE_FILE

    def availability(self) -> Availability:
        if importlib.util.find_spec("onnxruntime") is None:
            return Availability(False, "onnxruntime is not installed: pip install onnxruntime")
        version = importlib.metadata.version("onnxruntime")
        return Availability(True, f"onnxruntime {version} (CPU execution provider)", version)

    def _build(
        self, onnx_path: Path, out_dir: Path, config: BuildConfig
    ) -> tuple[str, dict[str, Any], list[str]]:
        import onnxruntime as ort  # optional backend library: imported only when used

        model = validate_onnx(onnx_path)
        precision = onnx_precision(model)
        requantized = requantize_after_transparent_ops(model) if precision == "int8" else 0
        unsigned = signed_activations_to_uint8(model) if precision == "int8" else 0
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(out_dir / ENGINE_FILE)
        options.log_severity_level = 3  # the NCHWc warning below is recorded as a note instead
        # Weight-only DequantizeLinear + MatMul (INT4 blocked, int8 per channel) fuse into
        # MatMulNBits in this session; accuracy level 4 lets its kernel quantize activations to
        # int8 on the fly (VNNI). Pinned rather than left to the library default (4 in 1.32):
        # 1 thread, K=384, group 128, median us, level 4 against level 1 (fp32 compute):
        # N=384: M=1 8.3 vs 14.8, M=64 160 vs 219; N=1536: M=1 20.2 vs 53.5, M=64 561 vs 830.
        options.add_session_config_entry(
            "session.qdq_matmulnbits_accuracy_level", str(MATMULNBITS_ACCURACY_LEVEL)
        )
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=_PROVIDERS)
        except Exception as exc:
            raise _unsupported_op_error(exc, onnx_path) from exc
        notes = [
            (
                "model.ort.onnx is optimized at ORT_ENABLE_ALL and may hold layouts (NCHWc) "
                "specific to this CPU: rebuild the engine on another machine, do not copy it."
            )
        ]
        if requantized:
            notes.append(
                f"repeated {requantized} activation Q/DQ pair(s) after pooling/reshaping ops so "
                "that onnxruntime fuses the GEMM or convolution after them into INT8"
            )
        if unsigned:
            notes.append(
                f"stored {unsigned} signed int8 activation(s) as uint8 with zero point 128 "
                "(exact): onnxruntime runs x86 integer convolutions on uint8 inputs only"
            )
        if config.variant == "default_precision":
            notes.append(
                "onnxruntime runs fp32 models in fp32 by default on the CPU EP: the "
                "default_precision engine is the fp32 engine."
            )
        build_config = {
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "intra_op_num_threads": config.threads or len(allowed_cpus()),
            "inter_op_num_threads": 1,
            "execution_mode": "ORT_SEQUENTIAL",
            "providers": list(_PROVIDERS),
            "qdq_matmulnbits_accuracy_level": MATMULNBITS_ACCURACY_LEVEL,
            "onnxruntime_version": ort.__version__,
        }
        return precision, build_config, notes

    def _load(self, engine: Engine, threads: int) -> Session:
        import onnxruntime as ort  # optional backend library: imported only when used

        path = Path(engine.path) / ENGINE_FILE
        cpus = allowed_cpus()
        intra_threads = threads or engine.build_config.get("intra_op_num_threads") or len(cpus)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = intra_threads
        options.inter_op_num_threads = 1
        if 1 < intra_threads <= len(cpus):
            # The calling thread is intra-op thread 0 and is not pinned by onnxruntime; the
            # others get one allowed CPU each. Processor ids in this entry are 1-based.
            affinities = ";".join(str(cpu + 1) for cpu in cpus[1:intra_threads])
            options.add_session_config_entry("session.intra_op_thread_affinities", affinities)
        try:
            session = ort.InferenceSession(str(path), options, providers=_PROVIDERS)
        except Exception as exc:
            raise BackendError(f"onnxruntime failed to load {str(path)!r}: {exc}") from exc
        return OnnxRuntimeSession(session)
