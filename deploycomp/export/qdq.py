"""Rewrite an fp32 ONNX graph into the QDQ graph that carries the plan's decisions.

For each layer the plan quantizes, its activation input passes through a QuantizeLinear /
DequantizeLinear pair (per tensor, symmetric: int8, or uint8 with zero point 0 for non-negative
tensors; none for a weight-only layer) and its weight is stored as integers feeding a
DequantizeLinear: int8 per output channel, or INT4 in groups along the reduction axis (blocked
DequantizeLinear, which lifts the whole graph to opset 21). Scales are computed from the weights
(max-abs) or taken as given: the steps joint compression learned, so a weight it left on its grid
exports bit-exactly. Linear layers (MatMul/Gemm) and embedding tables (a Gather from a constant
table) take INT8 or INT4, convolutions INT8. Conv/Gemm biases of W8A8 layers are stored as int32
at scale ``s_x * s_w`` (the layout every INT8 backend folds into its integer kernels). A tensor
that feeds several quantized layers gets one Q/DQ pair. The result is the single model every
backend consumes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from deploycomp.compress.fake_quant import INT8_WEIGHT_SCHEME, parse_weight_scheme
from deploycomp.errors import DeployCompError, ExportError
from deploycomp.export.calibrate import TensorRange
from deploycomp.export.opset import INT4_OPSET, default_opset, upgrade_opset
from deploycomp.kernels.int4 import pack_int4, quantize_int4_groupwise
from deploycomp.kernels.quantize import (
    INT8_WEIGHT_QMAX,
    activation_qparams,
    quantize_weight_per_channel,
)
from deploycomp.plan.inventory import Layer

FP32 = "fp32"
ACTIVATION_SCHEMES = ("int8_sym_per_tensor", "uint8_per_tensor", FP32)


@dataclasses.dataclass(frozen=True)
class LayerQuant:
    """What to do to one layer: its inventory entry, its input's scheme and its weight's.

    Args:
        layer: the inventory entry (its ``node`` and ``weight`` name the ONNX node and table).
        activation: ``"int8_sym_per_tensor"``, ``"uint8_per_tensor"`` or ``"fp32"`` (weight-only:
            no Q/DQ pair on the input; the only choice for an embedding, whose input is indices).
        weight: ``"int8_sym_per_channel"`` or ``"int4_sym_group<g>"`` (linear and embedding only).
        weight_scale: optional scale to quantize with instead of max-abs, in the torch weight
            layout that ``WeightFakeQuant.scale()`` returns: ``[out]`` for int8 per channel,
            ``[out, K / g]`` for int4 groups, where a Linear weight is ``[out, in]``, a Conv
            weight ``[out, in / groups, kh, kw]`` read as ``[out, K]`` and an embedding table
            ``[vocab, hidden]`` has rows as ``out``. Values are used as they are (no re-flooring).

    Raises:
        ExportError: an unknown activation or weight scheme.

    Example:
        >>> LayerQuant(layer, "fp32", "int4_sym_group32", quantizer.scale().numpy())
    """

    layer: Layer
    activation: str  # "int8_sym_per_tensor" | "uint8_per_tensor" | "fp32"
    weight: str = INT8_WEIGHT_SCHEME
    weight_scale: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATION_SCHEMES:
            raise ExportError(
                f"layer {self.layer.name!r}: unknown activation scheme {self.activation!r}; "
                f"expected one of {ACTIVATION_SCHEMES}; fix the plan's `activation` field."
            )
        _ = self.group_size  # validates the weight scheme

    @property
    def group_size(self) -> int | None:
        """``g`` of an ``int4_sym_group<g>`` weight; None for int8 per channel."""
        try:
            return parse_weight_scheme(self.weight)[1]
        except DeployCompError as exc:
            raise ExportError(f"layer {self.layer.name!r}: {exc}") from exc


def weight_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of a node's weight."""
    if node.op_type in ("Conv", "Gather"):
        return 0
    if node.op_type == "Gemm":
        return 0 if next((a.i for a in node.attribute if a.name == "transB"), 0) else 1
    return 1  # MatMul: weight is [K, N]


