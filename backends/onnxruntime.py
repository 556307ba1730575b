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
from deploycomp.hw.detect import has_int8_dot_product

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


def signed_weights_to_uint8(model: Any) -> int:
    """Store the int8 weights of W8A8 layers as uint8 with zero point 128, exactly.

    On x86 CPUs without an INT8 dot-product instruction (VNNI, AMX), onnxruntime's u8 x s8
    kernels multiply with AVX2's vpmaddubsw, which saturates the int16 sum of each pair of
    products: a small CNN's outputs moved by 17% of their range. Its u8 x u8 kernels widen to 16
    bits first and match the QDQ graph's arithmetic (2e-7 on the same CNN), still fused into
    QLinearConv / QGemm. ``q + 128`` with zero point 128 dequantizes to the same values as ``q``
    with zero point 0. Only weights that meet a quantized activation are changed (weight-only
    layers keep the int8 form their own fusion wants). Edits ``model`` in place; returns the
    number of weight tensors changed.
    """
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    changed = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2:
            continue
        dqs = [producer.get(name) for name in node.input[:2]]
        if any(dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3 for dq in dqs):
            continue
        weights = [dq for dq in dqs if dq.input[0] in inits]
        if len(weights) != 1:  # one constant weight and one quantized activation
            continue
        weight, zero_point = inits[weights[0].input[0]], inits.get(weights[0].input[2])
        if weight.data_type != TensorProto.INT8 or zero_point is None:
            continue
        zeros = numpy_helper.to_array(zero_point)
        if zero_point.data_type != TensorProto.INT8 or zeros.any():
            continue
        q = numpy_helper.to_array(weight).astype(np.int16) + 128
        weight.CopyFrom(numpy_helper.from_array(q.astype(np.uint8), weight.name))
        zero_point.CopyFrom(numpy_helper.from_array(np.full(zeros.shape, 128, np.uint8),
                                                    zero_point.name))
        changed += 1
    return changed


