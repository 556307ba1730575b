"""The report's Pruning section: FLOPs, engine sizes, predicted against measured speedup, the
per-layer table with each layer's group change, and older records without those fields."""

from __future__ import annotations

from deploycomp.report.html import _table
from deploycomp.report.markdown import table
from deploycomp.report.pruning import pruning_html, pruning_lines, pruning_section

GROUPS = [
    {"members": ["conv1", "bn1", "conv2"], "unit": "channel", "before": 32, "after": 16,
     "reason": "32 -> 16 channels (planned; predicted -0.0186 ms)",
     "predicted_saving_ms": 0.0186, "loss_increase": 0.0654},
    {"members": ["enc.attn", "enc.attn.out"], "unit": "head", "before": 12, "after": 12,
     "reason": "12 -> 12 heads (planned)", "predicted_saving_ms": 0.0, "loss_increase": 0.0},
]  # fmt: skip
LAYERS = [
    {"name": "conv1", "kind": "conv2d", "in_before": 3, "in_after": 3, "out_before": 32,
     "out_after": 16, "macs_before": 2000, "macs_after": 1000},
    {"name": "conv2", "kind": "conv2d", "in_before": 32, "in_after": 16, "out_before": 64,
     "out_after": 64, "macs_before": 8000, "macs_after": 4000},
    {"name": "enc.attn.query", "kind": "linear", "in_before": 64, "in_after": 64,
     "out_before": 64, "out_after": 64, "macs_before": 500, "macs_after": 500},
]  # fmt: skip
RECORD = {
    "mode": "planned", "keep_fraction": None, "joint": True, "channel_multiple": 16,
    "steps": 300, "params_before": 1000, "params_after": 400, "macs_before": 60_000_000,
    "macs_after": 30_000_000, "groups": GROUPS, "layers": LAYERS,
    "refused": {"fc": "its outputs reach the model output"},
    "predicted": {"batch_size": 64, "fp32_ms": 0.4, "pruned_fp32_ms": 0.2, "compiled_ms": 0.1,
                  "source": "roofline"},
}  # fmt: skip
LATENCY = [
    {"backend": "openvino", "batch_size": 64, "fp32": {"median_ms": 3.0},
     "compiled": {"median_ms": 0.75}},
    {"backend": "openvino", "batch_size": 1, "fp32": {"median_ms": 1.0},
     "compiled": {"median_ms": 0.9}},
]  # fmt: skip
SIZES = {"openvino/compiled": 200_000, "openvino/fp32": 1_600_000}


def test_section_computes_flops_sizes_and_both_speedups():
    section = pruning_section(RECORD, LATENCY, SIZES)
    assert section["flops_before"] == 120_000_000 and section["flops_after"] == 60_000_000
    assert section["predicted_speedup"] == 4.0
    assert section["measured_speedup"] == {"openvino": 4.0}  # batch 64 only
    assert section["engine_bytes"] == SIZES


def test_markdown_shows_predicted_against_measured_and_changed_layers_only():
    text = "\n".join(pruning_lines(pruning_section(RECORD, LATENCY, SIZES), table))
    assert "planned under the latency target" in text and "inside joint compression" in text
    assert "0.120 GFLOPs -> 0.060 GFLOPs (50%)" in text
    assert "Engine size on openvino: 0.20 MB (fp32 engine of the unpruned model: 1.60 MB, 12%)" in text
    assert "Predicted speedup over the unpruned fp32 model at batch 64: 4.00x" in text
    assert "Measured at batch 64 (fp32 engine / compiled engine): openvino 4.00x" in text
    assert "Layers that lost channels (1 unchanged)" in text
    assert "| conv2 | conv2d | 32 -> 16 | 64 -> 64 | 8,000 -> 4,000 | 32 -> 16 channels |" in text
    assert "enc.attn.query |" not in text
    assert "- fc: its outputs reach the model output" in text


def test_missing_measurement_is_said_plainly():
    text = "\n".join(pruning_lines(pruning_section(RECORD, LATENCY[1:], {}), table))
    assert "Not measured at batch 64: compile with --batch-sizes 64" in text


def test_an_older_record_still_renders():
    old = {"keep_fraction": 0.5, "channel_multiple": 16, "steps": 20, "params_before": 1000,
           "params_after": 300, "groups": [dict(GROUPS[0], reason="32 -> 16 channels")],
           "refused": {}}  # fmt: skip
    section = pruning_section(old)
    text = "\n".join(pruning_lines(section, table))
    assert "Kept 50% of every prunable group" in text and "then quantized" in text
    assert "FLOPs" not in text and "Predicted" not in text
    page = pruning_html(section, _table)
    assert "<h2>Pruning</h2>" in page and "Kept 50%" in page
