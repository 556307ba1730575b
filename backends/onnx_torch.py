"""A QDQ ONNX model lowered to a PyTorch program whose GEMMs run INT8, 2:4 and INT4 kernels.

``lower(model, device, float_dtype)`` returns a :class:`Program`: every MatMul/Gemm with a
constant weight becomes one :class:`LinearOp` (the weight's DequantizeLinear and the input's
QuantizeLinear/DequantizeLinear pair folded into it, the bias Add fused), every other node one
call of a PyTorch function from ``OPS``. ``Program.specialize(inputs)`` runs the graph once on
concrete inputs: whatever depends only on constants and input *shapes* (shape arithmetic,
dequantized constant weights, masks) is computed there once, in fp32 on the CPU, and what is left
is a list of device steps, a :class:`Specialized` program that ``torch.compile`` and CUDA graphs
take as it is (no Python-side shape logic at run time).

Kernel per linear (chosen in :class:`LinearOp`, see ``kernels``):

=====================================  ==========================================================
weight                                 kernel
=====================================  ==========================================================
int8 per channel, int8 input Q/DQ      ``int8``: torch._int_mm; ``2:4 int8``: cuSPARSELt
int8 per channel, float input          ``float``: dequantized once (no int8 kernel takes floats)
int4 blocked (weight-only)             ``int4``: the Triton dequantize-GEMM; ``float`` fallback
float                                  ``float``; ``2:4 float``: cuSPARSELt if 2:4 sparse
=====================================  ==========================================================

A 2:4 kernel is only a *candidate*: the backend times it against the dense one at build and keeps
the faster (``LinearOp.kernel``). Activations run in ``float_dtype`` (fp16 on a GPU), Q/DQ math in
fp32, so the program computes the QDQ graph's function up to fp16 rounding. Running on the CPU in
fp32 with dense kernels reproduces ONNX Runtime's results; the tests check that.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from deploycomp.errors import BackendError
from deploycomp.kernels import gemm
from deploycomp.kernels.sparsity import is_2_4_sparse

_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}
_QRANGE = {torch.int8: (-128, 127), torch.uint8: (0, 255)}


def _array(tensor: onnx.TensorProto) -> torch.Tensor:
    """An initializer as a CPU tensor (INT4 unpacked to int8 values)."""
    array = numpy_helper.to_array(tensor)
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        array = array.astype(np.int8)
    return torch.from_numpy(np.array(array))


# ------------------------------------------------------------------------------------------
# Generic operators. Each takes (inputs, attributes, ctx) and returns a list of outputs; inputs
# are tensors (or None for an omitted optional input). ``ctx.float_dtype`` is the dtype float
# values run in (fp32 for constants folded on the CPU).


@dataclasses.dataclass(frozen=True)
class Ctx:
    float_dtype: torch.dtype


def _ints(t: torch.Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _binary(fn: Callable) -> Callable:
    return lambda x, a, c: [fn(x[0], x[1])]


def _unary(fn: Callable) -> Callable:
    return lambda x, a, c: [fn(x[0])]


def _cast(x, a, c):
    to = _ONNX_DTYPES.get(a["to"])
    if to is None:
        raise BackendError(f"Cast to ONNX type {a['to']} is not supported by the torch backend.")
    if to.is_floating_point:
        to = c.float_dtype
    return [x[0].to(to)]


def _reshape(x, a, c):
    data, shape = x[0], _ints(x[1])
    if not a.get("allowzero", 0):
        shape = [data.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [data.reshape(shape)]


def _axes(x, a, index: int = 1) -> list[int]:
    if len(x) > index and x[index] is not None:
        return _ints(x[index])
    return list(a.get("axes", []))


def _unsqueeze(x, a, c):
    out = x[0]
    rank = out.dim() + len(_axes(x, a))
    for axis in sorted(d % rank for d in _axes(x, a)):
        out = out.unsqueeze(axis)
    return [out]


def _squeeze(x, a, c):
    axes = _axes(x, a)
    if not axes:
        return [x[0].squeeze()]
    return [x[0].squeeze(tuple(d % x[0].dim() for d in axes))]


def _slice(x, a, c):
    data = x[0]
    starts, ends = _ints(x[1]), _ints(x[2])
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * data.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step < 1:
            raise BackendError(f"Slice with step {step} is not supported by the torch backend.")
        size = data.shape[axis]
        start = max(0, min(size, start + size if start < 0 else start))
        end = max(0, min(size, end + size if end < 0 else end))
        index[axis % data.dim()] = slice(start, end, step)
    return [data[tuple(index)]]


def _gather(x, a, c):
    data, idx = x[0], x[1].to(torch.int64)
    axis = a.get("axis", 0) % data.dim()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = data.index_select(axis, idx.reshape(-1))
    return [out.reshape((*data.shape[:axis], *idx.shape, *data.shape[axis + 1 :]))]


def _concat(x, a, c):
    parts = [t for t in x if t is not None and t.numel()] or [x[0]]
    return [torch.cat(parts, dim=a["axis"])]


def _softmax(x, a, c):
    return [torch.softmax(x[0], dim=a.get("axis", -1))]


def _transpose(x, a, c):
    perm = a.get("perm") or list(reversed(range(x[0].dim())))
    return [x[0].permute(*perm)]


def _reduce(fn: Callable) -> Callable:
    def op(x, a, c):
        axes = _axes(x, a)
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return [x[0]]
            axes = list(range(x[0].dim()))
        return [fn(x[0], dim=tuple(axes), keepdim=keep)]

    return op


def _reduce_max(t, dim, keepdim):
    return torch.amax(t, dim=dim, keepdim=keepdim)


def _gemm(x, a, c):
    left, right = x[0], x[1]
    if a.get("transA", 0):
        left = left.t()
    if a.get("transB", 0):
        right = right.t()
    out = a.get("alpha", 1.0) * (left @ right)
    if len(x) > 2 and x[2] is not None:
        out = out + a.get("beta", 1.0) * x[2]
    return [out]


def _conv(x, a, c):
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        raise BackendError("Conv with auto_pad is not supported by the torch backend.")
    weight = x[1]
    dims = weight.dim() - 2
    pads = list(a.get("pads", [0] * 2 * dims))
    data = x[0]
    if pads[:dims] != pads[dims:]:
        pad = []
        for i in reversed(range(dims)):
            pad += [pads[i], pads[i + dims]]
        data, pads = F.pad(data, pad), [0] * 2 * dims
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    bias = x[2] if len(x) > 2 else None
    return [
        conv(
            data,
            weight,
            bias,
            stride=a.get("strides", [1] * dims),
            padding=pads[:dims],
            dilation=a.get("dilations", [1] * dims),
            groups=a.get("group", 1),
        )
    ]


def _pool(kind: str) -> Callable:
    def op(x, a, c):
        kernel = a["kernel_shape"]
        dims = len(kernel)
        pads = list(a.get("pads", [0] * 2 * dims))
        if pads[:dims] != pads[dims:]:
            raise BackendError(f"{kind} with asymmetric pads {pads} is not supported.")
        kwargs = {
            "kernel_size": kernel,
            "stride": a.get("strides", [1] * dims),
            "padding": pads[:dims],
            "ceil_mode": bool(a.get("ceil_mode", 0)),
        }
        if kind == "MaxPool":
            return [F.max_pool2d(x[0], dilation=a.get("dilations", [1] * dims), **kwargs)]
        return [F.avg_pool2d(x[0], count_include_pad=bool(a.get("count_include_pad", 0)), **kwargs)]

    return op


def _batch_norm(x, a, c):
    data, scale, bias, mean, var = x[:5]
    return [F.batch_norm(data, mean, var, scale, bias, False, 0.0, a.get("epsilon", 1e-5))]


def _layer_norm(x, a, c):
    data = x[0]
    axis = a.get("axis", -1) % data.dim()
    shape = data.shape[axis:]
    bias = x[2] if len(x) > 2 else None
    return [F.layer_norm(data, shape, x[1], bias, a.get("epsilon", 1e-5))]


def _clip(x, a, c):
    low = x[1] if len(x) > 1 and x[1] is not None else a.get("min")
    high = x[2] if len(x) > 2 and x[2] is not None else a.get("max")
    return [torch.clamp(x[0], low, high)]


def _qparams(x, a, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point broadcast against ``ref`` (per tensor, per axis or blocked)."""
    scale = x[1].float()
    zero = x[2].float() if len(x) > 2 and x[2] is not None else torch.zeros_like(scale)
    if scale.dim() == 0:
        return scale, zero
    axis = a.get("axis", 1) % ref.dim()
    block = a.get("block_size", 0)
    if block:
        scale = scale.repeat_interleave(block, dim=axis)
        zero = zero.repeat_interleave(block, dim=axis)
        return scale, zero
    shape = [1] * ref.dim()
    shape[axis] = -1
    return scale.reshape(shape), zero.reshape(shape)


