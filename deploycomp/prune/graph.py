"""The structured-pruning dependency graph: which channels of a model must be removed together.

Takes a model and example inputs and returns a :class:`PruneGraph`: every group of coupled
channel slots (a Linear's rows, the next layer's columns, a BatchNorm's statistics, the heads of an
attention module, every producer and consumer of a residual sum, ...), and for each group that
cannot be pruned the reason. The model is traced with ``torch.fx.symbolic_trace`` semantics
(a custom tracer) and run once on the example inputs for shapes (``ShapeProp``). fx rather than
``torch.export``: the graph keeps ``call_module`` nodes named like the model's modules, the
project's compressed wrappers and attention modules stay opaque leaves, and HF BERT layers trace
once their attention is a leaf (transformers 5 no longer ships its own fx tracer). Channels are
followed node by node; any op the rules below do not understand makes the groups it touches not
prunable, with a reason, rather than guessing.
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from deploycomp.compress.modules import CompressedConv2d, CompressedLinear
from deploycomp.errors import DeployCompError
from deploycomp.prune import _rules
from deploycomp.prune.attention import attention_spec
from deploycomp.prune.groups import ChannelGroup, PruneGraph

_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._BatchNorm)


class _Tracer(fx.Tracer):
    """Keeps compressed wrappers and known attention modules opaque."""

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        # Subclasses of the layers the rules know (e.g. a Conv2d with "same" padding built in)
        # stay whole: tracing into them would hide the layer behind a functional call.
        if isinstance(module, (CompressedConv2d, CompressedLinear, *_LAYER_TYPES)):
            return True
        if attention_spec(module) is not None:
            return True
        return super().is_leaf_module(module, qualname)


def trace(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """``model`` as an fx GraphModule with shapes in ``node.meta["tensor_meta"]``.

    Runs the model once, in eval mode and without gradients, so no statistic or quantizer is
    touched; training flags are restored afterwards.
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as err:
        raise DeployCompError(
            f"torch.fx could not trace {type(model).__name__}: {err}; structured pruning needs a "
            f"traceable forward (no data-dependent control flow on tensors)"
        ) from err
    graph_module = fx.GraphModule(model, graph)
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            ShapeProp(graph_module).propagate(*example_inputs)
    finally:
        for module, training in modes.items():
            module.training = training
    return graph_module


def build_groups(model: nn.Module, example_inputs: tuple) -> PruneGraph:
    """Find the channel groups of ``model`` (see the module docstring for what is followed).

    Args:
        model: the model; it is run once on ``example_inputs`` (eval mode, no grad).
        example_inputs: positional inputs of ``model.forward``.

    Raises:
        DeployCompError: the model cannot be traced by torch.fx.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> graph = build_groups(model, (torch.randn(1, 4),))
        >>> [(s.module, s.role) for s in graph.prunable()[0].slots]
        [('0', 'out'), ('2', 'in')]
    """
    graph_module = trace(model, example_inputs)
    propagation = _rules.Propagation(graph_module)
    propagation.run()
    spaces = propagation.spaces
    groups: list[ChannelGroup] = []
    refused = dict(propagation.refused)
    for space in spaces.roots():
        if not space.slots:
            continue
        reasons = list(dict.fromkeys(space.reasons))
        has_producer = any(slot.role in ("out", "head") for slot in space.slots)
        if not reasons and not has_producer:
            reasons.append("no layer produces these channels")
        reason = "; ".join(reasons)
        groups.append(
            ChannelGroup(
                size=space.size,
                slots=tuple(space.slots),
                unit=space.unit,
                prunable=not reasons,
                reason=reason,
                zero_invariant=space.zero_invariant and not reasons,
            )
        )
        for slot in space.slots:
            if reasons and slot.role in ("out", "head"):
                refused.setdefault(slot.module, reason)
    return PruneGraph(groups=tuple(groups), refused=refused)
