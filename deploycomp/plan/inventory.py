"""Inventory: every compressible layer of an fp32 ONNX graph, with shapes and work per inference.

Takes the exported fp32 graph (from a torch model or a user's .onnx file) and the batch size to plan
for; returns one :class:`Layer` per Conv, Gemm and MatMul node, with its kind, weight shape, MACs
and bytes moved at that batch size, and whether it can be quantized (its weight is a constant).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

COMPUTE_OPS = ("Conv", "Gemm", "MatMul")


@dataclasses.dataclass(frozen=True)
class Layer:
    name: str  # readable, module-like ("features.0", "encoder.layer.0.attention.self.query")
    node: str  # ONNX node name
    op_type: str
    kind: str
    weight: str | None  # initializer name of the constant weight, None for activation x activation
    weight_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    macs: int
    weight_bytes_fp32: int
    activation_bytes_fp32: int  # input + output activations
    eligible: bool
    why_not: str = ""


def readable_name(node: onnx.NodeProto, index: int) -> str:
    """'/encoder/layer.0/attention/self/query/MatMul' -> 'encoder.layer.0.attention.self.query'."""
    parts = [p for p in node.name.split("/") if p]
    suffix = ""
    if parts and re.fullmatch(rf"{node.op_type}(_\d+)?", parts[-1]):
        suffix = parts.pop()[len(node.op_type) :]
    name = ""
    for part in parts:  # scopes may repeat their parent's path: features/features.0
        name = part if not name or part.startswith(name + ".") else f"{name}.{part}"
    if suffix:
        name = f"{name}.{node.op_type.lower()}{suffix}" if name else ""
    return name or f"{node.op_type.lower()}_{index}"


def _with_fixed_inputs(model: onnx.ModelProto, dims: dict[str, int]) -> onnx.ModelProto:
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for inp in fixed.graph.input:
        for d in inp.type.tensor_type.shape.dim:
            if d.dim_param:
                value = dims.get(d.dim_param, 1)
                d.Clear()
                d.dim_value = value
    return shape_inference.infer_shapes(fixed)


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    out = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            out[vi.name] = tuple(d.dim_value for d in dims)
    for init in model.graph.initializer:
        out[init.name] = tuple(init.dims)
    return out


def build_inventory(model: onnx.ModelProto, dims: dict[str, int]) -> list[Layer]:
    """Inventory the compute layers of ``model`` with its symbolic dims fixed to ``dims``.

    Args:
        model: an fp32 ONNX graph.
        dims: values for symbolic dimensions, e.g. ``{"batch": 1, "seq": 64}``.
    """
    inferred = _with_fixed_inputs(model, dims)
    shapes = _shapes(inferred)
    inits = {i.name: i for i in model.graph.initializer}
    layers = []
    seen: dict[str, int] = {}
    for index, node in enumerate(model.graph.node):
        if node.op_type not in COMPUTE_OPS:
            continue
        name = readable_name(node, index)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}_{seen[name] - 1}"
        layers.append(_layer(node, name, inits, shapes))
    return layers


def _layer(node, name, inits, shapes) -> Layer:
    out_shape = shapes.get(node.output[0], ())
    weight_name = node.input[1] if len(node.input) > 1 else ""
    weight = inits.get(weight_name)
    in_shape = shapes.get(node.input[0], ())
    act_bytes = 4 * (int(np.prod(in_shape)) if in_shape else 0) + 4 * int(np.prod(out_shape or (0,)))
    if weight is None:
        other = shapes.get(weight_name, ())
        k = other[-2] if len(other) >= 2 else 0
        macs = int(np.prod(out_shape)) * k if out_shape else 0
        return Layer(name, node.name, node.op_type, "matmul", None, (), out_shape, macs, 0,
                     act_bytes, eligible=False,
                     why_not="activation x activation product (attention): no constant weight")
    w_shape = tuple(int(d) for d in weight.dims)
    w_bytes = 4 * int(np.prod(w_shape))
    if node.op_type == "Conv":
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        per_output = int(np.prod(w_shape[1:]))
        macs = int(np.prod(out_shape)) * per_output if out_shape else 0
        if group == 1:
            kind = "conv2d"
        elif group == w_shape[0] and w_shape[1] == 1:
            kind = "conv2d_depthwise"
        else:
            kind = "conv2d_grouped"
        eligible, why = len(w_shape) == 4, "" if len(w_shape) == 4 else "only 2-D convolutions"
        return Layer(name, node.name, node.op_type, kind, weight_name, w_shape, out_shape, macs,
                     w_bytes, act_bytes, eligible, why)
    if len(w_shape) != 2:
        return Layer(name, node.name, node.op_type, "matmul", weight_name, w_shape, out_shape, 0,
                     w_bytes, act_bytes, False, f"weight of rank {len(w_shape)}, expected 2")
    k = w_shape[0]
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        k = w_shape[1] if trans_b else w_shape[0]
    macs = int(np.prod(out_shape)) * k if out_shape else 0
    return Layer(name, node.name, node.op_type, "linear", weight_name, w_shape, out_shape, macs,
                 w_bytes, act_bytes, True)


def weight_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise KeyError(name)