def _quantize(x, a, c):
    dtype = x[2].dtype if len(x) > 2 and x[2] is not None else torch.uint8
    if dtype not in _QRANGE:
        raise BackendError(f"QuantizeLinear to {dtype} is not supported by the torch backend.")
    scale, zero = _qparams(x, a, x[0])
    low, high = _QRANGE[dtype]
    return [(torch.round(x[0].float() / scale) + zero).clamp(low, high).to(dtype)]


def _dequantize(x, a, c):
    scale, zero = _qparams(x, a, x[0])
    return [((x[0].float() - zero) * scale).to(c.float_dtype)]


def _constant(x, a, c):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in a:
            value = a[key]
            if isinstance(value, onnx.TensorProto):
                return [_array(value)]
            return [torch.tensor(value)]
    raise BackendError(f"Constant with attributes {sorted(a)} is not supported.")


def _constant_of_shape(x, a, c):
    value = _array(a["value"]) if "value" in a else torch.zeros(1, dtype=torch.float32)
    return [torch.full(_ints(x[0]), value.item(), dtype=value.dtype)]


def _expand(x, a, c):
    shape = _ints(x[1])
    target = torch.broadcast_shapes(tuple(x[0].shape), tuple(shape))
    return [x[0].expand(target)]


def _split(x, a, c):
    axis = a.get("axis", 0)
    sizes = _ints(x[1]) if len(x) > 1 and x[1] is not None else a.get("split")
    if not sizes:
        parts = a["num_outputs"]
        sizes = [math.ceil(x[0].shape[axis] / parts)] * parts
        sizes[-1] = x[0].shape[axis] - sum(sizes[:-1])
    return list(torch.split(x[0], sizes, dim=axis))


