"""The channel-following rules of the pruning graph, one fx node at a time.

Every tensor that carries prunable channels is a :class:`_Chan`: its channel axis and the
segments of that axis, each a union-find *space* (a future group) times a multiplier (head size,
or ``H * W`` after flattening a feature map). Producers (Linear, Conv, attention) open spaces,
consumers add ``in`` slots, residual sums and other same-shape elementwise ops merge spaces. A node
the rules do not understand refuses every space it touches, with a reason; its output carries no
channels, so a later sum with a tracked tensor is refused too (it varies along the channel axis).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections import Counter
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from deploycomp.compress.modules import CompressedConv2d, CompressedLinear
from deploycomp.prune.attention import AttentionSpec, attention_spec
from deploycomp.prune.groups import ChannelSlot

# Elementwise on channels; True when f(0) == 0, so zeroed channels stay zero.
_UNARY_MODULES: dict[type[nn.Module], bool] = {
    nn.ReLU: True, nn.ReLU6: True, nn.GELU: True, nn.SiLU: True, nn.Hardswish: True,
    nn.Tanh: True, nn.LeakyReLU: True, nn.ELU: True, nn.Mish: True, nn.Dropout: True,
    nn.Identity: True, nn.Sigmoid: False, nn.Hardsigmoid: False,
}  # fmt: skip
_UNARY_FUNCTIONS: dict[Any, bool] = {
    F.relu: True, torch.relu: True, F.relu6: True, F.gelu: True, F.silu: True,
    F.hardswish: True, torch.tanh: True, F.leaky_relu: True, F.elu: True, F.dropout: True,
    F.mish: True, torch.sigmoid: False, F.sigmoid: False, F.hardsigmoid: False,
}  # fmt: skip
_UNARY_METHODS = {"relu": True, "tanh": True, "contiguous": True, "clone": True, "sigmoid": False}
# Pooling over the trailing spatial dims; the channel axis must lie before them.
_POOL_MODULES = {
    nn.MaxPool1d: 1, nn.AvgPool1d: 1, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveMaxPool1d: 1,
    nn.MaxPool2d: 2, nn.AvgPool2d: 2, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveMaxPool2d: 2,
}  # fmt: skip
_POOL_FUNCTIONS = {
    F.max_pool2d: 2, F.avg_pool2d: 2, F.adaptive_avg_pool2d: 2, F.adaptive_max_pool2d: 2,
    F.max_pool1d: 1, F.avg_pool1d: 1, F.adaptive_avg_pool1d: 1,
}  # fmt: skip
_ADD = {operator.add, operator.iadd, torch.add, operator.sub, torch.sub, "add", "sub"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul"}
_DIV = {operator.truediv, torch.div, "div"}
_RESHAPE = {torch.flatten, torch.reshape, "flatten", "view", "reshape"}
_PERMUTE = {torch.permute, torch.transpose, "permute", "transpose"}
_REDUCE = {torch.mean, torch.sum, "mean", "sum"}
_CAT = {torch.cat, torch.concat}


class _Seg(NamedTuple):
    space: int
    mult: int
    zero: bool  # zeroing the group's producers leaves these channels zero here


@dataclasses.dataclass(frozen=True)
class _Chan:
    segs: tuple[_Seg, ...]
    axis: int
    ndim: int

    def spaces(self) -> list[int]:
        return [seg.space for seg in self.segs]


@dataclasses.dataclass
class _Space:
    size: int
    unit: str
    slots: list[ChannelSlot] = dataclasses.field(default_factory=list)
    reasons: list[str] = dataclasses.field(default_factory=list)
    zero_invariant: bool = True


class _Spaces:
    """Union-find over spaces."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.data: list[_Space] = []

    def new(self, size: int, unit: str = "channel") -> int:
        self.parent.append(len(self.parent))
        self.data.append(_Space(size, unit))
        return len(self.parent) - 1

    def find(self, index: int) -> int:
        while self.parent[index] != index:
            self.parent[index] = self.parent[self.parent[index]]
            index = self.parent[index]
        return index

    def get(self, index: int) -> _Space:
        return self.data[self.find(index)]

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        a, b = min(a, b), max(a, b)
        self.parent[b] = a
        kept, merged = self.data[a], self.data[b]
        kept.slots += merged.slots
        kept.reasons += merged.reasons
        kept.zero_invariant &= merged.zero_invariant
        if merged.unit != "channel":
            kept.unit = merged.unit

    def roots(self) -> list[_Space]:
        return [self.data[i] for i in range(len(self.parent)) if self.find(i) == i]