# One lookup from a 30522 x 384 table (onnxruntime 1.32, 1 thread, 2-core x86-64 host shared with
# other jobs): ms of session.run, best of 9 interleaved medians (medians of medians were up to
# 1.7x higher under load). GatherBlockQuantized's outputs are bit-identical to DQ + Gather's.
#
#   rows   fp32 Gather   DQ + Gather int8 / int4   GatherBlockQuantized int8 / int4 (int4 data)
#   64       0.0075          2.4   / 18.2               0.0117 / 0.0255    (0.196)
#   128      0.0098          2.5   / 18.4               0.0179 / 0.046     (0.385)
#
# The int4 column stores the table as uint8 with bits=4; the same table passed as an INT4 tensor
# (in parentheses) runs 8x slower, so INT4 tables are repacked.
def gather_block_quantized(model: Any) -> int:
    """Run each quantized embedding lookup as one ``com.microsoft.GatherBlockQuantized`` node.

    The exported model reads a weight-only table through ``DequantizeLinear -> Gather``, which
    onnxruntime does not fuse: it dequantizes the whole table on every run, then gathers a few
    rows. Where the DequantizeLinear reads a constant 2-D table and its only consumer is a Gather
    on axis 0 of that table, the pair becomes one contrib node that dequantizes only the gathered
    rows. It takes an INT4 table blocked along the hidden axis (a block size that is a power of
    two >= 16, an even hidden size) and an int8 table with one scale per row, both stored as
    uint8 (``q + 2^(bits-1)``, zero point ``zp + 2^(bits-1)``): the same dequantized values, so
    the rewrite changes no number. Other tables are left alone. One behaviour differs: an
    out-of-range index gathers zeros where Gather fails. Edits ``model`` in place; returns the
    number of lookups rewritten.

    Example:
        >>> gather_block_quantized(model)  # an INT4 word embedding table
        1
    """
    from onnx import helper

    inits = {i.name: i for i in model.graph.initializer}
    taken = set(inits) | {i.name for i in model.graph.input}
    taken |= {name for node in model.graph.node for name in node.output}
    read_in_subgraphs = _subgraph_inputs(model.graph)  # never removed nor rewired
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}
    fused: dict[str, Any] = {}  # Gather output -> the node that replaces the DQ and the Gather
    dropped: set[str] = set()  # outputs of the DequantizeLinear nodes folded into a lookup
    unused: set[str] = set()  # their inputs, removed below unless something else reads them
    for dq in model.graph.node:
        if dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx"):
            continue
        readers = consumers.get(dq.output[0], [])
        if len(readers) != 1 or dq.output[0] in graph_outputs | read_in_subgraphs:
            continue
        gather = readers[0]
        if (
            gather.op_type != "Gather"
            or gather.domain not in ("", "ai.onnx")
            or list(gather.input) != [dq.output[0], gather.input[1]]
            or _attribute(gather, "axis", 0) not in (0, -2)
        ):
            continue
        lookup = _block_quantized_table(dq, inits, taken)
        if lookup is None:
            continue
        tensors, attrs = lookup
        for tensor in tensors:
            if tensor.name not in inits:
                inits[tensor.name] = tensor
                model.graph.initializer.append(tensor)
        fused[gather.output[0]] = helper.make_node(
            "GatherBlockQuantized",
            [tensors[0].name, gather.input[1], *(t.name for t in tensors[1:])],
            list(gather.output),
            name=gather.name or f"{gather.output[0]}_GatherBlockQuantized",
            domain="com.microsoft",
            gather_axis=0,
            quantize_axis=1,
            **attrs,
        )
        dropped.add(dq.output[0])
        unused.update(dq.input)
    if not fused:
        return 0
    nodes = [
        fused.get(node.output[0], node) if node.op_type == "Gather" else node
        for node in model.graph.node
        if not (node.op_type == "DequantizeLinear" and node.output[0] in dropped)
    ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    unused -= {name for node in nodes for name in node.input}
    unused -= graph_outputs | read_in_subgraphs | {i.name for i in model.graph.input}
    kept = [i for i in model.graph.initializer if i.name not in unused]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(fused)


def _subgraph_inputs(graph: Any) -> set[str]:
    """Names read by nodes of the subgraphs (If, Loop, Scan bodies) under ``graph``."""
    from onnx import AttributeProto

    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == AttributeProto.GRAPH else []
            bodies += list(attr.graphs) if attr.type == AttributeProto.GRAPHS else []
            for body in bodies:
                names |= {name for inner in body.node for name in inner.input}
                names |= _subgraph_inputs(body)
    return names


def _attribute(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _block_quantized_table(
    dq: Any, inits: dict[str, Any], taken: set[str]
) -> tuple[list[Any], dict[str, int]] | None:
    """GatherBlockQuantized's (data, scales, zero points) initializers and attributes for the
    table ``dq`` dequantizes, or None where the contrib op cannot take it exactly."""
    from onnx import TensorProto, numpy_helper

    names = [name for name in dq.input if name]
    tensors = [inits.get(name) for name in names]
    if any(t is None or t.data_location == TensorProto.EXTERNAL for t in tensors):
        return None  # not a constant, or not loaded (the lowerer reads no external data)
    table, scale = tensors[0], tensors[1]
    zero_point = tensors[2] if len(tensors) > 2 else None
    if len(table.dims) != 2 or scale.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        return None
    if _attribute(dq, "output_dtype", 0) not in (0, scale.data_type):
        return None
    vocab, hidden = table.dims
    axis, block = _attribute(dq, "axis", 1), _attribute(dq, "block_size", 0)
    if table.data_type == TensorProto.INT4:  # blocked along the hidden axis
        if axis not in (1, -1) or block < 16 or block & (block - 1) or hidden % 2:
            return None
        bits, blocks = 4, -(-hidden // block)
        shape = [vocab, blocks]
    elif table.data_type == TensorProto.INT8 and not block and axis in (0, -2):  # per row
        # One block spanning each row (the smallest power of two >= 16 that covers it) keeps
        # one scale per row.
        bits, shape, blocks = 8, [vocab], 1
        block = max(16, 1 << (hidden - 1).bit_length())
    else:
        return None
    if list(scale.dims) != shape or (
        zero_point is not None
        and (zero_point.data_type != table.data_type or list(zero_point.dims) != shape)
    ):
        return None
    if bits == 8:
        scale = numpy_helper.from_array(
            numpy_helper.to_array(scale).reshape(vocab, 1), _fresh(f"{scale.name}_rows", taken)
        )
    # The op reads 4 and 8 bits fastest from uint8 (4 bits packed two a byte, low nibble first,
    # row by row): q + 2^(bits-1) with zero point zp + 2^(bits-1) dequantizes to (q - zp) * s, as
    # before. 2^(bits-1) is the op's default zero point for uint8, so zp = 0 is not stored.
    offset = 1 << (bits - 1)
    q = numpy_helper.to_array(table).astype(np.int16)
    tensors = [
        numpy_helper.from_array(_pack(q + offset, bits), _fresh(f"{table.name}_uint8", taken)),
        scale,
    ]
    zp = numpy_helper.to_array(zero_point).astype(np.int16) if zero_point is not None else 0
    if np.any(zp):
        zp = _pack(zp.reshape(vocab, blocks) + offset, bits)
        tensors.append(numpy_helper.from_array(zp, _fresh(f"{table.name}_zero_point", taken)))
    return tensors, {"bits": bits, "block_size": block}


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``bits``-bit values of a 2-D array as uint8, 4 bits two a byte along each row."""
    if bits == 8:
        return values.astype(np.uint8)
    if values.shape[1] % 2:
        values = np.pad(values, ((0, 0), (0, 1)))
    return (values[:, 0::2] | (values[:, 1::2] << 4)).astype(np.uint8)


def _fresh(name: str, taken: set[str]) -> str:
    """``name``, suffixed with a number if a tensor of the graph already has it; now taken."""
    candidate, n = name, 0
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    taken.add(candidate)
    return candidate


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
        lookups = gather_block_quantized(model)
        requantized = requantize_after_transparent_ops(model) if precision == "int8" else 0
        unsigned = signed_activations_to_uint8(model) if precision == "int8" else 0
        widened = 0
        if precision == "int8" and not has_int8_dot_product():
            widened = signed_weights_to_uint8(model)
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
        if lookups:
            notes.append(
                f"ran {lookups} quantized embedding lookup(s) as com.microsoft.GatherBlockQuantized"
                " (exact): onnxruntime does not fuse DequantizeLinear + Gather and would dequantize"
                " the whole table on every run; an out-of-range index now gathers zeros instead of"
                " failing"
            )
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
        if widened:
            notes.append(
                f"stored {widened} int8 weight tensor(s) as uint8 with zero point 128 (exact): "
                "this CPU has no INT8 dot-product instruction (VNNI, AMX), and onnxruntime's "
                "u8 x s8 kernels saturate without one while its u8 x u8 kernels do not"
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
            "int8_weights_as_uint8": bool(widened),
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
