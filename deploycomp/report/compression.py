"""The report's compression section: budget, training rounds, predicted against measured speedup,
and joint against sequential training, from ``compression.json`` (written by the compression stage;
absent for post-training INT8 runs, where the section is omitted).
"""

from __future__ import annotations

import html
from typing import Any

from deploycomp.artifacts import CompressionPlan
from deploycomp.report.formatting import fmt_value


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def compression_section(
    compression: dict[str, Any] | None,
    plan: CompressionPlan | None,
    latency: list[dict[str, Any]],
    plan_backend: str | None,
) -> dict[str, Any] | None:
    """Summarise ``compression.json`` against the measured latency of the plan's backend.

    Returns:
        None without compression; else ``budget``, ``mode``, ``steps``, ``rounds`` (each with its
        accuracy and what was backed off), ``predicted_speedup`` (fp32 / plan, summed over
        layers, from the cost model), ``measured`` (per latency entry of the plan's backend at the
        plan's batch size: the compiled engine's measured speedup over fp32), ``comparison``
        (joint against sequential, when asked) and ``export_checks``.
    """
    if not compression:
        return None
    rounds = compression.get("rounds") or []
    last = rounds[-1] if rounds else {}
    predicted = None
    if last.get("predicted_ms") and last.get("fp32_predicted_ms"):
        predicted = last["fp32_predicted_ms"] / last["predicted_ms"]
    size_fraction = None
    if last.get("weight_bytes") and last.get("fp32_weight_bytes"):
        size_fraction = last["weight_bytes"] / last["fp32_weight_bytes"]
    batch = plan.batch_size if plan else None
    measured = [
        {
            "backend": e["backend"],
            "batch_size": e["batch_size"],
            "speedup_vs_fp32": e["speedup_vs_fp32"],
        }
        for e in latency
        if e["backend"] == plan_backend and e["batch_size"] == batch
    ]
    return {
        "budget": compression.get("budget", {}),
        "mode": compression.get("mode"),
        "steps": compression.get("steps"),
        "training_samples": compression.get("training_samples"),
        "sensitivity_method": compression.get("sensitivity_method"),
        "rounds": rounds,
        "predicted_speedup": predicted,
        "predicted_weight_fraction": size_fraction,
        "plan_batch_size": batch,
        "plan_backend": plan_backend,
        "measured": measured,
        "measured_options": len(compression.get("measured_options") or []),
        "comparison": compression.get("comparison"),
        "export_checks": compression.get("export_checks", {}),
    }


def _budget_text(budget: dict[str, Any]) -> str:
    parts = []
    if budget.get("latency_target") is not None:
        parts.append(f"latency <= {budget['latency_target']:.0%} of fp32 (predicted)")
    if budget.get("size_target") is not None:
        parts.append(f"weights <= {budget['size_target']:.0%} of fp32")
    if budget.get("max_accuracy_drop") is not None:
        parts.append(f"accuracy drop <= {budget['max_accuracy_drop']} points")
    return "; ".join(parts) or "none (fastest plan the target accelerates)"


def summary_sentences(section: dict[str, Any]) -> list[str]:
    """Plain sentences shared by the Markdown and HTML renderings."""
    out = [
        (
            f"Budget: {_budget_text(section['budget'])}. Training: {section['mode']}, "
            f"{section['steps']} steps on {fmt_value(section['training_samples'])} unlabelled "
            f"samples, distilled from the fp32 model. Sensitivity: {section['sensitivity_method']}."
        )
    ]
    if section.get("measured_options"):
        out.append(
            f"Before planning, {section['measured_options']} layer options (linear and embedding "
            f"shapes) were timed on {section['plan_backend']} on this machine; the plan prices "
            "those layers with the measurements, the others with the roofline."
        )
    if section["predicted_speedup"] is not None:
        text = (
            f"Predicted speedup over fp32 (cost model, plan batch {section['plan_batch_size']}"
            f"): {section['predicted_speedup']:.2f}x"
        )
        for m in section["measured"]:
            if m["speedup_vs_fp32"] is not None:
                text += f"; measured on {m['backend']}: {m['speedup_vs_fp32']:.2f}x"
        if section["predicted_weight_fraction"] is not None:
            text += (
                f". Weights: {section['predicted_weight_fraction']:.0%} of the fp32 bytes "
                "of the planned layers"
            )
        out.append(text + ".")
    return out


def round_rows(section: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    header = ["round", "compressed layers", "accuracy", "fp32", "drop (points)", "backed off"]
    rows = []
    for r in section["rounds"]:
        compressed = sum(1 for key in r["plan"].values() if key != "fp32")
        drop = r.get("accuracy_drop_points")
        rows.append(
            [
                r["round"],
                f"{compressed} of {len(r['plan'])}",
                _points(r.get("accuracy")),
                _points(r.get("fp32_accuracy")),
                "n/a" if drop is None else f"{drop:.2f}",
                ", ".join(r.get("backed_off") or []) or "-",
            ]
        )
    return header, rows


def comparison_rows(section: dict[str, Any]) -> tuple[list[str], list[list[Any]]] | None:
    comparison = section.get("comparison")
    if not comparison:
        return None
    header = ["training", "accuracy", "drop (points)", "final distillation loss"]
    fp32 = comparison.get("fp32_accuracy")
    rows = []
    for mode in ("joint", "sequential"):
        entry = comparison.get(mode) or {}
        acc = entry.get("accuracy")
        drop = None if acc is None or fp32 is None else 100 * (fp32 - acc)
        rows.append(
            [
                mode,
                _points(acc),
                "n/a" if drop is None else f"{drop:.2f}",
                fmt_value(entry.get("final_loss")),
            ]
        )
    return header, rows


def compression_html(section: dict[str, Any] | None, table) -> str:
    """The HTML rendering; ``table(header, rows, align)`` is the page's table helper."""
    if not section:
        return ""
    parts = ["<h2>Compression</h2>"]
    parts += [f"<p>{html.escape(s)}</p>" for s in summary_sentences(section)]
    header, rows = round_rows(section)
    parts.append(table(header, rows, "rlrrrl"))
    comparison = comparison_rows(section)
    if comparison:
        parts.append(f"<h3>Joint against sequential, {section['steps']} steps each</h3>")
        parts.append(table(*comparison, "lrrr"))
    return "".join(parts)


def compression_lines(section: dict[str, Any] | None, table) -> list[str]:
    """The Markdown rendering; ``table(header, rows, align)`` is the Markdown table helper."""
    if not section:
        return []
    lines = ["## Compression", "", *summary_sentences(section), ""]
    header, rows = round_rows(section)
    lines += table(header, rows, "rlrrrl")
    comparison = comparison_rows(section)
    if comparison:
        lines += [
            "",
            f"Joint against sequential training of the same plan, {section['steps']} steps each:",
            "",
            *table(*comparison, "lrrr"),
        ]
    return lines
