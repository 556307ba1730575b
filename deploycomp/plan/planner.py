"""The planner: one decision per layer, from the inventory, the hardware profile and calibration.

Post-training INT8 is the whole plan for now: every layer whose weight is a constant and whose INT8
form the target's backend accelerates is quantized (weights int8 per output channel, the input as
uint8 when calibration shows it is never negative and the backend takes uint8, else int8); every
other layer stays fp32 with the reason (embedding tables too: compressing them is the joint
planner's work, :mod:`deploycomp.plan.joint_planner`). The cost model
(:mod:`deploycomp.plan.cost`: a measured timing where the profile has one, else a roofline) gives
each layer's predicted fp32 and INT8 latency.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import onnx

from deploycomp.artifacts import CompressionPlan, LayerDecision
from deploycomp.errors import ProfileError
from deploycomp.export.calibrate import TensorRange
from deploycomp.hw import HardwareProfile
from deploycomp.plan import cost
from deploycomp.plan.inventory import Layer, readable_name
from deploycomp.plan.options import Option

WEIGHT_INT8 = "int8_sym_per_channel"
ACT_INT8 = "int8_sym_per_tensor"
ACT_UINT8 = "uint8_per_tensor"
FP32 = "fp32"


def _predicted_ms(hw: HardwareProfile, backend: str, layer: Layer, option: Option) -> float | None:
    """The cost model's latency of ``layer`` under ``option`` (measured, else roofline)."""
    try:
        return cost.option_ms(hw, backend, layer, option)[0]
    except ProfileError:  # the profile lists no peak for this precision
        return None


def plan_int8(
    layers: Sequence[Layer],
    sites: Mapping[str, str],
    ranges: Mapping[str, TensorRange],
    hw: HardwareProfile,
    backend: str,
    *,
    model_name: str,
    batch_size: int,
    seed: int,
    smoothed: Mapping[str, float] | None = None,
    residual_adds: Sequence[onnx.NodeProto] = (),
) -> CompressionPlan:
    """Plan INT8 post-training quantization for ``backend`` on ``hw``.

    Args:
        layers: the inventory at ``batch_size``.
        sites: ONNX node -> the activation tensor its input Q/DQ pair sits on.
        ranges: calibration ranges of those tensors.
        hw: the target's hardware profile.
        backend: the backend the plan is for (the first the target prefers among those asked).
        smoothed: node -> SmoothQuant strength, for nodes whose inputs were smoothed.
        residual_adds: Add nodes joining quantized convolution branches; their inputs are
            quantized too when the backend runs the convolutions before them in INT8.
    """
    decisions = []
    for layer in layers:
        fp32_ms = _predicted_ms(hw, backend, layer, Option())
        decision = _decide(layer, sites, ranges, hw, backend, fp32_ms)
        if layer.node in (smoothed or {}) and decision.weight != FP32:
            decision = dataclasses.replace(
                decision, reason=decision.reason + "; input channel outliers smoothed into the "
                f"weight (strength {smoothed[layer.node]})"
            )
        decisions.append(decision)
    quantized = {d.onnx_node for d in decisions if d.weight != FP32}
    for index, add in enumerate(residual_adds):
        decisions.append(_decide_add(add, index, ranges, hw, backend, quantized))
    return CompressionPlan(
        model_name=model_name,
        target_id=hw.id,
        batch_size=batch_size,
        layers=tuple(decisions),
        seed=seed,
    )


def _decide(layer, sites, ranges, hw, backend, fp32_ms) -> LayerDecision:
    def keep(reason: str) -> LayerDecision:
        return LayerDecision(layer.name, layer.node, layer.kind, layer.weight_shape, layer.macs,
                             FP32, FP32, "none", reason, fp32_ms, fp32_ms)

    if not layer.eligible:
        return keep(f"kept fp32: {layer.why_not}")
    if layer.kind == "embedding":
        return keep("kept fp32: embedding table (a lookup, no GEMM): post-training INT8 quantizes "
                    "GEMMs and convolutions; weight-only tables are planned by the joint planner")
    site = ranges.get(sites.get(layer.node, ""))
    unsigned = site is not None and site.non_negative
    activation = ACT_UINT8 if unsigned else ACT_INT8
    if unsigned and not hw.accelerates(backend, layer.kind, WEIGHT_INT8, ACT_UINT8):
        activation = ACT_INT8
    if not hw.accelerates(backend, layer.kind, WEIGHT_INT8, activation):
        return keep(f"kept fp32: {backend} on {hw.id} has no INT8 kernel for {layer.kind}")
    int8_ms = _predicted_ms(hw, backend, layer, Option(WEIGHT_INT8, activation))
    gain = f" ({fp32_ms / int8_ms:.1f}x predicted)" if fp32_ms and int8_ms else ""
    why_act = "input never negative in calibration: uint8" if activation == ACT_UINT8 else "int8"
    reason = (
        f"int8: {backend} on {hw.id} runs INT8 {layer.kind} ({hw.architecture}){gain}; "
        f"activation {why_act}"
    )
    return LayerDecision(layer.name, layer.node, layer.kind, layer.weight_shape, layer.macs,
                         WEIGHT_INT8, activation, "none", reason, fp32_ms, int8_ms)


def _decide_add(add, index, ranges, hw, backend, quantized) -> LayerDecision:
    name = readable_name(add, index)
    schemes = []
    for tensor in add.input:
        unsigned = ranges[tensor].non_negative and hw.accelerates(
            backend, "conv2d", WEIGHT_INT8, ACT_UINT8)
        schemes.append(ACT_UINT8 if unsigned else ACT_INT8)
    if not any(hw.accelerates(backend, "conv2d", WEIGHT_INT8, s) for s in schemes):
        return LayerDecision(name, add.name, "add", (), 0, "none", FP32, "none",
                             f"kept fp32: {backend} on {hw.id} runs no INT8 convolution", None, None)
    return LayerDecision(
        name, add.name, "add", (), 0, "none", ",".join(schemes), "none",
        "int8 inputs: residual add between INT8 convolutions; keeps the residual stream in INT8 "
        "so the add fuses into the convolution before it", None, None,
    )
