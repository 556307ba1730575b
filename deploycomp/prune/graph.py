"""The structured-pruning dependency graph: which channels of a model must be removed together.

Takes a model and example inputs and returns a :class:`PruneGraph`: every group of coupled
channel slots (a Linear's rows, the next layer's columns, a BatchNorm's statistics, the heads of an
attention module, every producer and consumer of a residual sum, ...), and for each group that
cannot be pruned the reason. The model is traced with ``torch.fx.symbolic_trace`` semantics
(a custom tracer) and run once on the example inputs for shapes (``ShapeProp``). fx rather than
``torch.export``: the graph keeps ``call_module`` nodes named like the model's modules, the
project's compressed wrappers and attention modules stay opaque leaves, and HF BERT models trace
once their attention is a leaf, their embeddings an opaque *input module* (see :class:`_Tracer`)
and their attention-mask builder a single node (transformers 5 no longer ships its own fx tracer).
Channels are followed node by node; any op the rules below do not understand makes the groups it
touches not prunable, with a reason, rather than guessing; a layer whose output is never read
(HF's unused pooler) is refused too.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from deploycomp.compress.modules import CompressedConv2d, CompressedLinear
from deploycomp.errors import DeployCompError
from deploycomp.prune import _rules
from deploycomp.prune.attention import attention_spec, mask_functions
from deploycomp.prune.groups import ChannelGroup, PruneGraph

_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._BatchNorm)


class _Tracer(fx.Tracer):
    """Keeps compressed wrappers, known attention modules and channel-free input modules opaque.

    An *input module* is one that holds no layer the rules prune (Linear, Conv, attention) and
    whose tensor arguments come from the model's inputs alone, through no module and no parameter
    (HF's ``BertEmbeddings``: token ids in, embeddings out). Nothing in it can be pruned and
    nothing it reads carries channels, so tracing into it (where HF slices buffers by traced
    sequence lengths) would gain nothing; its output is an untracked tensor, and a residual sum
    with it refuses the hidden size with a reason.
    """

    def __init__(self, model: nn.Module) -> None:
        # Attention-mask builders (data-dependent on the mask) become single call_function nodes.
        # fx patches them only in the globals it searches: add the Python modules defining the
        # model's classes, which is where a decorated forward's helpers look them up.
        super().__init__(autowrap_modules=(math,), autowrap_functions=mask_functions())
        defining = {type(module).__module__ for module in model.modules()}
        self._autowrap_search += [sys.modules[name] for name in defining if name in sys.modules]
        self._args: tuple = ()
        self.input_modules: list[str] = []

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        # fx asks is_leaf_module without the call's arguments; the input-module rule needs them.
        self._args = (args, kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._args = ()

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        # Subclasses of the layers the rules know (e.g. a Conv2d with "same" padding built in)
        # stay whole: tracing into them would hide the layer behind a functional call.
        if isinstance(module, (CompressedConv2d, CompressedLinear, *_LAYER_TYPES)):
            return True
        if attention_spec(module) is not None:
            return True
        if _is_input_module(module, self._args):
            self.input_modules.append(qualname)
            return True
        return super().is_leaf_module(module, qualname)


def _holds_prunable_layer(module: nn.Module) -> bool:
    return any(
        isinstance(sub, (CompressedConv2d, CompressedLinear, *_LAYER_TYPES))
        or attention_spec(sub) is not None
        for sub in module.modules()
    )


def _from_inputs_only(args: Any) -> bool:
    """True when every traced value in ``args`` derives from placeholders through functions only."""
    pending = []
    fx.node.map_aggregate(
        args, lambda a: pending.append(a.node) if isinstance(a, fx.Proxy) else None
    )
    seen: set[fx.Node] = set()
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op in ("call_module", "get_attr"):
            return False
        pending.extend(node.all_input_nodes)
    return bool(seen)


def _is_input_module(module: nn.Module, args: Any) -> bool:
    return _from_inputs_only(args) and not _holds_prunable_layer(module)


def trace(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """``model`` as an fx GraphModule with shapes in ``node.meta["tensor_meta"]``.

    Runs the model once, in eval mode and without gradients, so no statistic or quantizer is
    touched; training flags are restored afterwards.
    """
    return _trace(model, example_inputs)[0]


def _trace(model: nn.Module, example_inputs: tuple) -> tuple[fx.GraphModule, list[str]]:
    """:func:`trace`, and the names of the input modules kept opaque."""
    tracer = _Tracer(model)
    try:
        graph = tracer.trace(model)
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
    return graph_module, list(dict.fromkeys(tracer.input_modules))


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
    graph_module, input_modules = _trace(model, example_inputs)
    propagation = _rules.Propagation(graph_module)
    propagation.run()
    spaces = propagation.spaces
    groups: list[ChannelGroup] = []
    refused = dict(propagation.refused)
    for name in input_modules:
        refused[name] = (
            "opaque input module (reads only the model inputs, holds no prunable layer): "
            "its output channels are not tracked"
        )
    for space in spaces.roots():
        if not space.slots:
            continue
        reasons = list(dict.fromkeys(space.reasons))
        has_producer = any(slot.role in ("out", "head") for slot in space.slots)
        if not reasons and not has_producer:
            reasons.append("no layer produces these channels")
        if not reasons and all(slot.role in ("out", "head") for slot in space.slots):
            # Dead code (HF's pooler when only last_hidden_state is used): pruning it would
            # change nothing the model returns, so it is not offered as a pruning choice.
            reasons.append("its channels are never read")
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
