"""Inventory: every compressible layer of an fp32 ONNX graph, with shapes and work per inference.

Takes the exported fp32 graph (from a torch model or a user's .onnx file) and the batch size to plan
for; returns one :class:`Layer` per Conv, Gemm and MatMul node and per embedding lookup (a Gather
from a constant 2-D table), with its kind, weight shape, MACs and bytes moved at that batch size,
the shape key its measured timings are filed under, and whether it can be compressed (its weight is
a constant).
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
CONV_KINDS = ("conv2d", "conv2d_depthwise", "conv2d_grouped")
INDEX_BYTES = 8  # torch exports embedding indices as int64


@dataclasses.dataclass(frozen=True)
class Layer:
    """One compressible layer of the graph, with its shapes and work at the planned batch size.

    Kinds: ``linear`` (Gemm, or MatMul with a constant 2-D weight), ``conv2d``,
    ``conv2d_depthwise``, ``conv2d_grouped``, ``embedding`` (Gather of rows from a constant 2-D
    table on axis 0: no MACs, the whole table is stored, only the gathered rows are read) and
    ``matmul`` (activation x activation, or a weight of unusual rank: never compressed).
    ``in_channels``/``out_channels`` are K/N for linear layers, the convolution's channels, and
    vocabulary/row length for embeddings.
    """

    name: str  # readable, module-like ("features.0", "encoder.layer.0.attention.self.query")
    node: str  # ONNX node name
    op_type: str
    kind: str
    weight: str | None  # initializer name of the constant weight, None for activation x activation
    weight_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    macs: int
    weight_bytes_fp32: int
    activation_bytes_fp32: int  # input + output activations (embedding: indices + gathered rows)
    eligible: bool
    why_not: str = ""
    input_shape: tuple[int, ...] = ()  # the activation input (embedding: the indices)
    in_channels: int = 0
    out_channels: int = 0
    strides: tuple[int, ...] = ()  # convolutions only
    groups: int = 1  # convolutions only

    @property
    def rows(self) -> int:
        """Rows the layer computes at the planned batch size: ``prod(output_shape[:-1])`` for
        linear layers and embeddings (tokens gathered), 0 where the output shape is unknown."""
        return math.prod(self.output_shape[:-1]) if self.output_shape else 0

    @property
    def reduction_size(self) -> int:
        """Length of the dot products a weight row feeds: K for linear layers,
        ``in_channels / groups * kh * kw`` for convolutions, the row length for embeddings (the
        axis INT4 groups run along; no dot product). 2:4 sparsity needs it to be a multiple of 4.

        Example:
            >>> [la.reduction_size for la in layers]  # fmnist-cnn
            [9, 288, 3136, 128]
        """
        if self.kind in CONV_KINDS:
            return math.prod(self.weight_shape[1:])
        return self.in_channels if self.kind == "linear" else self.out_channels

    @property
    def shape_key(self) -> tuple[int, ...]:
        """The shape a measured timing of this layer is filed under in a hardware profile.

        - linear: ``(M, K, N)``: M rows at the planned batch size (``prod(output_shape[:-1])``),
          K the reduction size, N the output features;
        - conv kinds: ``(batch, in_channels, H_in, W_in, out_channels, kh, kw, stride_h,
          stride_w, groups)``;
        - embedding: ``(rows_gathered, vocab, hidden)``;
        - matmul: the output shape (no measured entries are kept for it).

        Unknown dimensions are 0, which matches no measured entry.

        Example:
            >>> layer.shape_key  # MiniLM query projection at batch 1, 64 tokens
            (64, 384, 384)
        """
        if self.kind == "linear":
            return (self.rows, self.in_channels, self.out_channels)
        if self.kind in CONV_KINDS and len(self.weight_shape) == 4:
            n, _, h, w = self.input_shape if len(self.input_shape) == 4 else (0, 0, 0, 0)
            kh, kw = self.weight_shape[2:4]
            sh, sw = self.strides or (1, 1)
            return (n, self.in_channels, h, w, self.out_channels, kh, kw, sh, sw, self.groups)
        if self.kind == "embedding":
            return (self.rows, self.in_channels, self.out_channels)
        return self.output_shape


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
    return _symbolic_shapes(fixed) or shape_inference.infer_shapes(fixed)


def _symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """ONNX Runtime's symbolic shape inference of ``model``, or None where it cannot run.

    ONNX's own inference stops at shapes computed at run time (Shape -> Gather -> Reshape, as
    torch exports transformers), which left every MiniLM linear without an output shape; ONNX
    Runtime's symbolic inference propagates those values. Its public ``infer_shapes`` saves the
    model into the working directory and raises when a single tensor stays unknown, so its steps
    are run here directly, keeping whatever it inferred; any failure falls back to ONNX's inference.
    """
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference  # core dependency

        inference = SymbolicShapeInference(2**31 - 1, True, False, 0)
        inference._preprocess(model)
        while inference.run_:
            inference._infer_impl()
        inference._update_output_from_vi()
        return inference.out_mp_
    except Exception:  # noqa: BLE001 - an internal API of a tool script; any failure falls back
        return None


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
    """Inventory the compute layers and embedding lookups of ``model`` with its symbolic dims
    fixed to ``dims``.

    Args:
        model: an fp32 ONNX graph.
        dims: values for symbolic dimensions, e.g. ``{"batch": 1, "seq": 64}``.

    Returns:
        One :class:`Layer` per Conv, Gemm and MatMul node and per Gather from a constant 2-D
        table, in graph order.

    Example:
        >>> [(la.name, la.kind) for la in build_inventory(fp32, {"batch": 1})][:2]
        [('features.0', 'conv2d'), ('features.4', 'conv2d')]
    """
    inferred = _with_fixed_inputs(model, dims)
    shapes = _shapes(inferred)
    inits = {i.name: i for i in model.graph.initializer}
    layers = []
    seen: dict[str, int] = {}
    for index, node in enumerate(model.graph.node):
        embedding = _is_embedding(node, inits)
        if node.op_type not in COMPUTE_OPS and not embedding:
            continue
        name = readable_name(node, index)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}_{seen[name] - 1}"
        layers.append(
            _embedding(node, name, inits, shapes)
            if embedding
            else _layer(node, name, inits, shapes)
        )
    return layers


def _is_embedding(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """A Gather of rows (axis 0) from a constant 2-D table: a word/position embedding."""
    if node.op_type != "Gather" or not node.input or node.input[0] not in inits:
        return False
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    return len(inits[node.input[0]].dims) == 2 and axis in (0, -2)


def _embedding(node, name, inits, shapes) -> Layer:
    vocab, hidden = (int(d) for d in inits[node.input[0]].dims)
    indices = shapes.get(node.input[1], ())
    out_shape = shapes.get(node.output[0], ())
    gathered = math.prod(indices) if indices else 0
    return Layer(
        name,
        node.name,
        node.op_type,
        "embedding",
        node.input[0],
        (vocab, hidden),
        out_shape,
        0,
        4 * vocab * hidden,
        (INDEX_BYTES + 4 * hidden) * gathered,
        True,
        input_shape=indices,
        in_channels=vocab,
        out_channels=hidden,
    )


def _layer(node, name, inits, shapes) -> Layer:
    out_shape = shapes.get(node.output[0], ())
    weight_name = node.input[1] if len(node.input) > 1 else ""
    weight = inits.get(weight_name)
    in_shape = shapes.get(node.input[0], ())
    act_bytes = 4 * (int(np.prod(in_shape)) if in_shape else 0) + 4 * int(
        np.prod(out_shape or (0,))
    )
    if weight is None:
        other = shapes.get(weight_name, ())
        k = other[-2] if len(other) >= 2 else 0
        macs = int(np.prod(out_shape)) * k if out_shape else 0
        return Layer(
            name,
            node.name,
            node.op_type,
            "matmul",
            None,
            (),
            out_shape,
            macs,
            0,
            act_bytes,
            eligible=False,
            why_not="activation x activation product (attention): no constant weight",
            input_shape=in_shape,
        )
    w_shape = tuple(int(d) for d in weight.dims)
    w_bytes = 4 * int(np.prod(w_shape))
    if node.op_type == "Conv":
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        strides = tuple(
            next(
                (list(a.ints) for a in node.attribute if a.name == "strides"),
                [1] * max(len(w_shape) - 2, 0),
            )
        )
        per_output = int(np.prod(w_shape[1:]))
        macs = int(np.prod(out_shape)) * per_output if out_shape else 0
        if group == 1:
            kind = "conv2d"
        elif group == w_shape[0] and w_shape[1] == 1:
            kind = "conv2d_depthwise"
        else:
            kind = "conv2d_grouped"
        eligible, why = len(w_shape) == 4, "" if len(w_shape) == 4 else "only 2-D convolutions"
        return Layer(
            name,
            node.name,
            node.op_type,
            kind,
            weight_name,
            w_shape,
            out_shape,
            macs,
            w_bytes,
            act_bytes,
            eligible,
            why,
            input_shape=in_shape,
            in_channels=w_shape[1] * group,
            out_channels=w_shape[0],
            strides=strides,
            groups=group,
        )
    if len(w_shape) != 2:
        return Layer(
            name,
            node.name,
            node.op_type,
            "matmul",
            weight_name,
            w_shape,
            out_shape,
            0,
            w_bytes,
            act_bytes,
            False,
            f"weight of rank {len(w_shape)}, expected 2",
            input_shape=in_shape,
        )
    k, n = w_shape
    if node.op_type == "Gemm" and next((a.i for a in node.attribute if a.name == "transB"), 0):
        n, k = w_shape
    macs = int(np.prod(out_shape)) * k if out_shape else 0
    return Layer(
        name,
        node.name,
        node.op_type,
        "linear",
        weight_name,
        w_shape,
        out_shape,
        macs,
        w_bytes,
        act_bytes,
        True,
        input_shape=in_shape,
        in_channels=k,
        out_channels=n,
    )


def weight_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise KeyError(name)