def _where(x, a, c):
    return [torch.where(x[0].bool(), x[1], x[2])]


def _range(x, a, c):
    return [torch.arange(x[0].item(), x[1].item(), x[2].item(), dtype=x[0].dtype)]


def _flatten(x, a, c):
    axis = a.get("axis", 1)
    axis = axis + x[0].dim() if axis < 0 else axis  # in [0, rank]: rank flattens to [n, 1]
    return [x[0].reshape(math.prod(x[0].shape[:axis]), math.prod(x[0].shape[axis:]))]


def _gelu(x, a, c):
    approximate = a.get("approximate", "none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    return [F.gelu(x[0], approximate=approximate)]


OPS: dict[str, Callable] = {
    "Identity": _unary(lambda t: t),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(lambda p, q: torch.div(p, q, rounding_mode="trunc")
                   if not p.is_floating_point() else p / q),
    "Pow": _binary(torch.pow),
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "LessOrEqual": _binary(torch.le),
    "Xor": _binary(torch.logical_xor),
    "Mod": _binary(torch.remainder),
    "Sin": _unary(torch.sin),
    "Cos": _unary(torch.cos),
    "Tile": lambda x, a, c: [x[0].repeat(*_ints(x[1]))],
    "Trilu": lambda x, a, c: [
        (torch.triu if a.get("upper", 1) else torch.tril)(
            x[0], int(x[1]) if len(x) > 1 and x[1] is not None else 0
        )
    ],
    "CumSum": lambda x, a, c: [torch.cumsum(x[0], dim=int(x[1]))],
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Max": lambda x, a, c: [torch.stack(torch.broadcast_tensors(*x)).amax(0)],
    "Min": lambda x, a, c: [torch.stack(torch.broadcast_tensors(*x)).amin(0)],
    "MatMul": _binary(torch.matmul),
    "Not": _unary(torch.logical_not),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Erf": _unary(torch.erf),
    "Tanh": _unary(torch.tanh),
    "Sigmoid": _unary(torch.sigmoid),
    "Relu": _unary(torch.relu),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "LeakyRelu": lambda x, a, c: [F.leaky_relu(x[0], a.get("alpha", 0.01))],
    "HardSigmoid": lambda x, a, c: [
        torch.clamp(a.get("alpha", 0.2) * x[0] + a.get("beta", 0.5), 0, 1)
    ],
    "HardSwish": _unary(F.hardswish),
    "Gelu": _gelu,
    "Clip": _clip,
    "Softmax": _softmax,
    "LogSoftmax": lambda x, a, c: [torch.log_softmax(x[0], dim=a.get("axis", -1))],
    "Cast": _cast,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": _transpose,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Slice": _slice,
    "Gather": _gather,
    "Concat": _concat,
    "Split": _split,
    "Expand": _expand,
    "Where": _where,
    "Range": _range,
    "Shape": lambda x, a, c: [torch.tensor(x[0].shape[a.get("start", 0) : a.get("end")])],
    "Size": lambda x, a, c: [torch.tensor(x[0].numel())],
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(_reduce_max),
    "ReduceMin": _reduce(lambda t, dim, keepdim: torch.amin(t, dim=dim, keepdim=keepdim)),
    "ReduceL2": _reduce(lambda t, dim, keepdim: torch.linalg.vector_norm(t, 2, dim, keepdim)),
    "ReduceSumSquare": _reduce(lambda t, dim, keepdim: (t * t).sum(dim=dim, keepdim=keepdim)),
    "Gemm": _gemm,
    "Conv": _conv,
    "MaxPool": _pool("MaxPool"),
    "AveragePool": _pool("AveragePool"),
    "GlobalAveragePool": lambda x, a, c: [x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True)],
    "BatchNormalization": _batch_norm,
    "LayerNormalization": _layer_norm,
    "QuantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
}  # fmt: skip
# Ops whose output depends on the input's shape only, never its values.
_SHAPE_ONLY = {"Shape", "Size"}


