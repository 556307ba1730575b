"""Raise the default-domain opset of an ONNX graph without changing what it computes.

The fp32 graph is exported at opset 17; blocked DequantizeLinear (INT4 weights, ``block_size``)
exists from opset 21 only, so a graph that carries INT4 weights is upgraded first. The upgrade
goes through ``onnx.version_converter``, which rewrites every operator whose signature changed
(ReduceMean's ``axes`` moved from an attribute to an input at 18, Split gained ``num_outputs``).
Where the converter fails (an operator it has no adapter for), :func:`bump_opset` raises the
version number and rewrites by hand the operators that changed meaning between opset 13 and 21;
an operator it cannot rewrite is an error, never a silent change of numbers.
"""

from __future__ import annotations

import onnx
from onnx import helper, version_converter

from deploycomp.errors import ExportError

INT4_OPSET = 21
# Reductions whose ``axes`` became an input at opset 18 (ReduceSum moved at 13).
_AXES_INPUT_AT_18 = frozenset(
    {
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceMax",
        "ReduceMean",
        "ReduceMin",
        "ReduceProd",
        "ReduceSumSquare",
    }
)
_OLDEST_BUMPABLE = 13  # Squeeze, Unsqueeze, Split and ReduceSum took axes as inputs from 13


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default (``ai.onnx``) domain that ``model`` imports."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    raise ExportError(
        "the ONNX model imports no default-domain opset (opset_import has no '' entry); "
        "export it with torch.onnx.export(..., opset_version=17)."
    )


def upgrade_opset(model: onnx.ModelProto, version: int = INT4_OPSET) -> onnx.ModelProto:
    """A copy of ``model`` at default-domain opset ``version`` (``model`` itself if already there).

    Node names are kept, so layers keyed by node name still find their nodes.

    Raises:
        ExportError: neither the converter nor :func:`bump_opset` can upgrade the graph.

    Example:
        >>> upgrade_opset(fp32_graph, 21).opset_import[0].version
        21
    """
    if default_opset(model) >= version:
        return model
    try:
        converted = version_converter.convert_version(model, version)
        onnx.checker.check_model(converted)
    except (RuntimeError, ValueError, onnx.checker.ValidationError):  # no adapter for an op
        return bump_opset(model, version)
    for index, node in enumerate(converted.graph.node):
        if not node.name:  # the converter leaves the Constants it adds (Reduce axes) unnamed
            node.name = f"opset{version}_{node.op_type}_{index}"
    return converted


def bump_opset(model: onnx.ModelProto, version: int = INT4_OPSET) -> onnx.ModelProto:
    """A copy of ``model`` with its default opset set to ``version`` and changed ops rewritten.

    Handles a graph at opset 13 to ``version - 1`` with ``version`` up to 21: Reduce* ``axes``
    attributes become Constant inputs (opset 18), a Split without split sizes gets
    ``num_outputs`` (18), a RoiAlign relying on the pre-16 default gets it explicitly. A
    GroupNormalization below 21 (whose scale and bias changed meaning) is refused.

    Raises:
        ExportError: the graph is older than opset 13, ``version`` is above 21, or it holds an
            operator whose meaning changed in a way this function does not rewrite.
    """
    current = default_opset(model)
    if current >= version:
        return model
    if current < _OLDEST_BUMPABLE or version > INT4_OPSET:
        raise ExportError(
            f"cannot raise opset {current} to {version} by hand: the manual upgrade covers opset "
            f"{_OLDEST_BUMPABLE} to {INT4_OPSET}. Re-export the model with "
            "torch.onnx.export(..., opset_version=17)."
        )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for graph in _graphs(out.graph):
        nodes = []
        for node in graph.node:
            nodes.extend(_upgraded(node, current, version))
        del graph.node[:]
        graph.node.extend(nodes)
    for opset in out.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = version
    return out


def _graphs(graph: onnx.GraphProto):
    """``graph`` and every subgraph (If/Loop/Scan bodies) inside it."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _upgraded(node: onnx.NodeProto, current: int, version: int) -> list[onnx.NodeProto]:
    """``node`` (and the Constant it now reads) with the semantics it had at ``current``."""
    attrs = {a.name: a for a in node.attribute}
    if node.op_type in _AXES_INPUT_AT_18 and current < 18 <= version and "axes" in attrs:
        axes = list(attrs["axes"].ints)
        node.attribute.remove(attrs["axes"])
        name = f"{node.name or node.output[0]}_axes"
        constant = helper.make_node(
            "Constant",
            [],
            [name],
            name=f"{name}_Constant",
            value=helper.make_tensor(name, onnx.TensorProto.INT64, [len(axes)], axes),
        )
        node.input.append(name)
        return [constant, node]
    if node.op_type == "Split" and current < 18 <= version:
        if len(node.input) < 2 or not node.input[1]:
            node.attribute.append(helper.make_attribute("num_outputs", len(node.output)))
    elif node.op_type == "RoiAlign" and current < 16 <= version:
        if "coordinate_transformation_mode" not in attrs:
            node.attribute.append(
                helper.make_attribute("coordinate_transformation_mode", "output_half_pixel")
            )
    elif node.op_type == "GroupNormalization" and current < 21 <= version:
        raise ExportError(
            f"node {node.name!r} is a GroupNormalization at opset {current}, whose scale and "
            "bias changed meaning at opset 21; re-export the model at opset 21 or keep its "
            "weights out of INT4."
        )
    return [node]
