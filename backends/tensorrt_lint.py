"""Check a QDQ ONNX graph against TensorRT's explicit-quantization rules, without TensorRT.

Takes the QDQ model that deploycomp's exporter writes (after the tensorrt lowerer's rewrites) and
returns one :class:`LintIssue` per broken rule, so a model can be checked where TensorRT cannot be
installed, and a build fails with the reason instead of an engine that silently runs float. Severity
``error``: TensorRT rejects the graph or runs a layer in another precision than the plan asked for;
``warning``: it builds, but a planned INT8 (or sparse INT8) kernel cannot run; ``note``: costs speed
only. The rules follow TensorRT's documentation: the Quantize/Dequantize layer references (symmetric
only, constant and strictly positive scales, scalar, 1-D or blocked scales), "Quantization Schemes"
(INT4 is weight-only, in blocks of 64 or 128 along one of the last two axes) and onnx-tensorrt's
operators.md (DequantizeLinear takes INT8, INT4, FP8 or FP4; UINT8 only as a network input or
output). :func:`sparse_weight_nodes` says which GEMMs and convolutions carry 2:4 weights.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import torch
from onnx import TensorProto

from deploycomp.export.qdq import constant_values, is_transparent
from deploycomp.kernels.sparsity import is_2_4_sparse

ERROR, WARNING, NOTE = "error", "warning", "note"
INT4_BLOCK_SIZES = (64, 128)  # TensorRT "Quantization Schemes": the INT4 block sizes it supports
# The types TensorRT's Q/DQ layers quantize to (onnx-tensorrt operators.md, DequantizeLinear).
_QUANTIZED_TYPES = {
    TensorProto.INT8: "int8",
    TensorProto.INT4: "int4",
    TensorProto.FLOAT8E4M3FN: "fp8",
    TensorProto.FLOAT4E2M1: "fp4",
}
_GEMM_OPS = ("Conv", "Gemm", "MatMul")
# Ops TensorRT fuses into a GEMM or convolution epilogue ahead of a QuantizeLinear (bias and
# residual adds, activations), so a Q after them still gives the kernel an INT8 output.
_EPILOGUE_OPS = ("Add", "Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh")


@dataclasses.dataclass(frozen=True)
class LintIssue:
    """One broken rule: the node, the rule id, ``error | warning | note``, and a message that
    says what was found (with its value), what TensorRT expects and how to fix it."""

    node: str
    rule: str
    severity: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity} [{self.rule}] {self.node}: {self.message}"


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.nodes = list(model.graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for n in self.nodes:
            for index, name in enumerate(n.input):
                self.consumers.setdefault(name, []).append((n, index))
        self.values = constant_values(model)
        # ONNX element types of the constants: numpy cannot tell INT4 from INT8 in every version.
        self.types = {i.name: i.data_type for i in model.graph.initializer}
        for n in self.nodes:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.types[n.output[0]] = n.attribute[0].t.data_type

    def is_const(self, name: str) -> bool:
        return name in self.types

    def qtype(self, node: onnx.NodeProto) -> int | None:
        """The quantized element type of a QuantizeLinear output or DequantizeLinear input."""
        if len(node.input) > 2 and node.input[2] in self.types:
            return self.types[node.input[2]]
        if node.op_type == "QuantizeLinear":
            # ONNX's default without a zero point: uint8, unless output_dtype says otherwise.
            return _attr(node, "output_dtype", 0) or TensorProto.UINT8
        if node.input[0] in self.types:
            return self.types[node.input[0]]
        producer = self.producer.get(node.input[0])
        if producer is not None and producer.op_type == "QuantizeLinear":
            return self.qtype(producer)
        return None

    def on_weight(self, node: onnx.NodeProto) -> bool:
        """Whether a Q/DQ node quantizes a constant (a weight) rather than an activation."""
        data = node.input[0]
        if self.is_const(data):
            return True
        producer = self.producer.get(data)
        return (
            node.op_type == "DequantizeLinear"
            and producer is not None
            and producer.op_type == "QuantizeLinear"
            and self.is_const(producer.input[0])
        )

    def weight_values(self, tensor: str) -> np.ndarray | None:
        """A weight input's stored values: a constant, or the constant a Q/DQ chain reads."""
        if self.is_const(tensor):
            return self.values.get(tensor)
        producer = self.producer.get(tensor)
        if producer is None or producer.op_type not in ("DequantizeLinear", "QuantizeLinear"):
            return None
        return self.weight_values(producer.input[0])


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _type_name(onnx_type: int) -> str:
    return TensorProto.DataType.Name(onnx_type).lower()


