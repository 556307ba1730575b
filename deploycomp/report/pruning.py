"""The report's "Pruning" section, from a run's ``pruning.json`` (runs compiled with --prune).

What it shows: how the amounts were chosen (one fraction, or planned under the latency target)
and trained (inside the joint loop with the quantizers, or with distillation before post-training
INT8); parameters, FLOPs (2 x MACs per sample) and engine sizes on disk before and after; the
predicted speedup over the unpruned fp32 model against the measured one, per backend, at the
planned batch size; per group its layers, units before and after, predicted saving, loss and
reason; per layer that lost channels its channels and MACs before and after, with the reason of
the groups it loses them to; and the groups the dependency graph refused, with the reason. The
latency and accuracy sections of the same report compare the engines with the fp32 baseline, the
unpruned model. Older records (without mode, layers, MACs or predictions) render what they hold.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from deploycomp.report.formatting import fmt_float, fmt_ms, fmt_speedup

# Per-group fields newer records add, with their column headers; a column shows when any group
# has a value.
GROUP_EXTRAS = (
    ("predicted_saving_ms", "predicted saving (ms)"), ("loss_increase", "loss increase"),
)  # fmt: skip
SI_PREFIXES = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
LAYER_COLUMNS = ("layer", "kind", "in channels", "out channels", "MACs (batch 1)", "reason")


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def _measured_speedups(latency: Sequence[Mapping[str, Any]], batch: int | None) -> dict:
    """Backend -> fp32 median / compiled median at ``batch``, from the report's latency entries."""
    return {
        e["backend"]: e["speedup_vs_fp32"]
        for e in latency
        if e["batch_size"] == batch and e.get("speedup_vs_fp32") is not None
    }


def pruning_section(
    record: dict[str, Any] | None,
    latency: Sequence[Mapping[str, Any]] = (),
    engine_bytes: Mapping[str, int] | None = None,
) -> dict[str, Any] | None:
    """The JSON report's ``pruning`` entry.

    Args:
        record: the run's ``pruning.json``; None for a run compiled without --prune.
        latency: the report's latency entries (:func:`~deploycomp.report.summary.latency_table`).
        engine_bytes: "backend/variant" -> bytes on disk of each built engine.

    Returns:
        The record plus ``flops_before``/``flops_after`` (2 x MACs per sample), ``engine_bytes``,
        ``predicted_speedup`` (predicted fp32 / pruned at its planned precisions, else pruned in
        fp32), ``predicted_pruning_speedup`` (fp32 / pruned fp32) and ``measured_speedup``
        (backend -> fp32 engine median / compiled engine median at the predicted batch size);
        None without a record. A value the record cannot give is None.

    Example:
        >>> pruning_section(record, report["latency"])["measured_speedup"]
        {'openvino': 3.78}
    """
    if not record:
        return None
    predicted = record.get("predicted") or {}
    compiled = predicted.get("compiled_ms") or predicted.get("pruned_fp32_ms")
    macs = (record.get("macs_before"), record.get("macs_after"))
    return {
        **record,
        "flops_before": 2 * macs[0] if macs[0] else None,
        "flops_after": 2 * macs[1] if macs[1] else None,
        "engine_bytes": dict(engine_bytes or {}),
        "predicted_speedup": _ratio(predicted.get("fp32_ms"), compiled),
        "predicted_pruning_speedup": _ratio(
            predicted.get("fp32_ms"), predicted.get("pruned_fp32_ms")
        ),
        "measured_speedup": _measured_speedups(latency, predicted.get("batch_size")),
    }


def _si(value: float, unit: str, like: float | None = None) -> str:
    """``value`` to three significant digits in the SI unit that suits ``like`` (itself by
    default), from a tenth of that unit up: ``_si(3.9e8, "FLOPs")`` -> ``"0.39 GFLOPs"``."""
    scale = value if like is None else like
    divisor, prefix = next(((d, p) for d, p in SI_PREFIXES if scale >= d / 10), (1.0, ""))
    return f"{value / divisor:.3g} {prefix}{unit}"


