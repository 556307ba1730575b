"""The report's three plots, each returned as a ``data:image/png;base64,...`` URI for embedding in a
self-contained HTML page: latency per backend and batch size (fp32, default precision, compiled;
grouped bars with p90 whiskers), accuracy per eval set (fp32 vs compiled), and the per-layer
precision map. Figures are built with the object API (``matplotlib.figure.Figure``) and rendered by
the Agg canvas, so no global matplotlib state (pyplot, the default backend) is touched.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from deploycomp.report.formatting import fmt_speedup

VARIANT_COLORS = {"fp32": "#8c8c8c", "default_precision": "#4c78a8", "compiled": "#f58518"}
VARIANT_NAMES = {"fp32": "fp32", "default_precision": "default precision", "compiled": "compiled"}
SCHEME_COLORS = {
    "fp32": "#a6a6a6",
    "fp16": "#c6dbef",
    "bf16": "#9ecae1",
    "int8": "#f58518",
    "uint8": "#54a24b",
    "int4": "#e45756",
    "2:4": "#b279a2",
    "none": "#f2f2f2",
}


def _figure(width_in: float, height_in: float) -> Any:
    # Imported here so that building the JSON or Markdown report never loads matplotlib.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _to_data_uri(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def latency_plot(latency: list[dict[str, Any]]) -> str | None:
    """Grouped bars of median latency, one panel per batch size, whiskers up to p90.

    Args:
        latency: the report's ``latency`` entries.

    Returns:
        A PNG data URI, or ``None`` when there is nothing to plot.
    """
    batch_sizes = sorted({e["batch_size"] for e in latency})
    if not batch_sizes:
        return None
    figure = _figure(max(4.0, 3.2 * len(batch_sizes)), 3.4)
    axes = figure.subplots(1, len(batch_sizes), squeeze=False)[0]
    measured_on = sorted({e["measured_on"] for e in latency})
    width = 0.8 / 3
    for ax, batch_size in zip(axes, batch_sizes):
        entries = [e for e in latency if e["batch_size"] == batch_size]
        for offset, variant in enumerate(VARIANT_COLORS):
            xs, medians_ms, whiskers_ms = [], [], []
            for x, entry in enumerate(entries):
                stats = entry[variant]
                if stats is not None:
                    xs.append(x + (offset - 1) * width)
                    medians_ms.append(stats["median_ms"])
                    whiskers_ms.append(max(stats["p90_ms"] - stats["median_ms"], 0.0))
            bars = ax.bar(
                xs, medians_ms, width, yerr=[[0.0] * len(xs), whiskers_ms], capsize=3,
                color=VARIANT_COLORS[variant], label=VARIANT_NAMES[variant],
            )  # fmt: skip
            if variant == "compiled":
                _label_speedups(ax, bars, [e for e in entries if e["compiled"] is not None])
        ax.set_xticks(range(len(entries)), [e["backend"] for e in entries])
        ax.set_title(f"batch {batch_size}")
        ax.set_ylabel("median latency (ms), whisker p90")
    axes[0].legend(fontsize="small")
    figure.suptitle(f"measured on {', '.join(measured_on)}", fontsize="small")
    return _to_data_uri(figure)


def _label_speedups(ax: Any, bars: Any, entries: list[dict[str, Any]]) -> None:
    labels = [fmt_speedup(e["speedup_vs_fp32"]) for e in entries]
    texts = ax.bar_label(bars, labels, padding=8, fontsize="small")
    for text, entry in zip(texts, entries):
        if entry["speedup_vs_fp32"] is not None and entry["speedup_vs_fp32"] < 1.0:
            text.set_color("#a4281b")
            text.set_fontweight("bold")
    ax.margins(y=0.15)


def accuracy_plot(accuracy: list[dict[str, Any]]) -> str | None:
    """Bars of fp32 vs compiled per eval set and backend: the task metric on labelled sets, top-1
    agreement with fp32 on unlabelled ones.

    Args:
        accuracy: the report's ``accuracy`` entries.

    Returns:
        A PNG data URI, or ``None`` when there is nothing to plot.
    """
    eval_sets = list(dict.fromkeys(e["eval_set"] for e in accuracy))
    if not eval_sets:
        return None
    figure = _figure(max(4.0, 3.2 * len(eval_sets)), 3.2)
    axes = figure.subplots(1, len(eval_sets), squeeze=False)[0]
    for ax, eval_set in zip(axes, eval_sets):
        entries = [e for e in accuracy if e["eval_set"] == eval_set]
        labelled = entries[0]["labelled"]
        lowest_pct = 100.0
        for offset, variant in enumerate(("fp32", "compiled")):
            xs, values_pct = [], []
            for x, entry in enumerate(entries):
                if labelled:
                    value = entry["fp32_value"] if variant == "fp32" else entry["compiled_value"]
                else:
                    value = 1.0 if variant == "fp32" else entry["top1_agreement"]
                if value is not None:
                    xs.append(x + (offset - 0.5) * 0.4)
                    values_pct.append(value * 100.0)
            bars = ax.bar(xs, values_pct, 0.4, color=VARIANT_COLORS[variant], label=variant)
            ax.bar_label(bars, [f"{v:.1f}" for v in values_pct], fontsize="x-small")
            lowest_pct = min([lowest_pct, *values_pct])
        ax.set_xticks(range(len(entries)), [e["backend"] for e in entries])
        # Zoomed to the values: on a 0-100 axis a drop of a few tenths of a point is invisible.
        ax.set_ylim(max(0.0, lowest_pct - 5.0), 101.0)
        metric = entries[0]["metric"] if labelled else "top-1 agreement with fp32"
        ax.set_title(f"{eval_set}" + ("" if labelled else " (unlabelled)"), fontsize="medium")
        ax.set_ylabel(f"{metric} (%)")
    axes[0].legend(fontsize="small", loc="best")
    return _to_data_uri(figure)


def scheme_family(scheme: str) -> str:
    """``int8_sym_per_channel`` -> ``int8``, ``uint8_per_tensor`` -> ``uint8``, ``2:4`` -> same."""
    return scheme.split("_", 1)[0]


def precision_map_plot(rows: list[dict[str, Any]]) -> str | None:
    """A strip per decision (weight, activation, sparsity) with one cell per layer, coloured by the
    scheme family (fp32, int8, uint8, int4, 2:4).

    Args:
        rows: the report's per-layer rows (``layers["rows"]``).

    Returns:
        A PNG data URI, or ``None`` when the plan has no layers.
    """
    if not rows:
        return None
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    strips = ("weight", "activation", "sparsity")
    families = list(dict.fromkeys(scheme_family(r[s]) for s in strips for r in rows))
    colors = [SCHEME_COLORS.get(f, "#72b7b2") for f in families]
    grid = [[families.index(scheme_family(r[s])) for r in rows] for s in strips]
    figure = _figure(
        min(max(5.0, 0.22 * len(rows) + 2.0), 16.0), 2.2 + (1.2 if len(rows) <= 40 else 0)
    )
    ax = figure.subplots()
    ax.imshow(
        grid, aspect="auto", interpolation="nearest", cmap=ListedColormap(colors),
        vmin=-0.5, vmax=len(families) - 0.5,
    )  # fmt: skip
    ax.set_yticks(range(len(strips)), strips)
    if len(rows) <= 40:
        ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=90, fontsize="x-small")
    else:
        ax.set_xlabel(f"layer index (0 to {len(rows) - 1})")
    handles = [Patch(color=c, label=f) for f, c in zip(families, colors)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    ax.set_title("per-layer precision")
    return _to_data_uri(figure)