def _out_axis(consumer: onnx.NodeProto, rank: int) -> int:
    """The output-channel axis of a GEMM/convolution weight, as the exporter lays it out:
    Conv ``[out, in, kh, kw]``: 0; Gemm ``[out, in]`` with transB=1: 0, else ``[in, out]``: 1;
    MatMul ``[in, out]``: the last axis."""
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "Gemm":
        return 0 if _attr(consumer, "transB", 0) else 1
    return rank - 1


def _weight_consumers(g: _Graph, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    return [c for c, i in g.consumers.get(node.output[0], []) if c.op_type in _GEMM_OPS and i == 1]


def lint_qdq_for_tensorrt(model: onnx.ModelProto) -> list[LintIssue]:
    """Check every Q/DQ node and every quantized GEMM/convolution of ``model`` for TensorRT.

    Args:
        model: a QDQ ONNX model (weights loaded).

    Returns:
        The issues in graph order, Q/DQ nodes first; empty when TensorRT takes the graph as is.

    Example:
        >>> errors = [i for i in lint_qdq_for_tensorrt(onnx.load("model.onnx")) if i.severity == ERROR]
    """
    g = _Graph(model)
    issues: list[LintIssue] = []
    for node in g.nodes:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            issues += _check_qdq(g, node)
    for node in g.nodes:
        if node.op_type in _GEMM_OPS:
            issues += _check_placement(g, node)
    return issues


def _type_issue(node: onnx.NodeProto, qtype: int) -> LintIssue | None:
    if qtype in _QUANTIZED_TYPES:
        return None
    found = _type_name(qtype)
    if qtype == TensorProto.UINT8:
        return LintIssue(_name(node), "uint8", ERROR, (
            f"{node.op_type} quantizes to uint8; TensorRT quantizes to signed INT8 only (UINT8 is "
            "only a network input or output type). Plan int8_sym_per_tensor for this tensor: the "
            "NVIDIA hardware profiles never offer uint8_per_tensor."
        ))  # fmt: skip
    if qtype == TensorProto.INT32 and node.op_type == "DequantizeLinear":
        return LintIssue(_name(node), "int32-bias", ERROR, (
            "DequantizeLinear of an int32 tensor (a quantized bias); TensorRT's DequantizeLinear "
            "takes INT8, INT4, FP8 or FP4 and rejects it ('only activation types allowed as input "
            "to this layer'). Fold it into a float bias first: "
            "deploycomp.backends.tensorrt.fold_bias_dequantize does."
        ))  # fmt: skip
    return LintIssue(_name(node), "quant-type", ERROR, (
        f"{node.op_type} of type {found}; TensorRT quantizes to "
        f"{', '.join(_QUANTIZED_TYPES.values())} only. Export with int8 or int4 schemes."
    ))  # fmt: skip


def _check_qdq(g: _Graph, node: onnx.NodeProto) -> list[LintIssue]:
    qtype = g.qtype(node)
    if qtype is None:
        return []  # a DQ of a graph input of unknown type: nothing reliable to check
    name, issues = _name(node), []
    bad_type = _type_issue(node, qtype)
    if bad_type is not None:
        return [bad_type]
    if len(node.input) > 2 and node.input[2]:
        zero_point = node.input[2]
        if not g.is_const(zero_point):
            issues.append(LintIssue(name, "zero-point", ERROR, (
                f"zero point {zero_point!r} is computed at run time; TensorRT needs a build-time "
                "constant of zeros (symmetric quantization only). Export it as an initializer."
            )))  # fmt: skip
        elif np.any(np.asarray(g.values[zero_point]).astype(np.float64) != 0):
            values = np.unique(np.asarray(g.values[zero_point]).astype(np.float64))
            issues.append(LintIssue(name, "zero-point", ERROR, (
                f"zero point {zero_point!r} holds {values[:4].tolist()}; TensorRT supports "
                "symmetric quantization only (zero point 0). Quantize symmetrically: the int8_sym "
                "schemes write zero points of 0."
            )))  # fmt: skip
    scale_name = node.input[1]
    if not g.is_const(scale_name):
        issues.append(LintIssue(name, "scale-constant", ERROR, (
            f"scale {scale_name!r} is computed at run time; TensorRT needs a build-time constant "
            "scale. Export it as an initializer."
        )))  # fmt: skip
        return issues
    scale = np.asarray(g.values[scale_name]).astype(np.float64)
    if scale.size == 0 or not np.all(np.isfinite(scale) & (scale > 0)):
        low, high = (float(scale.min()), float(scale.max())) if scale.size else (None, None)
        issues.append(LintIssue(name, "scale", ERROR, (
            f"scale {scale_name!r} ranges over [{low}, {high}]; TensorRT needs every scale "
            "positive and finite. Recalibrate: a zero or NaN scale comes from an all-zero or "
            "non-finite calibration range."
        )))  # fmt: skip
    if qtype == TensorProto.INT4:
        return issues + _check_int4(g, node)
    if scale.size > 1 and not g.on_weight(node):
        issues.append(LintIssue(name, "activation-per-channel", ERROR, (
            f"activation {node.input[0]!r} has {scale.size} scales (per channel); TensorRT "
            "quantizes activations per tensor only (one scalar scale). Use int8_sym_per_tensor."
        )))  # fmt: skip
    elif scale.size > 1 and node.op_type == "DequantizeLinear":
        issues += _check_weight_axis(g, node)
    return issues


def _check_weight_axis(g: _Graph, node: onnx.NodeProto) -> list[LintIssue]:
    weight = g.weight_values(node.input[0])
    if weight is None:
        return []
    rank = weight.ndim
    axis = _attr(node, "axis", 1) % rank
    issues = []
    for consumer in _weight_consumers(g, node):
        expected = _out_axis(consumer, rank)
        if axis != expected:
            issues.append(LintIssue(_name(node), "weight-axis", ERROR, (
                f"per-channel scales on axis {axis} of the {consumer.op_type} weight of shape "
                f"{tuple(weight.shape)} (node {_name(consumer)!r}); TensorRT scales weights per "
                f"output channel, axis {expected} here. Quantize the weight along its output "
                "axis (int8_sym_per_channel does)."
            )))  # fmt: skip
    return issues


def _check_int4(g: _Graph, node: onnx.NodeProto) -> list[LintIssue]:
    """INT4 only as a blocked, constant, weight-only DequantizeLinear feeding a GEMM's weight."""
    name = _name(node)
    if not g.on_weight(node):
        return [LintIssue(name, "int4-activation", ERROR, (
            f"{node.op_type} quantizes the activation {node.input[0]!r} to int4; TensorRT runs "
            "INT4 as weight-only quantization only. Keep activations at int8 or float."
        ))]  # fmt: skip
    if node.op_type == "QuantizeLinear":
        return []  # its DequantizeLinear is checked
    if not g.is_const(node.input[0]):
        return [LintIssue(name, "int4-constant", ERROR, (
            f"the INT4 weight {node.input[0]!r} is computed at run time (a QuantizeLinear); "
            "TensorRT needs INT4 weights stored as a constant INT4 initializer. Export the "
            "weight pre-quantized (the int4_sym_group schemes do)."
        ))]  # fmt: skip
    others = [c for c, i in g.consumers.get(node.output[0], [])
              if c.op_type not in ("MatMul", "Gemm") or i != 1]  # fmt: skip
    if others:
        what = ", ".join(f"{c.op_type} {_name(c)!r}" for c in others)
        return [LintIssue(name, "int4-consumer", ERROR, (
            f"the INT4 weight feeds {what}; TensorRT runs INT4 only as the weight of a GEMM "
            "(MatMul or Gemm input B), never in a convolution or a lookup. Use "
            "int8_sym_per_channel for this layer."
        ))]  # fmt: skip
    block = _attr(node, "block_size", 0)
    if not block:
        return [LintIssue(name, "int4-block", ERROR, (
            "INT4 DequantizeLinear without block_size (per tensor or per channel); TensorRT "
            f"needs per-block INT4 scales, blocks of {INT4_BLOCK_SIZES}. Use int4_sym_group128."
        ))]  # fmt: skip
    issues = []
    if block not in INT4_BLOCK_SIZES:
        issues.append(LintIssue(name, "int4-block-size", ERROR, (
            f"block_size {block}; TensorRT supports INT4 blocks of {INT4_BLOCK_SIZES} only. Use "
            "int4_sym_group64 or int4_sym_group128."
        )))  # fmt: skip
    shape = np.asarray(g.values[node.input[0]]).shape
    axis = _attr(node, "axis", 1) % len(shape)
    if shape[axis] % block:
        issues.append(LintIssue(name, "block-size", ERROR, (
            f"block_size {block} does not divide axis {axis} of the weight of shape {shape}; "
            "TensorRT needs whole blocks. Pick a group size that divides the reduction size."
        )))  # fmt: skip
    for consumer, _ in g.consumers[node.output[0]]:
        expected = len(shape) - 2 if consumer.op_type == "MatMul" else (
            1 if _attr(consumer, "transB", 0) else 0)  # fmt: skip
        if axis != expected:
            issues.append(LintIssue(name, "int4-block-axis", ERROR, (
                f"INT4 blocks run along axis {axis} of the {consumer.op_type} weight of shape "
                f"{shape}; TensorRT's weight-only GEMM blocks the reduction axis, axis {expected} "
                "here. Block along the reduction axis (the int4_sym_group schemes do)."
            )))  # fmt: skip
    return issues


def _reads_dequantized(g: _Graph, tensor: str) -> bool:
    """Whether ``tensor`` comes from a DequantizeLinear through ops TensorRT moves Q/DQ across."""
    while True:
        producer = g.producer.get(tensor)
        if producer is None:
            return False
        if producer.op_type == "DequantizeLinear":
            return True
        if not is_transparent(producer, g.values):
            return False
        tensor = producer.input[0]


def _requantized(g: _Graph, tensor: str) -> bool:
    """Whether a QuantizeLinear reads ``tensor`` through ops TensorRT fuses into the epilogue."""
    pending, seen = [tensor], set()
    while pending:
        for consumer, _ in g.consumers.get(pending.pop(), []):
            if consumer.op_type == "QuantizeLinear":
                return True
            if consumer.output[0] in seen:
                continue
            if consumer.op_type in _EPILOGUE_OPS or is_transparent(consumer, g.values):
                seen.add(consumer.output[0])
                pending.append(consumer.output[0])
    return False


def _check_placement(g: _Graph, node: onnx.NodeProto) -> list[LintIssue]:
    """Q/DQ around an INT8 GEMM or convolution: INT8 in (needed for INT8 and sparse INT8
    kernels) and INT8 out (TensorRT fuses the next QuantizeLinear into the kernel)."""
    weight_dq = g.producer.get(node.input[1]) if len(node.input) > 1 else None
    if (
        weight_dq is None
        or weight_dq.op_type != "DequantizeLinear"
        or g.qtype(weight_dq) != TensorProto.INT8
        or not g.on_weight(weight_dq)
    ):
        return []
    name, issues = _name(node), []
    if not _reads_dequantized(g, node.input[0]):
        weight = g.weight_values(node.input[1])
        sparse = weight is not None and _is_2_4(node, weight)
        issues.append(LintIssue(name, "int8-input-float", WARNING, (
            f"the {node.op_type} has an INT8 weight but its input {node.input[0]!r} is float "
            "(no DequantizeLinear before it), so TensorRT cannot run an INT8 kernel"
            + (" nor a sparse INT8 kernel for its 2:4 weights" if sparse else "")
            + ": it computes in float or as a weight-only GEMM. Quantize its input "
            "(int8_sym_per_tensor)."
        )))  # fmt: skip
    if not _requantized(g, node.output[0]):
        issues.append(LintIssue(name, "output-float", NOTE, (
            f"the {node.op_type} output {node.output[0]!r} is never re-quantized, so the kernel "
            "writes float; TensorRT fuses a following QuantizeLinear into the kernel (INT8 out) "
            "only when the consumer is quantized. Expected for the network's last layer; "
            "elsewhere quantize the consumer to keep the tensor in INT8."
        )))  # fmt: skip
    return issues


def _is_2_4(node: onnx.NodeProto, weight: np.ndarray) -> bool:
    rows = np.asarray(weight).astype(np.float32)  # INT4 and INT8 codes are zero where w is
    if node.op_type != "Conv":
        if rows.ndim != 2:
            return False
        if _out_axis(node, 2) == 1:
            rows = rows.T  # to [out, K], the layout whose rows is_2_4_sparse reads
    return is_2_4_sparse(torch.from_numpy(np.ascontiguousarray(rows)))


def sparse_weight_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the Conv/Gemm/MatMul nodes whose constant weight has the 2:4 pattern.

    Example:
        >>> sparse_weight_nodes(onnx.load("model.onnx"))
        {'/classifier/classifier.1/Gemm'}
    """
    g = _Graph(model)
    names = set()
    for node in g.nodes:
        if node.op_type in _GEMM_OPS and len(node.input) > 1:
            weight = g.weight_values(node.input[1])
            if weight is not None and _is_2_4(node, weight):
                names.add(_name(node))
    return names


def errors_of(issues: list[LintIssue]) -> list[LintIssue]:
    """The issues of severity ``error``."""
    return [i for i in issues if i.severity == ERROR]