def _pair(before: float, after: float, unit: str) -> str:
    """Both values in the unit that suits ``before``: ``"0.39 GFLOPs -> 0.21 GFLOPs"``."""
    return f"{_si(before, unit)} -> {_si(after, unit, like=before)}"


def _how(section: dict[str, Any]) -> str:
    """How the amounts were chosen and trained, as one clause."""
    if section.get("mode") == "planned" or section.get("keep_fraction") is None:
        how = (
            "Each group's amount was planned under the latency target (multiples of "
            f"{section['channel_multiple']}; the group losing least per predicted millisecond "
            "first)"
        )
    else:
        how = (
            f"Kept {section['keep_fraction']:.0%} of every prunable group (rounded up to "
            f"multiples of {section['channel_multiple']})"
        )
    if section.get("joint"):
        return (
            f"{how}; the removed units were driven to zero inside the joint quantization-aware "
            f"training loop, with the quantizers, over {section['steps']} steps, then removed"
        )
    return (
        f"{how}; pruned, then trained {section['steps']} steps with distillation from the "
        "unpruned model, then quantized with post-training INT8"
    )


def _size_line(sizes: Mapping[str, int]) -> list[str]:
    """Each backend's compiled engine against its fp32 engine (the unpruned model), on disk."""
    parts = []
    for key in sorted(k for k in sizes if k.endswith("/compiled")):
        backend = key.split("/")[0]
        fp32 = sizes.get(f"{backend}/fp32")
        if fp32:
            parts.append(f"{backend} {_pair(fp32, sizes[key], 'B')} ({sizes[key] / fp32:.0%})")
        else:
            parts.append(f"{backend} {_si(sizes[key], 'B')} (no fp32 engine)")
    if not parts:
        return []
    return [
        (
            "Engine size on disk, fp32 engine of the unpruned model -> compiled engine: "
            f"{'; '.join(parts)}."
        )
    ]


def _summary(section: dict[str, Any]) -> list[str]:
    """The section's sentences, one a line."""
    before, after = section["params_before"], section["params_after"]
    lines = [f"{_how(section)}. Parameters: {before:,} -> {after:,} ({after / before:.0%})."]
    if section.get("flops_before") and section.get("flops_after"):
        lines.append(
            "FLOPs per sample (2 x MACs, batch 1): "
            f"{_pair(section['flops_before'], section['flops_after'], 'FLOPs')} "
            f"({section['flops_after'] / section['flops_before']:.0%})."
        )
    lines += _size_line(section.get("engine_bytes") or {})
    lines += _predicted_lines(section)
    lines.append("The fp32 baseline and the accuracy reference are the unpruned model.")
    return lines


def _predicted_lines(section: dict[str, Any]) -> list[str]:
    """The predicted speedup, and the measured one at the same batch size or why there is none."""
    predicted = section.get("predicted")
    if not predicted or section.get("predicted_speedup") is None:
        return []
    batch = predicted["batch_size"]
    if predicted.get("compiled_ms"):
        to = predicted["compiled_ms"]
        what = (
            "the pruned model at its planned precisions; pruning alone "
            f"{fmt_speedup(section.get('predicted_pruning_speedup'))}"
        )
    else:
        to, what = predicted["pruned_fp32_ms"], "the pruned model in fp32: pruning only"
    line = (
        f"Predicted speedup over the unpruned fp32 model at batch {batch}: "
        f"{fmt_speedup(section['predicted_speedup'])} ({fmt_ms(predicted['fp32_ms'])} -> "
        f"{fmt_ms(to)} ms, {what}; {predicted.get('source') or 'cost model'})."
    )
    measured = section.get("measured_speedup") or {}
    if not measured:
        return [
            line,
            (
                f"Not measured at batch {batch}: the run has no fp32 and compiled latency at "
                f"that batch size; compile with --batch-sizes {batch} to compare."
            ),
        ]
    parts = ", ".join(f"{backend} {fmt_speedup(v)}" for backend, v in sorted(measured.items()))
    source = "fp32 engine of the unpruned model / compiled engine"
    return [line, f"Measured at batch {batch} ({source}): {parts}."]