# ------------------------------------------------------------------------------------------
# Fused linear layers.

KERNELS = ("float", "2:4 float", "int8", "2:4 int8", "int4")  # what LinearOp.kernel can be


class LinearOp(torch.nn.Module):
    """One MatMul/Gemm with a constant weight, its input Q/DQ and bias folded in.

    Holds the weight in every form a kernel it may run needs; ``kernel`` picks one (set by the
    backend after timing the candidates, see ``candidates``).
    """

    def __init__(
        self,
        name: str,
        weight: torch.Tensor,  # dequantized float weight [N, K] (what every fallback computes)
        *,
        int8: tuple[torch.Tensor, torch.Tensor] | None = None,  # (wq [N, K], scale [N])
        int4: tuple[torch.Tensor, torch.Tensor, int] | None = None,  # (q [N, K], scales, group)
        act: tuple[float, int, torch.dtype] | None = None,  # input Q/DQ: scale, zero, dtype
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", None if bias is None else bias.float())
        self.act = act
        self.int4_group = int4[2] if int4 else 0
        self.sparse_weights = is_2_4_sparse(weight) if weight.shape[1] % 4 == 0 else False
        # W8A8 runs on int8 kernels when the input is int8 with zero point 0; a uint8 input
        # (zero point 0..255) does not fit an int8 operand, so it runs fake-quantized in float.
        int8_input = act is not None and act[2] == torch.int8 and act[1] == 0
        self.register_buffer("wq", int8[0].to(torch.int8) if int8 and int8_input else None)
        self.register_buffer("w_scale", int8[1].float() if int8 and int8_input else None)
        self.register_buffer("q4", int4[0] if int4 else None)
        self.register_buffer("s4", int4[1] if int4 else None)
        self.register_buffer("compressed", None)
        self.kernel = self.candidates()[0]

    @property
    def precision(self) -> str:
        return {"int8": "int8", "2:4 int8": "int8", "int4": "int4 w-only"}.get(self.kernel, "float")

    def candidates(self) -> list[str]:
        """Kernels that compute this layer, the default (dense) first."""
        if self.wq is not None:
            dense = ["int8"]
        elif self.q4 is not None:
            dense = ["int4", "float"] if _triton_int4_runs(self.weight) else ["float"]
        else:
            dense = ["float"]
        if not (self.sparse_weights and gemm.sparse_kernels_available() and self.weight.is_cuda):
            return dense
        return dense + ["2:4 int8" if dense[0] == "int8" else "2:4 float"]

    def use(self, kernel: str, float_dtype: torch.dtype) -> None:
        """Run ``kernel`` from now on (one of ``candidates()``), preparing its weights."""
        if kernel not in self.candidates():
            raise BackendError(
                f"kernel {kernel!r} cannot run layer {self.name!r}; it can run {self.candidates()}."
            )
        self.kernel = kernel
        self.float_dtype = float_dtype
        self.compressed = None
        if kernel == "2:4 int8":
            self.compressed = gemm.compress_2_4_weight(self.wq)
        elif kernel == "2:4 float":
            self.compressed = gemm.compress_2_4_weight(self.weight.to(float_dtype))
        elif kernel == "int4":
            from deploycomp.kernels.int4 import pack_int4

            self.packed4 = pack_int4(self.q4)
            self.scales4 = self.s4.to(float_dtype)
        self.weight_f = self.weight.to(float_dtype)
        self.bias_f = None if self.bias is None else self.bias.to(float_dtype)
        if self.w_scale is not None:
            self.alpha = (self.w_scale * self.act[0]).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        kernel, dtype = self.kernel, self.float_dtype
        if kernel in ("int8", "2:4 int8"):
            xq = gemm.quantize_activation(x2, self.act[0])
            if kernel == "int8":
                y = gemm.int8_gemm(xq, self.wq, self.alpha, dtype)
            else:
                y = gemm.sparse_int8_gemm(xq, self.compressed, self.alpha, dtype)
        else:
            if self.act is not None:  # fake-quantized input (uint8 or weight-only float GEMM)
                scale, zero, qdtype = self.act
                low, high = _QRANGE[qdtype]
                q = (torch.round(x2.float() / scale) + zero).clamp(low, high)
                x2 = ((q - zero) * scale).to(dtype)
            if kernel == "int4":
                from deploycomp.kernels.triton_int4 import int4_matmul

                y = int4_matmul(x2.to(dtype), self.packed4, self.scales4, self.int4_group)
            elif kernel == "2:4 float":
                y = gemm.sparse_float_gemm(x2.to(dtype), self.compressed)
            else:
                y = x2.to(dtype) @ self.weight_f.t()
        if self.bias_f is not None:
            y = y + self.bias_f
        return y.reshape(*lead, self.out_features)


def _triton_int4_runs(weight: torch.Tensor) -> bool:
    """The Triton INT4 GEMM runs where the weight lives on a CUDA GPU and Triton imports."""
    if not weight.is_cuda:
        return False
    try:
        import triton  # noqa: F401  (optional: ships with PyTorch's CUDA builds)
    except ImportError:
        return False
    return True


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@dataclasses.dataclass
class _Graph:
    model: onnx.ModelProto
    inits: dict[str, onnx.TensorProto]
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> _Graph:
        producer, consumers = {}, {}
        for node in model.graph.node:
            for out in node.output:
                producer[out] = node
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        return cls(model, _initializers(model), producer, consumers)

    def const(self, name: str) -> torch.Tensor | None:
        """An initializer or Constant node output, else None."""
        if name in self.inits:
            return _array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return _constant([], _attrs(node), Ctx(torch.float32))[0]
        if node is not None and node.op_type == "DequantizeLinear":  # e.g. an int32 bias
            args = [self.const(n) if n else None for n in node.input]
            if all(a is not None for a in args[:2]):
                return _dequantize(args, _attrs(node), Ctx(torch.float32))[0]
        return None


def _match_linear(g: _Graph, node: onnx.NodeProto) -> tuple[LinearOp, str, str, set[int]] | None:
    """``(op, input value, output value, ids of the nodes folded in)`` if ``node`` is a linear
    layer."""
    attrs = _attrs(node)
    if node.op_type == "Gemm" and (
        attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0
    ):
        return None
    if node.op_type not in ("MatMul", "Gemm"):
        return None
    folded = {id(node)}
    b_name = node.input[1]
    dq = g.producer.get(b_name)
    int8 = int4 = None
    if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in g.inits:
        q = g.const(dq.input[0])
        scale = g.const(dq.input[1])
        zero = g.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        if zero is not None and bool(zero.any()):
            return None  # asymmetric weights: no kernel here; leave the graph as it is
        dq_attrs = _attrs(dq)
        weight = _dequantize([q, scale], dq_attrs, Ctx(torch.float32))[0]
        transposed = node.op_type == "Gemm" and attrs.get("transB", 0)
        weight_nk = weight if transposed else weight.t()
        q_nk = (q if transposed else q.t()).contiguous()
        if g.inits[dq.input[0]].data_type == onnx.TensorProto.INT4:
            block = dq_attrs.get("block_size", 0)
            if not block or scale.dim() != 2:
                return None
            int4 = (q_nk.to(torch.int8), (scale if transposed else scale.t()).contiguous(), block)
        elif q.dtype == torch.int8 and scale.dim() == 1:
            int8 = (q_nk, scale)
        else:
            return None
        if len(g.consumers.get(b_name, [])) == 1:
            folded.add(id(dq))
    else:
        weight = g.const(b_name)
        if weight is None or not weight.is_floating_point() or weight.dim() != 2:
            return None
        transposed = node.op_type == "Gemm" and attrs.get("transB", 0)
        weight_nk = (weight if transposed else weight.t()).float()

    x_name, act = node.input[0], None
    x_dq = g.producer.get(x_name)
    if x_dq is not None and x_dq.op_type == "DequantizeLinear":
        x_q = g.producer.get(x_dq.input[0])
        scale = g.const(x_dq.input[1])
        zero = g.const(x_dq.input[2]) if len(x_dq.input) > 2 and x_dq.input[2] else None
        per_tensor = scale is not None and scale.dim() == 0 and (zero is None or zero.dim() == 0)
        if x_q is not None and x_q.op_type == "QuantizeLinear" and per_tensor:
            dtype = zero.dtype if zero is not None else torch.uint8
            act = (float(scale), int(zero) if zero is not None else 0, dtype)
            x_name = x_q.input[0]
    bias = None
    out = node.output[0]
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        bias = g.const(node.input[2])
        if bias is None or bias.dim() != 1:
            return None
    elif len(g.consumers.get(out, [])) == 1 and out not in _graph_outputs(g.model):
        add = g.consumers[out][0]
        if add.op_type == "Add":
            other = add.input[1] if add.input[0] == out else add.input[0]
            candidate = g.const(other)
            if (
                candidate is not None
                and candidate.dim() == 1
                and candidate.is_floating_point()
                and candidate.shape[0] == weight_nk.shape[0]
            ):
                bias, out = candidate, add.output[0]
                folded.add(id(add))
    op = LinearOp(node.name, weight_nk, int8=int8, int4=int4, act=act, bias=bias)
    return op, x_name, out, folded


def _graph_outputs(model: onnx.ModelProto) -> set[str]:
    return {o.name for o in model.graph.output}


@dataclasses.dataclass
class _Step:
    fn: Callable[..., list[torch.Tensor]] | LinearOp
    inputs: list[str]  # value names ("" for an omitted input)
    outputs: list[str]
    attrs: dict[str, Any]
    op_type: str
    name: str


def _live_steps(steps: list[_Step], outputs: Sequence[str]) -> list[_Step]:
    """``steps`` less those no graph output depends on (e.g. an input Q/DQ pair that was folded
    into its linear layer)."""
    needed, kept = set(outputs), []
    for step in reversed(steps):
        if needed.intersection(step.outputs):
            kept.append(step)
            needed.update(n for n in step.inputs if n)
    return kept[::-1]


# Inputs that stay fp32 on the device: the scales and zero points of Q/DQ (fp16 would round a
# scale to 11 bits and move every quantization boundary).
_FP32_INPUTS = {"QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2)}


class Program:
    """The lowered graph: linear ops plus generic steps, not yet specialized to input shapes."""

    def __init__(self, model: onnx.ModelProto, device: str | torch.device, float_dtype):
        self.device = torch.device(device)
        self.float_dtype = float_dtype
        self.input_names = [i.name for i in model.graph.input if i.name not in _initializers(model)]
        self.output_names = [o.name for o in model.graph.output]
        g = _Graph.of(model)
        self._consts: dict[str, torch.Tensor] = {n: _array(t) for n, t in g.inits.items()}
        self.linears: dict[str, LinearOp] = {}
        steps: list[_Step] = []
        matches = {}
        for node in model.graph.node:
            found = _match_linear(g, node)
            if found:
                matches[id(node)] = found
        folded = {i for _, _, _, ids in matches.values() for i in ids}
        for index, node in enumerate(model.graph.node):
            if id(node) in matches:
                op, x_name, out, _ = matches[id(node)]
                op.name = op.name or f"linear_{index}"
                self.linears[op.name] = op.to(self.device)
                steps.append(_Step(self.linears[op.name], [x_name], [out], {}, "Linear", op.name))
                continue
            if id(node) in folded:
                continue
            if node.op_type not in OPS or node.domain not in ("", "ai.onnx"):
                raise BackendError(
                    f"the torch backend has no kernel for ONNX op {node.domain or 'ai.onnx'}::"
                    f"{node.op_type} (node {node.name!r}); it runs: {', '.join(sorted(OPS))}. "
                    "Use the onnxruntime backend for this model."
                )
            steps.append(
                _Step(OPS[node.op_type], list(node.input), list(node.output), _attrs(node),
                      node.op_type, node.name)
            )  # fmt: skip
        self.steps = _live_steps(steps, self.output_names)
        for op in self.linears.values():
            op.use(op.kernel, float_dtype)

    def specialize(self, inputs: dict[str, torch.Tensor]) -> Specialized:
        """The device steps that remain for inputs of these shapes (dtypes as given)."""
        ctx_cpu = Ctx(torch.float32)
        ctx_dev = Ctx(self.float_dtype)
        static: dict[str, torch.Tensor] = dict(self._consts)
        live: dict[str, torch.Tensor] = {}
        for name in self.input_names:
            tensor = inputs[name].to(self.device)
            live[name] = tensor.to(self.float_dtype) if tensor.is_floating_point() else tensor
        kept: list[_Step] = []
        consts: dict[str, torch.Tensor] = {}
        for step in self.steps:
            if isinstance(step.fn, LinearOp):
                x = self._device_value(step.inputs[0], live, static, consts)
                live[step.outputs[0]] = step.fn(x)
                kept.append(step)
                continue
            args = [static.get(n) if n else None for n in step.inputs]
            if step.op_type in _SHAPE_ONLY:
                args = [live.get(n, static.get(n)) for n in step.inputs]
                outs = step.fn(args, step.attrs, ctx_cpu)
                static.update(zip(step.outputs, (o.cpu() for o in outs)))
                continue
            if all(n in static or not n for n in step.inputs):
                outs = step.fn(args, step.attrs, ctx_cpu)
                static.update(zip(step.outputs, outs))
                continue
            fp32 = _FP32_INPUTS.get(step.op_type, ())
            args = [self._device_value(n, live, static, consts, i in fp32) if n else None
                    for i, n in enumerate(step.inputs)]  # fmt: skip
            outs = step.fn(args, step.attrs, ctx_dev)
            live.update(zip(step.outputs, outs))
            kept.append(step)
        for name in self.output_names:
            if name not in live:
                consts[name] = self._device_value(name, live, static, consts)
        return Specialized(self, kept, consts, {n: tuple(t.shape) for n, t in inputs.items()})

    def _device_value(self, name, live, static, consts, fp32: bool = False) -> torch.Tensor:
        """A value on the device: computed there (``live``), or a folded constant moved there
        once, in the run's float dtype (clamped to its range: a -3.4e38 mask constant becomes
        the fp16 minimum, not -inf, so 0 * mask stays 0) unless ``fp32``."""
        if name in live:
            return live[name]
        key = f"{name}@fp32" if fp32 else name
        if key not in consts:
            value = static[name]
            if value.is_floating_point() and not fp32:
                limit = torch.finfo(self.float_dtype).max
                value = value.clamp(-limit, limit).to(self.float_dtype)
            consts[key] = value.to(self.device)
        return consts[key]


class Specialized(torch.nn.Module):
    """The steps of a :class:`Program` that run on the device for one set of input shapes."""

    def __init__(self, program: Program, steps: list[_Step], consts, shapes) -> None:
        super().__init__()
        self.program = program
        self.steps = steps
        self.consts = consts
        self.shapes = shapes
        self.linears = torch.nn.ModuleList([s.fn for s in steps if isinstance(s.fn, LinearOp)])
        last_use: dict[str, int] = {}
        for index, step in enumerate(steps):
            for name in step.inputs:
                last_use[name] = index
        keep = set(program.output_names)
        self._free = [
            [n for n in dict.fromkeys(step.inputs) if last_use.get(n) == i and n not in keep]
            for i, step in enumerate(steps)
        ]

    def forward(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        ctx = Ctx(self.program.float_dtype)
        env: dict[str, torch.Tensor] = {}
        for name, tensor in zip(self.program.input_names, inputs):
            env[name] = tensor.to(ctx.float_dtype) if tensor.is_floating_point() else tensor
        consts = self.consts
        for step, free in zip(self.steps, self._free):
            fp32 = _FP32_INPUTS.get(step.op_type, ())
            args = [
                env[n] if n in env else consts.get(f"{n}@fp32" if i in fp32 else n)
                for i, n in enumerate(step.inputs)
            ]
            if isinstance(step.fn, LinearOp):
                outs = [step.fn(args[0])]
            else:
                outs = step.fn(args, step.attrs, ctx)
            for name, out in zip(step.outputs, outs):
                env[name] = out
            for name in free:
                env.pop(name, None)
        return [env[n] if n in env else consts[n] for n in self.program.output_names]


def lower(
    model: onnx.ModelProto, device: str | torch.device = "cpu", float_dtype=torch.float32
) -> Program:
    """Lower an ONNX model (QDQ or float) to a :class:`Program` on ``device``.

    Raises:
        BackendError: the graph has an op the torch backend does not run.

    Example:
        >>> program = lower(onnx.load("model.onnx"), "cuda", torch.float16)
        >>> run = program.specialize({"image": x})
        >>> logits, = run(x)
    """
    return Program(model, device, float_dtype)


def run_numpy(program: Program, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a program once on numpy inputs (specializing for their shapes); outputs as float32
    numpy arrays where float. For tests and one-off calls; engines keep the specialization."""
    tensors = {n: torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in program.input_names}
    spec = program.specialize(tensors)
    with torch.no_grad():
        outs = spec(*[tensors[n].to(program.device) for n in program.input_names])
    return [o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy() for o in outs]