def _int4_tensor(name: str, q: np.ndarray) -> onnx.TensorProto:
    """An ONNX INT4 initializer: the flattened values packed two per byte, a pad nibble if odd."""
    flat = torch.from_numpy(np.ascontiguousarray(q, dtype=np.int8).reshape(-1))
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.INT4, dims=q.shape)
    tensor.raw_data = pack_int4(flat).numpy().tobytes()
    return tensor


def _explicit_scale(lq: LayerQuant, expected: tuple[int, ...]) -> np.ndarray:
    scale = np.asarray(lq.weight_scale, dtype=np.float32)
    if scale.shape != expected:
        layout = "[out]" if lq.group_size is None else "[out, K / g]"
        raise ExportError(
            f"layer {lq.layer.name!r}: weight_scale has shape {scale.shape!r}, expected "
            f"{expected!r} ({layout} in the torch weight layout, as WeightFakeQuant.scale() "
            f"returns for {lq.weight!r}); pass the scale of this layer's quantizer."
        )
    if not np.all(np.isfinite(scale) & (scale > 0)):
        raise ExportError(
            f"layer {lq.layer.name!r}: weight_scale must be positive and finite, found values "
            f"from {scale.min():.4g} to {scale.max():.4g}; pass WeightFakeQuant.scale()."
        )
    return scale