def _group_table(section: dict[str, Any]) -> tuple[list[str], list[list[Any]], str]:
    """Header, rows and alignment of the group table; the newer columns only where present."""
    groups = section["groups"]
    extras = [(k, h) for k, h in GROUP_EXTRAS if any(g.get(k) is not None for g in groups)]
    header = ["layers", "unit", "before", "after", *(h for _, h in extras), "reason"]
    rows = [
        [", ".join(g["members"]), g["unit"], g["before"], g["after"],
         *(fmt_float(g.get(k)) for k, _ in extras), g["reason"]]
        for g in groups
    ]  # fmt: skip
    return header, rows, "llrr" + "r" * len(extras)


def _holds(member: str, name: str) -> bool:
    """Layer ``name`` is group member ``member`` or inside it (the q/k/v of an attention module)."""
    return name == member or name.startswith(member + ".")


def _layer_reason(name: str, groups: Sequence[Mapping[str, Any]]) -> str:
    """The reasons of the groups that shrink layer ``name``."""
    return "; ".join(
        g["reason"]
        for g in groups
        if g["after"] != g["before"] and any(_holds(m, name) for m in g["members"])
    )


def _layer_rows(section: dict[str, Any]) -> tuple[list[list[Any]], int]:
    """One row per layer that lost channels, and the count of those that did not."""
    rows, unchanged = [], 0
    for layer in section.get("layers") or []:
        if (layer["in_before"], layer["out_before"]) == (layer["in_after"], layer["out_after"]):
            unchanged += 1
            continue
        rows.append([
            layer["name"], layer["kind"],
            f"{layer['in_before']} -> {layer['in_after']}",
            f"{layer['out_before']} -> {layer['out_after']}",
            f"{layer['macs_before']:,} -> {layer['macs_after']:,}",
            _layer_reason(layer["name"], section["groups"]),
        ])  # fmt: skip
    return rows, unchanged


def _layers_title(unchanged: int) -> str:
    return f"Layers that lost channels ({unchanged} unchanged):"


def pruning_lines(section: dict[str, Any] | None, table: Callable) -> list[str]:
    """The Markdown rendering; ``table(header, rows, align)`` is the Markdown table helper."""
    if not section:
        return []
    lines = ["## Pruning", "", *_summary(section), "", *table(*_group_table(section))]
    rows, unchanged = _layer_rows(section)
    if rows:
        lines += ["", _layers_title(unchanged), "", *table(LAYER_COLUMNS, rows)]
    if section["refused"]:
        lines += ["", "Not pruned:"]
        lines += [f"- {name}: {why}" for name, why in section["refused"].items()]
    return lines


def pruning_html(section: dict[str, Any] | None, table: Callable) -> str:
    """The HTML rendering; ``table(header, rows, align)`` is the page's table helper."""
    if not section:
        return ""
    parts = ["<h2>Pruning</h2>"]
    parts += [f"<p>{html.escape(line)}</p>" for line in _summary(section)]
    parts.append(table(*_group_table(section)))
    rows, unchanged = _layer_rows(section)
    if rows:
        parts += [f"<p>{_layers_title(unchanged)}</p>", table(LAYER_COLUMNS, rows)]
    if section["refused"]:
        items = "".join(
            f"<li>{html.escape(name)}: {html.escape(why)}</li>"
            for name, why in section["refused"].items()
        )
        parts.append(f"<p>Not pruned:</p><ul>{items}</ul>")
    return "".join(parts)