def _chans(value: Any) -> list[_Chan]:
    if isinstance(value, _Chan):
        return [value]
    if isinstance(value, list | tuple):
        return [chan for item in value for chan in _chans(item)]
    if isinstance(value, dict):
        return [chan for item in value.values() for chan in _chans(item)]
    return []


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class Propagation:
    """Runs the rules over a shape-propagated GraphModule; read ``spaces`` and ``refused``."""

    def __init__(self, graph_module: fx.GraphModule) -> None:
        self.gm = graph_module
        self.spaces = _Spaces()
        self.refused: dict[str, str] = {}
        self.env: dict[fx.Node, Any] = {}
        self.calls = Counter(n.target for n in graph_module.graph.nodes if n.op == "call_module")

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.env[node] = self._visit(node)

    # -- helpers ---------------------------------------------------------------------------
    def _value(self, arg: Any) -> Any:
        return fx.node.map_arg(arg, lambda n: self.env[n])

    def _refuse(self, key: str, reason: str, chans: list[_Chan]) -> None:
        self.refused.setdefault(key, reason)
        for chan in chans:
            for space in chan.spaces():
                self.spaces.get(space).reasons.append(f"{key}: {reason}")

    def _unknown(self, node: fx.Node, reason: str) -> None:
        key = node.target if node.op == "call_module" else node.name
        self._refuse(str(key), reason, _chans(self._value((node.args, node.kwargs))))

    def _consume(self, chan: _Chan, module: str, role: str) -> None:
        offset = 0
        for seg in chan.segs:
            space = self.spaces.get(seg.space)
            space.slots.append(ChannelSlot(module, role, offset, seg.mult))
            space.zero_invariant &= seg.zero
            offset += space.size * seg.mult

    def _width(self, chan: _Chan) -> int:
        return sum(self.spaces.get(seg.space).size * seg.mult for seg in chan.segs)

    def _produce(
        self, node: fx.Node, size: int, slot: ChannelSlot, last_axis: bool = True
    ) -> _Chan:
        space = self.spaces.new(size)
        self.spaces.get(space).slots.append(slot)
        ndim = len(_shape(node) or (0,))
        return _Chan((_Seg(space, slot.unit, True),), ndim - 1 if last_axis else 1, ndim)

    def _moved(self, chan: _Chan, node: fx.Node, axis: int, zero: bool | None = None) -> _Chan:
        segs = (
            chan.segs
            if zero is None
            else tuple(s._replace(zero=s.zero and zero) for s in chan.segs)
        )
        return _Chan(segs, axis, len(_shape(node) or ()))

    # -- dispatch --------------------------------------------------------------------------
    def _visit(self, node: fx.Node) -> Any:
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            self._refuse(
                "output", "its channels reach the model output", _chans(self._value(node.args))
            )
            return None
        if node.op == "call_module":
            return self._module(node, self.gm.get_submodule(str(node.target)))
        target = node.target
        args = self._value(node.args)
        if not _chans(args) and not _chans(self._value(node.kwargs)):
            if target is operator.getitem and isinstance(args[0], tuple):
                index = args[1]
                return args[0][index] if isinstance(index, int) and index < len(args[0]) else None
            return None
        return self._function(node, target, args)

    def _module(self, node: fx.Node, module: nn.Module) -> Any:
        name = str(node.target)
        args = self._value(node.args)
        x = args[0] if args else None
        # A module with parameters called twice ties two places to one weight; a parameterless
        # one (an activation reused across blocks) is a function and prunes like one.
        if self.calls[node.target] > 1 and any(True for _ in module.parameters()):
            self._unknown(node, f"module called {self.calls[node.target]} times (shared weights)")
            return None
        spec = attention_spec(module)
        if spec is not None:
            return self._attention(node, module, spec, x)
        if isinstance(module, nn.Linear | CompressedLinear):
            return self._layer(node, x, module.in_features, module.out_features, last_axis=True)
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | CompressedConv2d):
            return self._conv(node, module, x)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if isinstance(x, _Chan) and x.axis == 1 and self._width(x) == module.num_features:
                self._consume(x, name, "bn")
                return x
        elif isinstance(module, nn.LayerNorm):
            return self._layer_norm(node, module, x)
        elif type(module) in _UNARY_MODULES:
            return self._moved(x, node, x.axis, _UNARY_MODULES[type(module)]) if x else None
        elif type(module) in _POOL_MODULES:
            return self._pool(node, x, _POOL_MODULES[type(module)])
        elif isinstance(module, nn.Flatten):
            return self._reshape(node, x)
        if x is None and not _chans(args):
            return None
        self._unknown(node, f"{type(module).__name__} consumes channels in a way not modelled")
        return None

    def _function(self, node: fx.Node, target: Any, args: tuple) -> Any:
        x = args[0]
        if target in _UNARY_FUNCTIONS or target in _UNARY_METHODS:
            zero = _UNARY_FUNCTIONS.get(target, _UNARY_METHODS.get(target))
            if isinstance(x, _Chan) and len(_chans(args)) == 1:
                return self._moved(x, node, x.axis, zero)
        elif target in _POOL_FUNCTIONS:
            return self._pool(node, x, _POOL_FUNCTIONS[target])
        elif target in _ADD or target in _MUL or target in _DIV:
            return self._binary(node, target, args)
        elif target in _RESHAPE:
            return self._reshape(node, x)
        elif target in _PERMUTE:
            return self._permute(node, target, x, args[1:])
        elif target in _REDUCE:
            return self._reduce(node, x)
        elif target in _CAT:
            return self._cat(node, args, node.kwargs)
        elif target is operator.getitem and isinstance(x, tuple) and isinstance(args[1], int):
            return x[args[1]] if args[1] < len(x) else None
        self._unknown(node, f"{getattr(target, '__name__', target)} on channels is not modelled")
        return None

    # -- rules -----------------------------------------------------------------------------
    def _layer(self, node: fx.Node, x: Any, width_in: int, width_out: int, last_axis: bool) -> Any:
        name = str(node.target)
        if isinstance(x, _Chan):
            axis_ok = x.axis == (x.ndim - 1 if last_axis else 1)
            if not axis_ok or self._width(x) != width_in:
                self._unknown(
                    node, f"reads axis {'-1' if last_axis else '1'} but channels are on {x.axis}"
                )
            else:
                self._consume(x, name, "in")
        return self._produce(node, width_out, ChannelSlot(name, "out"), last_axis)

    def _conv(self, node: fx.Node, conv: nn.Module, x: Any) -> Any:
        if conv.groups == 1:
            return self._layer(node, x, conv.in_channels, conv.out_channels, last_axis=False)
        if conv.groups == conv.in_channels == conv.out_channels:
            if isinstance(x, _Chan) and x.axis == 1:
                self._consume(x, str(node.target), "depthwise")
                return self._moved(x, node, 1)
            if x is None:
                return None
        reason = (
            f"grouped convolution (groups={conv.groups}, {conv.in_channels} -> "
            f"{conv.out_channels} channels) ties channels within groups; not supported"
        )
        self._unknown(node, reason)
        return None

    def _layer_norm(self, node: fx.Node, norm: nn.LayerNorm, x: Any) -> Any:
        if x is None:
            return None
        if len(norm.normalized_shape) == 1 and x.axis == x.ndim - 1 and norm.elementwise_affine:
            self._consume(x, str(node.target), "ln")
            for seg in x.segs:  # its mean and variance count every channel
                self.spaces.get(seg.space).zero_invariant = False
            return self._moved(x, node, x.axis, False)
        self._unknown(node, f"LayerNorm over {tuple(norm.normalized_shape)} is not over channels")
        return None

    def _attention(self, node: fx.Node, module: nn.Module, spec: AttentionSpec, x: Any) -> Any:
        name = str(node.target)
        others = _chans(self._value((node.args[1:], node.kwargs)))
        if others:
            self._unknown(node, "attention reads tracked channels besides hidden_states")
        if isinstance(x, _Chan):
            if x.axis != x.ndim - 1:
                self._unknown(node, f"attention reads the last axis, channels are on {x.axis}")
            else:
                for child in spec.projections:
                    self._consume(x, f"{name}.{child}", "in")
        heads = getattr(module, spec.num_heads_attr)
        head_size = getattr(module, spec.head_size_attr)
        shape = _shape(node) if spec.output_index is None else None
        ndim = len(shape) if shape else (x.ndim if isinstance(x, _Chan) else 3)
        space = self.spaces.new(heads, "head")
        self.spaces.get(space).slots.append(ChannelSlot(name, "head", 0, head_size))
        out = _Chan((_Seg(space, head_size, True),), ndim - 1, ndim)
        if spec.output is not None:
            proj = getattr(module, spec.output)
            self._consume(out, f"{name}.{spec.output}", "in")
            out = self._produce(
                node, proj.out_features, ChannelSlot(f"{name}.{spec.output}", "out")
            )
        if spec.output_index is None:
            return out
        return tuple(out if i == spec.output_index else None for i in range(spec.output_index + 1))

    def _pool(self, node: fx.Node, x: Any, spatial_dims: int) -> Any:
        if isinstance(x, _Chan) and x.axis < x.ndim - spatial_dims:
            return self._moved(x, node, x.axis)
        if x is not None:
            self._unknown(node, "pooling over the channel axis")
        return None

    def _binary(self, node: fx.Node, target: Any, args: tuple) -> Any:
        a, b = args[0], args[1]
        out_shape = _shape(node) or ()
        if isinstance(a, _Chan) and isinstance(b, _Chan):
            if target in _DIV:
                self._unknown(node, "division by a tensor with channels")
                return None
            merged = self._merge(node, [a, b], out_shape)
            if merged is None:
                return None
            is_add = target in _ADD
            segs = tuple(
                sa._replace(zero=(sa.zero and sb.zero) if is_add else (sa.zero or sb.zero))
                for sa, sb in zip(a.segs, b.segs, strict=True)
            )
            return dataclasses.replace(merged, segs=segs)
        chan, other, other_node = (
            (a, b, node.args[1]) if isinstance(a, _Chan) else (b, a, node.args[0])
        )
        axis = len(out_shape) - chan.ndim + chan.axis
        if isinstance(other_node, fx.Node):
            other_shape = _shape(other_node)
            pos = chan.axis - chan.ndim + len(other_shape or ())
            if other_shape is None or (0 <= pos and other_shape[pos] != 1):
                self._unknown(
                    node,
                    f"elementwise op with {other_node.name!r}, an untracked tensor that varies "
                    "along the channels",
                )
                return None
            keeps_zero = target in _MUL or target in _DIV
        elif isinstance(other, int | float) and (target in _MUL or (target in _DIV and chan is a)):
            keeps_zero = True
        elif isinstance(other, int | float) and target in _ADD:
            keeps_zero = other == 0
        else:
            self._unknown(node, f"{target} with {other!r} on channels is not modelled")
            return None
        segs = tuple(seg._replace(zero=seg.zero and keeps_zero) for seg in chan.segs)
        return _Chan(segs, axis, len(out_shape))

    def _merge(self, node: fx.Node, chans: list[_Chan], out_shape: tuple) -> _Chan | None:
        """Same channels in every input (a residual sum, a concat along another axis)."""
        first = chans[0]
        for other in chans[1:]:
            same = other.axis - other.ndim == first.axis - first.ndim and len(other.segs) == len(
                first.segs
            )
            same = same and all(
                sa.mult == sb.mult
                and self.spaces.get(sa.space).size == self.spaces.get(sb.space).size
                for sa, sb in zip(first.segs, other.segs, strict=True)
            )
            if not same:
                self._unknown(node, "inputs carry differently laid-out channels")
                return None
        for other in chans[1:]:
            for sa, sb in zip(first.segs, other.segs, strict=True):
                self.spaces.union(sa.space, sb.space)
        return _Chan(first.segs, len(out_shape) - first.ndim + first.axis, len(out_shape))

    def _reshape(self, node: fx.Node, x: Any) -> Any:
        if not isinstance(x, _Chan):
            return None
        shape_in = _shape(node.args[0]) or ()
        shape_out = _shape(node) or ()
        a = x.axis
        if shape_out[: a + 1] == shape_in[: a + 1]:
            return self._moved(x, node, a)
        if a == len(shape_in) - 1 and shape_out and shape_out[-1] == shape_in[-1]:
            return self._moved(x, node, len(shape_out) - 1)
        if shape_out[:a] == shape_in[:a] and len(shape_out) == a + 1:
            factor = math.prod(shape_in[a + 1 :])
            segs = tuple(seg._replace(mult=seg.mult * factor) for seg in x.segs)
            return _Chan(segs, a, len(shape_out))
        self._unknown(node, f"reshape {shape_in} -> {shape_out} splits or moves channel axis {a}")
        return None

    def _permute(self, node: fx.Node, target: Any, x: Any, dims: tuple) -> Any:
        if not isinstance(x, _Chan):
            return None
        dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], list | tuple) else dims
        if target in ("transpose", torch.transpose):
            d0, d1 = (d % x.ndim for d in dims)
            order = list(range(x.ndim))
            order[d0], order[d1] = order[d1], order[d0]
        else:
            order = [d % x.ndim for d in dims]
        return self._moved(x, node, order.index(x.axis))

    def _reduce(self, node: fx.Node, x: Any) -> Any:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if isinstance(x, _Chan) and dim is not None:
            dims = {d % x.ndim for d in (dim if isinstance(dim, list | tuple) else (dim,))}
            if x.axis not in dims:
                axis = x.axis if keepdim else x.axis - sum(d < x.axis for d in dims)
                return self._moved(x, node, axis)
        self._unknown(node, "reduction over the channel axis")
        return None

    def _cat(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        tensors = list(args[0])
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        out_shape = _shape(node) or ()
        if not all(isinstance(t, _Chan) for t in tensors):
            self._unknown(node, "concatenates channels with an untracked tensor")
            return None
        if dim % len(out_shape) == tensors[0].axis and all(
            t.axis == tensors[0].axis for t in tensors
        ):
            segs = tuple(seg for t in tensors for seg in t.segs)
            return _Chan(segs, tensors[0].axis, len(out_shape))
        return self._merge(node, tensors, out_shape)