class _Rewriter:
    def __init__(self, model: onnx.ModelProto, ranges: Mapping[str, TensorRange]):
        self.model = model
        self.ranges = ranges
        self.inits = {i.name: i for i in model.graph.initializer}
        self.new_inits: list[onnx.TensorProto] = []
        self.act_cache: dict[str, tuple[str, float]] = {}
        self.weight_cache: dict[tuple, tuple[str, np.ndarray | None]] = {}
        self.weight_bases: set[str] = set()
        self.pending: list[onnx.NodeProto] = []

    def _const(self, name: str, array: np.ndarray) -> str:
        self.new_inits.append(numpy_helper.from_array(array, name))
        return name

    def activation(self, tensor: str, scheme: str) -> tuple[str, float]:
        """The dequantized tensor and scale of a per-tensor activation pair, made on first use.

        One pair per tensor, shared by its consumers: a DequantizeLinear per consumer measured
        no faster on OpenVINO or ONNX Runtime, and onnxruntime left the unused per-consumer DQ
        nodes running after fusing a pooling op into INT8 (Fashion-MNIST CNN, batch 64: 3.47 ms
        against 2.22 ms with one shared pair).
        """
        if tensor in self.act_cache:
            return self.act_cache[tensor]
        rng = self.ranges.get(tensor)
        if rng is None:
            raise ExportError(f"no calibration range for tensor {tensor!r}; calibrate it first.")
        unsigned = scheme == "uint8_per_tensor"
        if unsigned and not rng.non_negative:
            raise ExportError(
                f"tensor {tensor!r} takes negative values (min {rng.min:.4g}) but the plan asks "
                "for uint8; use int8_sym_per_tensor."
            )
        scale, dtype = activation_qparams(-rng.clip, rng.clip, unsigned)
        base = safe_name(tensor)
        s = self._const(f"{base}_scale", np.array(scale, np.float32))
        zp = self._const(f"{base}_zero_point", np.array(0, np.dtype(dtype)))
        q_out, dq_out = f"{base}_quantized", f"{base}_dequantized"
        self.pending.append(
            helper.make_node(
                "QuantizeLinear", [tensor, s, zp], [q_out], name=f"{base}_QuantizeLinear"
            )
        )
        self.pending.append(
            helper.make_node(
                "DequantizeLinear", [q_out, s, zp], [dq_out], name=f"{base}_DequantizeLinear"
            )
        )
        self.act_cache[tensor] = (dq_out, scale)
        return self.act_cache[tensor]

    def weight(
        self, name: str, lq: LayerQuant, out_axis: int, transpose: bool = False
    ) -> tuple[str, np.ndarray | None]:
        """The dequantized weight ``name`` per ``lq``, and its per-channel scale (None for INT4).

        ``out_axis`` is the output-channel axis of the stored weight (0: ``[out, ...]``, 1:
        ``[K, out]``); ``transpose`` writes a 2-D weight transposed (a Gemm with ``transB=1``
        rewritten as a MatMul).
        """
        key = (name, lq.weight, out_axis, transpose)
        if key in self.weight_cache:
            return self.weight_cache[key]
        if name not in self.inits:
            raise ExportError(
                f"layer {lq.layer.name!r}: its weight {name!r} is not an initializer of the "
                "graph; only constant weights can be quantized. Export with constant folding."
            )
        w = numpy_helper.to_array(self.inits[name]).astype(np.float32)
        if transpose:
            w, out_axis = w.T, 1 - out_axis
        base = safe_name(name)
        if base in self.weight_bases:  # the same weight in a second layout or scheme
            base = f"{base}_{len(self.weight_bases)}"
        self.weight_bases.add(base)
        if lq.group_size is None:
            q, scale = self._int8(w, out_axis, lq)
            inputs = [
                self._const(f"{base}_quantized", q),
                self._const(f"{base}_scale", scale),
                self._const(f"{base}_zero_point", np.zeros_like(scale, dtype=np.int8)),
            ]
            attrs = {"axis": out_axis}
        else:
            q, blocked = self._int4(w, out_axis, lq)
            self.new_inits.append(_int4_tensor(f"{base}_quantized", q))
            inputs = [f"{base}_quantized", self._const(f"{base}_scale", blocked)]
            # The reduction axis is blocked; zero point omitted: 0, the symmetric grid.
            attrs, scale = {"axis": 1 - out_axis, "block_size": lq.group_size}, None
        out = f"{base}_dequantized"
        self.pending.append(
            helper.make_node(
                "DequantizeLinear", inputs, [out], name=f"{base}_DequantizeLinear", **attrs
            )
        )
        self.weight_cache[key] = (out, scale)
        return self.weight_cache[key]

    @staticmethod
    def _int8(w: np.ndarray, axis: int, lq: LayerQuant) -> tuple[np.ndarray, np.ndarray]:
        if lq.weight_scale is None:
            return quantize_weight_per_channel(w, axis)
        scale = _explicit_scale(lq, (w.shape[axis],))
        shape = [1] * w.ndim
        shape[axis] = -1
        # float32 division and round half to even, as the fake quantizer that learned the scale.
        q = np.clip(np.round(w / scale.reshape(shape)), -INT8_WEIGHT_QMAX, INT8_WEIGHT_QMAX)
        return q.astype(np.int8), scale

    @staticmethod
    def _int4(w: np.ndarray, out_axis: int, lq: LayerQuant) -> tuple[np.ndarray, np.ndarray]:
        """INT4 codes and blocked scales of the 2-D weight ``w``, both in ``w``'s layout."""
        rows = w if out_axis == 0 else w.T  # the torch layout [out, K]
        group = lq.group_size
        if w.ndim != 2 or rows.shape[1] % group:
            raise ExportError(
                f"layer {lq.layer.name!r}: {lq.weight!r} needs a 2-D weight whose reduction size "
                f"is a multiple of {group}, got weight shape {w.shape!r}; pick a group size "
                "that divides it or use int8_sym_per_channel."
            )
        scales = None
        if lq.weight_scale is not None:
            scales = torch.from_numpy(_explicit_scale(lq, (rows.shape[0], rows.shape[1] // group)))
        q, s = quantize_int4_groupwise(torch.from_numpy(np.ascontiguousarray(rows)), group, scales)
        q, s = q.numpy(), s.numpy().astype(np.float32)
        return (q, s) if out_axis == 0 else (q.T, s.T)

    def bias(self, name: str, scale: np.ndarray) -> str:
        b = numpy_helper.to_array(self.inits[name]).astype(np.float64)
        q = np.clip(np.round(b / scale), -(2**31), 2**31 - 1).astype(np.int32)
        base = f"{safe_name(name)}_for_{len(self.new_inits)}"
        q_name = self._const(f"{base}_quantized", q)
        s = self._const(f"{base}_scale", scale.astype(np.float32))
        zp = self._const(f"{base}_zero_point", np.zeros_like(q))
        out = f"{base}_dequantized"
        self.pending.append(
            helper.make_node(
                "DequantizeLinear", [q_name, s, zp], [out], name=f"{base}_DequantizeLinear", axis=0
            )
        )
        return out


def safe_name(name: str) -> str:
    return name.strip("/").replace("/", "_").replace(":", "_") or "tensor"


# Ops that commute with per-tensor quantization: they only move, select or reshape values, so a
# Q/DQ pair before them is equivalent to one after, and backends then run them on INT8 data
# (max-pooling INT8, flattening INT8) and fuse the Q into the producer's epilogue.
# A zero Pad is transparent too: zero is exact under symmetric quantization (zero point 0).
# Reshape and Transpose commute as well, but a pair hoisted above the head-merging
# Transpose/Reshape of attention left OpenVINO running the transposes on dequantized data
# (48 Transpose layers against 6 for MiniLM-L6), so the pair stays at the layer there.
TRANSPARENT_OPS = ("MaxPool", "Flatten", "Squeeze", "Unsqueeze", "Identity")


def constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs of ``model`` by tensor name."""
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def is_transparent(node: onnx.NodeProto, constants: Mapping[str, np.ndarray]) -> bool:
    """Whether ``node`` commutes with per-tensor symmetric quantization of its first input."""
    if node.op_type in TRANSPARENT_OPS:
        return True
    if node.op_type != "Pad":
        return False
    mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
    if mode != "constant":
        return False
    value = node.input[2] if len(node.input) > 2 else ""
    return not value or (value in constants and not np.any(constants[value]))


def activation_sites(model: onnx.ModelProto, quantized_nodes: set[str]) -> dict[str, str]:
    """For each quantized node, the tensor whose Q/DQ pair feeds its activation input.

    The pair is hoisted above a chain of transparent ops when every consumer along the chain is
    either the next op of the chain or a quantized layer, so no float consumer changes.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    constants = constant_values(model)
    sites = {}
    for node in model.graph.node:
        if node.name not in quantized_nodes:
            continue
        tensor, reader = node.input[0], node
        while True:
            prod = producer.get(tensor)
            if prod is None or not is_transparent(prod, constants):
                break
            readers = consumers.get(tensor, [])
            if not all(c is reader or c.name in quantized_nodes for c in readers):
                break
            upstream = prod.input[0]
            if any(c is not prod for c in consumers.get(upstream, [])):
                break
            tensor, reader = upstream, prod
        sites[node.name] = tensor
    return sites


def residual_adds(model: onnx.ModelProto, quantized_nodes: set[str]) -> list[onnx.NodeProto]:
    """Add nodes that join two activation branches between quantized convolutions.

    An Add qualifies when both inputs are activations, one comes straight from a quantized Conv,
    and its output feeds a quantized layer or another such Add (the residual stream of a
    MobileNet/EfficientNet/ResNet block). Quantizing both inputs keeps the stream in INT8, so a
    backend fuses the add into the convolution before it instead of leaving both in float.
    Transformer residuals, which feed LayerNorm, do not qualify.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    candidates = []
    for node in model.graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        if any(i in constants for i in node.input):
            continue
        if not any(
            (p := producer.get(i)) is not None and p.op_type == "Conv" and p.name in quantized_nodes
            for i in node.input
        ):
            continue
        candidates.append(node)
    names = {n.name for n in candidates}
    return [
        n
        for n in candidates
        if any(c.name in quantized_nodes or c.name in names for c in consumers.get(n.output[0], []))
    ]


def insert_qdq(
    model: onnx.ModelProto,
    layers: Mapping[str, LayerQuant],
    ranges: Mapping[str, TensorRange],
    adds: Mapping[str, Mapping[str, str]] | None = None,
) -> onnx.ModelProto:
    """Return a copy of ``model`` with the given layers (keyed by ONNX node name) quantized.

    ``ranges`` holds the calibration range of every activation site of a layer whose activation
    is quantized (see :func:`activation_sites`) and of every input of ``adds`` (Add node name ->
    input tensor -> activation scheme; see :func:`residual_adds`). If any layer has an INT4
    weight the copy is at opset 21 (:func:`~deploycomp.export.opset.upgrade_opset`).

    Raises:
        ExportError: a missing calibration range, a scheme the layer's operator cannot take
            (INT4 convolution, a quantized input for an embedding), a weight_scale of the wrong
            shape, a model below opset 13.

    Example:
        >>> qdq = insert_qdq(fp32, {
        ...     linear.node: LayerQuant(linear, "fp32", "int4_sym_group128", scale),
        ...     conv.node: LayerQuant(conv, "uint8_per_tensor"),
        ... }, ranges)
    """
    adds = adds or {}
    if default_opset(model) < 13:
        raise ExportError(
            f"per-channel QDQ needs opset >= 13, the model is at opset {default_opset(model)}; "
            "export with opset 17."
        )
    if any(lq.group_size is not None for lq in layers.values()):
        model = upgrade_opset(model, INT4_OPSET)
    _check_layers(model, layers)
    rw = _Rewriter(model, ranges)
    constants = constant_values(model)
    reads_quantized = {name for name, lq in layers.items() if lq.activation != FP32}
    sites = activation_sites(model, reads_quantized)
    site_scheme = {sites[name]: layers[name].activation for name in reads_quantized}
    nodes = []
    for node in model.graph.node:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        decision = layers.get(node.name)
        # Inputs that are hoisted activation sites (the transparent op at the top of a chain,
        # or the layer itself) read the dequantized tensor.
        for idx, name in enumerate(node.input):
            if node.name in adds:
                new.input[idx] = rw.activation(name, adds[node.name][name])[0]
            elif name in site_scheme and (
                (decision is None and is_transparent(node, constants))
                or (node.name in reads_quantized and idx == 0)
            ):
                new.input[idx] = rw.activation(name, site_scheme[name])[0]
        rewritten = [new]
        if decision is not None:
            x_scale = None
            if node.name in reads_quantized:
                x_scale = rw.activation(sites[node.name], decision.activation)[1]
            rewritten = _quantize_layer(rw, new, decision, x_scale)
        nodes.extend(rw.pending)
        rw.pending.clear()
        nodes.extend(rewritten)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept + rw.new_inits)
    return out


def _check_layers(model: onnx.ModelProto, layers: Mapping[str, LayerQuant]) -> None:
    """Raise unless every decision names a node of ``model`` that can take its schemes."""
    nodes = {n.name: n for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    for name, lq in layers.items():
        node = nodes.get(name)
        where = f"layer {lq.layer.name!r} (node {name!r})"
        if node is None:
            raise ExportError(
                f"{where} is not in the graph; build the plan from this graph's inventory."
            )
        if node.op_type not in ("Conv", "Gemm", "MatMul", "Gather"):
            raise ExportError(
                f"{where} is a {node.op_type}; weights are quantized on Conv, Gemm, MatMul and "
                "Gather (embedding) nodes only. Leave it out of the plan."
            )
        if node.op_type == "Conv" and lq.group_size is not None:
            raise ExportError(
                f"{where} is a convolution, and no backend runs INT4 convolutions "
                f"({lq.weight!r} requested); use int8_sym_per_channel for it."
            )
        if node.op_type != "Gather":
            continue
        if lq.activation != FP32:
            raise ExportError(
                f"{where} is an embedding (Gather): its input is integer indices, so its "
                f"activation scheme must be 'fp32', got {lq.activation!r}."
            )
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        table = inits.get(node.input[0])
        if axis != 0 or table is None or len(table.dims) != 2:
            shape = tuple(table.dims) if table is not None else None
            raise ExportError(
                f"{where}: an embedding is a Gather on axis 0 of a constant [vocab, hidden] "
                f"table, got axis {axis} and table {node.input[0]!r} of shape {shape!r}; leave "
                "this Gather out of the plan."
            )


# What the backends make of these graphs (onnxruntime 1.32, openvino 2026.4, 2-core AMD EPYC with
# AVX-512 VNNI). onnxruntime fuses DequantizeLinear(int4, blocked on axis 0) + MatMul into its
# MatMulNBits at ORT_ENABLE_EXTENDED and above (not at BASIC; the lowerer builds at ALL), so the
# exporter writes standard blocked DQ and never MatMulNBits itself. A DQ feeding a Gemm is not
# fused, so an INT4 or weight-only Gemm is written as MatMul + Add (an int8 per-channel DQ +
# MatMul then becomes an 8-bit MatMulNBits). An INT4 weight behind a quantized input (W4A8) is
# not fused and runs as DQ + MatMul. ONNX Runtime itself does not fuse DQ + Gather (it dequantizes
# the whole table on every run: 30522 x 384, 128 indices, 1 thread: 3.9 ms int8, 23 ms int4,
# 0.01 ms fp32), so its lowerer rewrites the pair into GatherBlockQuantized
# (backends/onnxruntime.py, gather_block_quantized). openvino keeps INT4 weights and
# tables as i4 constants and runs FullyConnected and Gather on them.
# Median session.run in us of one MatMul [M, 384] x [384, N], 1 thread, variants interleaved,
# best of 3 medians; weight-only runs as MatMulNBits at accuracy level 4 (int8 compute; level 1,
# fp32 compute, is slower than fp32 MatMul everywhere: 14.8, 53.5, 219, 830 for int4 g128):
#
#   M    N     fp32    int8 W8A8   int8 w-only   int4 g128 w-only   | other run: fp32  int4 g32
#   1    384   12.8      9.6          9.1             8.3           |           16.4     12.1
#   1    1536  43.9     25.7         26.2            20.2           |           48.9     27.6
#   64   384  189.6     70.0        194.5           159.6           |          176.7    175.8
#   64   1536 724.5    235.1        630.3           561.1           |          724.3    760.6
#
# INT4 weight-only pays at M = 1 (memory-bound) only; at M = 64 W8A8 is 2.3x faster. Runs with
# 2 threads did not scale on this shared 2-core machine (other jobs on the second core) and are
# not a basis for any choice here.


def _quantize_layer(
    rw: _Rewriter, node: onnx.NodeProto, lq: LayerQuant, x_scale: float | None
) -> list[onnx.NodeProto]:
    """``node`` (a copy, its activation input already rewired) with its weight quantized."""
    if node.op_type == "Gather":  # an embedding: the table is the first input
        node.input[0] = rw.weight(node.input[0], lq, 0)[0]
        return [node]
    if node.op_type == "Gemm" and (lq.group_size is not None or x_scale is None):
        return _gemm_as_matmul(rw, node, lq)
    w_dq, w_scale = rw.weight(node.input[1], lq, weight_axis(node))
    node.input[1] = w_dq
    bias = rw.inits.get(node.input[2]) if len(node.input) > 2 else None
    # A bias of one value per output channel is stored as int32 at scale s_x * s_w; a
    # broadcast bias of any other shape stays fp32.
    if (
        node.op_type in ("Conv", "Gemm")
        and bias is not None
        and x_scale is not None
        and w_scale is not None
        and list(bias.dims) == [w_scale.size]
    ):
        node.input[2] = rw.bias(node.input[2], x_scale * w_scale.astype(np.float64))
    return [node]


def _gemm_as_matmul(rw: _Rewriter, node: onnx.NodeProto, lq: LayerQuant) -> list[onnx.NodeProto]:
    """A Gemm as MatMul (+ Add of its bias), with the weight stored ``[K, N]`` and quantized."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    has_bias = len(node.input) > 2 and bool(node.input[2])
    if (
        attrs.get("transA", 0)
        or attrs.get("alpha", 1.0) != 1.0
        or (has_bias and attrs.get("beta", 1.0) != 1.0)
    ):
        raise ExportError(
            f"layer {lq.layer.name!r}: a Gemm with transA={attrs.get('transA', 0)}, "
            f"alpha={attrs.get('alpha', 1.0)}, beta={attrs.get('beta', 1.0)} cannot be "
            "rewritten as the MatMul that weight-only kernels take; expected transA=0, alpha=1, "
            "beta=1 (as torch.nn.Linear exports). Use an int8 weight with a quantized input."
        )
    trans_b = bool(attrs.get("transB", 0))
    w_dq, _ = rw.weight(node.input[1], lq, 0 if trans_b else 1, transpose=trans_b)
    output = node.output[0]
    product = f"{safe_name(output)}_matmul" if has_bias else output
    matmul = helper.make_node("MatMul", [node.input[0], w_dq], [product], name=node.name)
    if not has_bias:
        return [matmul]
    add = helper.make_node("Add", [product, node.input[2]], [output], name=f"{node.name}_bias_Add")
    return [matmul, add]
