"""The report's "Pruning" section, from a run's ``pruning.json`` (runs compiled with --prune).

What it shows: how the amounts were chosen (one fraction, or planned under the latency target)
and trained (inside the joint loop with the quantizers, or before post-training INT8); parameters,
FLOPs (2 x MACs per sample) and engine sizes before and after; the predicted speedup over the
unpruned fp32 model against the measured one, per backend, at the planned batch size; per group
its layers, units before and after, the reason, predicted saving and loss; per layer that lost
channels its channels and MACs before and after; and the groups the dependency graph refused,
with the reason. The latency and accuracy sections of the same report compare the engines with
the fp32 baseline, the unpruned model. Older records (without layers or predictions) render what
they hold.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from typing import Any

GROUP_COLUMNS = ("layers", "unit", "before", "after", "predicted saving (ms)", "loss increase",
                 "reason")  # fmt: skip
LAYER_COLUMNS = ("layer", "kind", "in channels", "out channels", "MACs", "reason")


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def _measured_speedups(latency: Sequence[Mapping[str, Any]], batch: int | None) -> dict:
    """Backend -> fp32 median / compiled median at ``batch`` (the report's latency entries)."""
    out = {}
    for entry in latency:
        if entry["batch_size"] == batch and entry.get("fp32") and entry.get("compiled"):
            out[entry["backend"]] = entry["fp32"]["median_ms"] / entry["compiled"]["median_ms"]
    return out


def pruning_section(
    record: dict[str, Any] | None,
    latency: Sequence[Mapping[str, Any]] = (),
    engine_bytes: Mapping[str, int] | None = None,
) -> dict[str, Any] | None:
    """The JSON report's ``pruning`` entry: the record plus ``flops_before``/``flops_after``,
    ``engine_bytes`` ("backend/variant" -> bytes), ``predicted_speedup`` and
    ``measured_speedup`` (backend -> fp32 / compiled at the predicted batch size); None without
    a record."""
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
        "measured_speedup": _measured_speedups(latency, predicted.get("batch_size")),
    }


def _flops(before: float, after: float) -> str:
    """Both counts in the unit that suits ``before``."""
    scale, unit, digits = (1e9, "GFLOPs", 3) if before >= 1e8 else (1e6, "MFLOPs", 2)
    return f"{before / scale:.{digits}f} {unit} -> {after / scale:.{digits}f} {unit}"


def _summary(section: dict[str, Any]) -> list[str]:
    """The section's sentences, one a line."""
    if section.get("keep_fraction") is not None:
        how = (
            f"Kept {section['keep_fraction']:.0%} of every prunable group (rounded up to "
            f"multiples of {section['channel_multiple']})"
        )
    else:
        how = (
            "Each group's amount was planned under the latency target (multiples of "
            f"{section['channel_multiple']}; the group losing least per predicted millisecond "
            "first)"
        )
    if section.get("joint"):
        trained = (
            f"the channels were driven to zero inside joint compression, with the quantizers, "
            f"then removed, over {section['steps']} training steps"
        )
    else:
        trained = (
            f"trained {section['steps']} steps with distillation from the unpruned model, then "
            "quantized"
        )
    before, after = section["params_before"], section["params_after"]
    lines = [
        f"{how}; {trained}. Parameters: {before:,} -> {after:,} ({after / before:.0%}).",
    ]
    if section.get("flops_before") and section.get("flops_after"):
        lines.append(
            f"FLOPs per sample: {_flops(section['flops_before'], section['flops_after'])} "
            f"({section['flops_after'] / section['flops_before']:.0%})."
        )
    sizes = section.get("engine_bytes") or {}
    for key in sorted(k for k in sizes if k.endswith("/compiled")):
        backend = key.split("/")[0]
        fp32 = sizes.get(f"{backend}/fp32")
        text = f"Engine size on {backend}: {sizes[key] / 1e6:.2f} MB"
        if fp32:
            text += f" (fp32 engine of the unpruned model: {fp32 / 1e6:.2f} MB, {sizes[key] / fp32:.0%})"
        lines.append(text + ".")
    lines.extend(_predicted_lines(section))
    lines.append("The fp32 baseline and the accuracy reference are the unpruned model.")
    return lines


def _predicted_lines(section: dict[str, Any]) -> list[str]:
    predicted = section.get("predicted")
    if not predicted or section.get("predicted_speedup") is None:
        return []
    batch = predicted["batch_size"]
    line = (
        f"Predicted speedup over the unpruned fp32 model at batch {batch}: "
        f"{section['predicted_speedup']:.2f}x ({predicted['fp32_ms']:.4f} -> "
        f"{predicted.get('compiled_ms') or predicted['pruned_fp32_ms']:.4f} ms; "
        f"{predicted.get('source', 'cost model')})."
    )
    measured = section.get("measured_speedup") or {}
    if measured:
        parts = ", ".join(f"{backend} {value:.2f}x" for backend, value in sorted(measured.items()))
        return [line, f"Measured at batch {batch} (fp32 engine / compiled engine): {parts}."]
    return [line, f"Not measured at batch {batch}: compile with --batch-sizes {batch} to compare."]


def _fmt(value: Any) -> Any:
    return "" if value is None else (f"{value:.4f}" if isinstance(value, float) else value)


def _group_rows(section: dict[str, Any]) -> list[list[Any]]:
    return [
        [", ".join(g["members"]), g["unit"], g["before"], g["after"],
         _fmt(g.get("predicted_saving_ms")), _fmt(g.get("loss_increase")), g["reason"]]
        for g in section["groups"]
    ]  # fmt: skip


def _group_reason(name: str, groups: Sequence[Mapping[str, Any]]) -> str:
    """The changes of the groups that hold layer ``name`` (or its attention module), e.g.
    "32 -> 16 channels"; the group table gives each one's full reason."""
    reasons = [
        g["reason"].split(" (")[0]
        for g in groups
        if g["after"] != g["before"]
        and any(name == m or name.startswith(m + ".") for m in g["members"])
    ]
    return "; ".join(reasons)


def _layer_rows(section: dict[str, Any]) -> tuple[list[list[Any]], int]:
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
            _group_reason(layer["name"], section["groups"]),
        ])  # fmt: skip
    return rows, unchanged


def pruning_lines(section: dict[str, Any] | None, table: Callable) -> list[str]:
    """The Markdown rendering; ``table(header, rows, align)`` is the Markdown table helper."""
    if not section:
        return []
    lines = ["## Pruning", "", *_summary(section), "", *table(GROUP_COLUMNS, _group_rows(section))]
    rows, unchanged = _layer_rows(section)
    if rows:
        lines += ["", f"Layers that lost channels ({unchanged} unchanged):", ""]
        lines += table(LAYER_COLUMNS, rows)
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
    parts.append(table(GROUP_COLUMNS, _group_rows(section)))
    rows, unchanged = _layer_rows(section)
    if rows:
        parts.append(f"<p>Layers that lost channels ({unchanged} unchanged):</p>")
        parts.append(table(LAYER_COLUMNS, rows))
    if section["refused"]:
        items = "".join(
            f"<li>{html.escape(name)}: {html.escape(why)}</li>"
            for name, why in section["refused"].items()
        )
        parts.append(f"<p>Not pruned:</p><ul>{items}</ul>")
    return "".join(parts)
