"""Rewrite an fp32 ONNX graph into the QDQ graph that carries the plan's decisions.

Takes an fp32 model, a ``LayerQuant`` per layer to quantize and calibration ranges, and returns
the single model every backend consumes. This module places the activation side: the activation
input of each layer the plan quantizes passes through a QuantizeLinear / DequantizeLinear pair
(per tensor, symmetric: int8, or uint8 with zero point 0 for non-negative tensors; none for a
weight-only layer), hoisted above ops that commute with it (:func:`activation_sites`); the inputs
of residual adds between quantized convolutions get pairs too (:func:`residual_adds`). A tensor
that feeds several quantized layers gets one Q/DQ pair. How each weight and bias is stored is
:mod:`deploycomp.export.weights`; a plan with an INT4 weight lifts the whole graph to opset 21.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from deploycomp.errors import ExportError
from deploycomp.export.calibrate import TensorRange
from deploycomp.export.opset import INT4_OPSET, default_opset, upgrade_opset
from deploycomp.export.weights import (
    FP32,
    LayerQuant,
    WeightWriter,
    quantize_layer,
    safe_name,
    weight_axis,
)
from deploycomp.kernels.quantize import activation_qparams

__all__ = [
    "TRANSPARENT_OPS",
    "LayerQuant",
    "activation_sites",
    "constant_values",
    "insert_qdq",
    "is_transparent",
    "residual_adds",
    "safe_name",
    "weight_axis",
]


class _Rewriter(WeightWriter):
    def __init__(self, model: onnx.ModelProto, ranges: Mapping[str, TensorRange]):
        super().__init__(model)
        self.ranges = ranges
        self.act_cache: dict[str, tuple[str, float]] = {}

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
            rewritten = quantize_layer(rw, new, decision, x_scale)
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
