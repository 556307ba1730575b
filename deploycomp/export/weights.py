"""How a quantized layer's weight is stored in the QDQ graph, and the decision that says so.

Takes a layer's ``LayerQuant`` and its node in the graph being rewritten, and writes the weight as
integer initializers feeding a DequantizeLinear: int8 per output channel, or INT4 in groups along
the reduction axis (blocked DequantizeLinear, opset 21), in the layout the node reads. Scales are
computed from the weights (max-abs) or taken as given: the steps joint compression learned, so a
weight it left on its grid exports bit-exactly. Linear layers (MatMul/Gemm) and embedding tables
(a Gather from a constant table) take INT8 or INT4, convolutions INT8; an INT4 or weight-only Gemm
is rewritten as MatMul (+ Add). Conv/Gemm biases of W8A8 layers are stored as int32 at scale
``s_x * s_w`` (the layout every INT8 backend folds into its integer kernels). ``LayerQuant`` is
defined here, below :mod:`deploycomp.export.qdq`, which imports this module and re-exports it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from deploycomp.compress.fake_quant import INT8_WEIGHT_SCHEME, parse_weight_scheme
from deploycomp.errors import DeployCompError, ExportError
from deploycomp.kernels.int4 import pack_int4, quantize_int4_groupwise
from deploycomp.kernels.quantize import INT8_WEIGHT_QMAX, quantize_weight_per_channel
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


def safe_name(name: str) -> str:
    return name.strip("/").replace("/", "_").replace(":", "_") or "tensor"


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


class WeightWriter:
    """The initializers and nodes a QDQ rewrite adds for weights and biases, each weight once.

    ``pending`` holds the nodes to place before the node being rewritten and ``new_inits`` the
    initializers to append; the QDQ writer's rewriter subclasses it to add activation pairs.
    """

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = {i.name: i for i in model.graph.initializer}
        self.new_inits: list[onnx.TensorProto] = []
        self.weight_cache: dict[tuple, tuple[str, np.ndarray | None]] = {}
        self.weight_bases: set[str] = set()
        self.pending: list[onnx.NodeProto] = []

    def _const(self, name: str, array: np.ndarray) -> str:
        self.new_inits.append(numpy_helper.from_array(array, name))
        return name

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


def quantize_layer(
    rw: WeightWriter, node: onnx.NodeProto, lq: LayerQuant, x_scale: float | None
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


def _gemm_as_matmul(rw: WeightWriter, node: onnx.NodeProto, lq: LayerQuant) -> list[onnx.NodeProto]:
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
