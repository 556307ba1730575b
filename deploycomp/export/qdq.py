"""Rewrite an fp32 ONNX graph into the QDQ graph that carries the plan's decisions.

For each layer the plan quantizes, its activation input passes through a QuantizeLinear /
DequantizeLinear pair (per tensor, symmetric: int8, or uint8 with zero point 0 for non-negative
tensors) and its weight is stored as an int8 initializer (per output channel, symmetric) feeding a
DequantizeLinear. Conv/Gemm biases are stored as int32 at scale ``s_x * s_w`` (the layout every
INT8 backend folds into its integer kernels). A tensor that feeds several quantized layers gets one
Q/DQ pair. The result is the single model every backend consumes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from deploycomp.errors import ExportError
from deploycomp.export.calibrate import TensorRange
from deploycomp.kernels.quantize import activation_qparams, quantize_weight_per_channel
from deploycomp.plan.inventory import Layer

_NP_TO_ONNX = {"int8": onnx.TensorProto.INT8, "uint8": onnx.TensorProto.UINT8}


@dataclasses.dataclass(frozen=True)
class LayerQuant:
    """What to do to one layer: its inventory entry and the activation scheme of its input."""

    layer: Layer
    activation: str  # "int8_sym_per_tensor" | "uint8_per_tensor"


def weight_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of a node's weight."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if next((a.i for a in node.attribute if a.name == "transB"), 0) else 1
    return 1  # MatMul: weight is [K, N]


class _Rewriter:
    def __init__(self, model: onnx.ModelProto, ranges: Mapping[str, TensorRange]):
        self.model = model
        self.ranges = ranges
        self.inits = {i.name: i for i in model.graph.initializer}
        self.new_inits: list[onnx.TensorProto] = []
        self.act_cache: dict[str, tuple[str, float]] = {}
        self.weight_cache: dict[str, tuple[str, np.ndarray]] = {}
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
        self.pending.append(helper.make_node("QuantizeLinear", [tensor, s, zp], [q_out],
                                             name=f"{base}_QuantizeLinear"))
        self.pending.append(helper.make_node("DequantizeLinear", [q_out, s, zp], [dq_out],
                                             name=f"{base}_DequantizeLinear"))
        self.act_cache[tensor] = (dq_out, scale)
        return self.act_cache[tensor]

    def weight(self, name: str, axis: int) -> tuple[str, np.ndarray]:
        if name in self.weight_cache:
            return self.weight_cache[name]
        w = numpy_helper.to_array(self.inits[name]).astype(np.float32)
        q, scale = quantize_weight_per_channel(w, axis)
        base = safe_name(name)
        q_name = self._const(f"{base}_quantized", q)
        s = self._const(f"{base}_scale", scale)
        zp = self._const(f"{base}_zero_point", np.zeros_like(scale, dtype=np.int8))
        out = f"{base}_dequantized"
        self.pending.append(helper.make_node("DequantizeLinear", [q_name, s, zp], [out],
                                             name=f"{base}_DequantizeLinear", axis=axis))
        self.weight_cache[name] = (out, scale)
        return self.weight_cache[name]

    def bias(self, name: str, scale: np.ndarray) -> str:
        b = numpy_helper.to_array(self.inits[name]).astype(np.float64)
        q = np.clip(np.round(b / scale), -(2**31), 2**31 - 1).astype(np.int32)
        base = f"{safe_name(name)}_for_{len(self.new_inits)}"
        q_name = self._const(f"{base}_quantized", q)
        s = self._const(f"{base}_scale", scale.astype(np.float32))
        zp = self._const(f"{base}_zero_point", np.zeros_like(q))
        out = f"{base}_dequantized"
        self.pending.append(helper.make_node("DequantizeLinear", [q_name, s, zp], [out],
                                             name=f"{base}_DequantizeLinear", axis=0))
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
        if not any((p := producer.get(i)) is not None and p.op_type == "Conv"
                   and p.name in quantized_nodes for i in node.input):
            continue
        candidates.append(node)
    names = {n.name for n in candidates}
    return [
        n for n in candidates
        if any(c.name in quantized_nodes or c.name in names for c in consumers.get(n.output[0], []))
    ]


def insert_qdq(
    model: onnx.ModelProto,
    layers: Mapping[str, LayerQuant],
    ranges: Mapping[str, TensorRange],
    adds: Mapping[str, Mapping[str, str]] | None = None,
) -> onnx.ModelProto:
    """Return a copy of ``model`` with the given layers (keyed by ONNX node name) quantized.

    ``ranges`` holds the calibration range of every activation site
    (see :func:`activation_sites`) and of every input of ``adds`` (Add node name -> input tensor
    -> activation scheme; see :func:`residual_adds`).
    """
    adds = adds or {}
    rw = _Rewriter(model, ranges)
    constants = constant_values(model)
    sites = activation_sites(model, set(layers))
    site_scheme = {sites[name]: lq.activation for name, lq in layers.items()}
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
            elif name in site_scheme and (decision is None or idx == 0):
                if decision is None and not is_transparent(node, constants):
                    continue
                new.input[idx] = rw.activation(name, site_scheme[name])[0]
        if decision is not None:
            x_scale = rw.activation(sites[node.name], decision.activation)[1]
            axis = weight_axis(node)
            w_dq, w_scale = rw.weight(decision.layer.weight, axis)
            new.input[1] = w_dq
            bias = rw.inits.get(node.input[2]) if len(node.input) > 2 else None
            # A bias of one value per output channel is stored as int32 at scale s_x * s_w; a
            # broadcast bias of any other shape stays fp32.
            if node.op_type in ("Conv", "Gemm") and bias is not None and (
                list(bias.dims) == [w_scale.size]
            ):
                new.input[2] = rw.bias(node.input[2], x_scale * w_scale.astype(np.float64))
        nodes.extend(rw.pending)
        rw.pending.clear()
        nodes.append(new)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept + rw.new_inits)
    if out.opset_import[0].version < 13:
        raise ExportError("per-channel QDQ needs opset >= 13; export with opset 17.")
    return out
