"""Activation smoothing for linear layers (SmoothQuant, Xiao et al. 2023).

Transformer activations such as LayerNorm outputs carry a few channels with values far beyond the
rest; one per-tensor INT8 scale then wastes its range on them. Smoothing divides each input channel
``j`` by ``s_j = max|X_j|^a / max|W_j|^(1-a)`` (a Mul node before the Q/DQ pair) and multiplies
row ``j`` of every consuming weight by ``s_j``: the product is unchanged in exact arithmetic, and
the difficulty moves from the activation to the (per-channel quantized) weights. It applies to
sites whose every quantized consumer is a MatMul with a constant ``[K, N]`` weight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from deploycomp.export.calibrate import probe_session
from deploycomp.modelspec import Batch
from deploycomp.plan.inventory import Layer

# Candidate migration strengths; None leaves a site unsmoothed. Each site takes the candidate
# whose quantized products are closest to the fp32 products on calibration rows: on MiniLM-L6
# LayerNorm outputs take 0.9 and attention outputs stay unsmoothed (smoothing them at 0.9 cost
# 0.5 points of accuracy on 1,000 tweets).
ALPHA_CANDIDATES = (None, 0.5, 0.75, 0.9)
ROWS_PER_BATCH = 64


@dataclasses.dataclass(frozen=True)
class ChannelStats:
    """Per calibration batch: max |x| per channel (last axis), and a random sample of rows."""

    absmax: list[np.ndarray]
    rows: list[np.ndarray]

    def absmax_over(self, indices: Sequence[int] | None = None) -> np.ndarray:
        chosen = self.absmax if indices is None else [self.absmax[i] for i in indices]
        return np.max(chosen, axis=0)


def channel_statistics(
    model: onnx.ModelProto, tensors: Sequence[str], batches: Sequence[Batch], seed: int = 0
) -> dict[str, ChannelStats]:
    """Per-channel maxima and sampled rows of ``tensors``, batch by batch."""
    session = probe_session(model, tensors)
    rng = np.random.default_rng(seed)
    stats = {name: ChannelStats([], []) for name in tensors}
    for batch in batches:
        for name, value in zip(tensors, session.run(list(tensors), batch)):
            flat = value.reshape(-1, value.shape[-1])
            stats[name].absmax.append(np.abs(flat).max(axis=0))
            take = rng.choice(flat.shape[0], min(ROWS_PER_BATCH, flat.shape[0]), replace=False)
            stats[name].rows.append(flat[take])
    return stats


def smoothing_scales(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """``s_j = max|X_j|^a / max|W_j|^(1-a)``, clipped to [1e-4, 1e4]."""
    s = np.power(np.maximum(act_absmax, 1e-5), alpha) / np.power(
        np.maximum(weight_absmax, 1e-5), 1 - alpha)
    return np.clip(s, 1e-4, 1e4)


def _fake_quant(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x / scale), -127, 127) * scale


def _relative_error(rows, act_absmax, weights, scales, unsigned: bool) -> float:
    """Relative squared error of the INT8 products, quantized as the exporter will (uint8 for a
    never-negative input, else int8; weights per output channel)."""
    x = rows / scales
    levels = 255.0 if unsigned else 127.0
    x_scale = max(float((act_absmax / scales).max()), 1e-12) / levels
    xq = np.clip(np.round(x / x_scale), 0 if unsigned else -128, levels) * x_scale
    err = ref_norm = 0.0
    for w in weights:
        ws = w * scales[:, None]
        wq = _fake_quant(ws, np.maximum(np.abs(ws).max(axis=0), 1e-12) / 127.0)
        ref = rows @ w
        err += float(np.sum((xq @ wq - ref) ** 2))
        ref_norm += float(np.sum(ref**2))
    return err / max(ref_norm, 1e-30)


def choose_alphas(
    model: onnx.ModelProto,
    groups: Mapping[str, list[Layer]],
    stats: Mapping[str, ChannelStats],
) -> dict[str, float]:
    """Per site, the smoothing strength that minimises the INT8 product error (omitted: none).

    Ranges and scales come from the even calibration batches, the error from rows of the odd
    ones: strong smoothing equalises the channel maxima seen in calibration, and values beyond
    them on new data are clipped, which an in-sample error would not show.
    """
    inits = {i.name: i for i in model.graph.initializer}
    chosen = {}
    for site, group in groups.items():
        st = stats[site]
        n = len(st.absmax)
        fit, held = (range(0, n, 2), range(1, n, 2)) if n >= 2 else (range(n), range(n))
        a = st.absmax_over(fit).astype(np.float64)
        weights = [numpy_helper.to_array(inits[la.weight]).astype(np.float64) for la in group]
        if any(w.shape[0] != a.shape[0] for w in weights):
            continue
        w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        x = np.concatenate([st.rows[i] for i in held]).astype(np.float64)
        unsigned = bool(min(r.min() for r in st.rows) >= 0)
        errors = {
            alpha: _relative_error(x, a, weights, np.ones_like(a) if alpha is None
                                   else smoothing_scales(a, w_max, alpha), unsigned)
            for alpha in ALPHA_CANDIDATES
        }
        best = min(errors, key=lambda k: errors[k])
        if best is not None:
            chosen[site] = best
    return chosen


def smoothable_sites(
    layers: Sequence[Layer], sites: Mapping[str, str]
) -> dict[str, list[Layer]]:
    """Site tensor -> its quantized consumers, for sites fed only to MatMuls with [K, N] weights."""
    groups: dict[str, list[Layer]] = {}
    for layer in layers:
        groups.setdefault(sites[layer.node], []).append(layer)
    return {
        site: group for site, group in groups.items()
        if all(la.op_type == "MatMul" and len(la.weight_shape) == 2 for la in group)
    }


def smooth(
    model: onnx.ModelProto,
    groups: Mapping[str, list[Layer]],
    stats: Mapping[str, ChannelStats],
    alphas: Mapping[str, float],
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Return the graph with the sites in ``alphas`` smoothed, and each one's new site tensor."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    new_sites: dict[str, str] = {}
    smooth_nodes: dict[str, onnx.NodeProto] = {}
    for site, alpha in alphas.items():
        group = groups[site]
        weights = [numpy_helper.to_array(inits[la.weight]).astype(np.float64) for la in group]
        w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        s = smoothing_scales(stats[site].absmax_over().astype(np.float64), w_max, alpha)
        for la, w in zip(group, weights):
            inits[la.weight].CopyFrom(
                numpy_helper.from_array((w * s[:, None]).astype(np.float32), la.weight))
        base = site.strip("/").replace("/", "_")
        inverse = f"{base}_smooth_inverse_scale"
        out.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32),
                                                             inverse))
        new_sites[site] = f"{base}_smoothed"
        smooth_nodes[site] = helper.make_node("Mul", [site, inverse], [new_sites[site]],
                                              name=f"{base}_Smooth")
    site_of = {la.node: site for site in new_sites for la in groups[site]}
    nodes, emitted = [], set()
    for node in out.graph.node:
        site = site_of.get(node.name)
        if site is not None:
            if site not in emitted:
                nodes.append(smooth_nodes[site])
                emitted.add(site)
            for idx, name in enumerate(node.input):
                if name == site:
                    node.input[idx] = new_sites[site]
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out, new_sites
