"""Tests of the report's Pruning section on realistic records: a CNN whose channel amounts were
planned under a latency target and pruned inside the joint loop, a transformer layer with a fixed
fraction of its heads removed, and an older record (before modes, layers, MACs and predictions);
against latency entries as the report computes them and engine sizes as the loader measures them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from deploycomp.artifacts import (
    Engine,
    LatencyRow,
    LatencyStats,
    MeasurementResult,
    write_json_atomic,
)
from deploycomp.report import build_report, render_markdown
from deploycomp.report.html import _table, render_html
from deploycomp.report.markdown import table
from deploycomp.report.pruning import pruning_html, pruning_lines, pruning_section
from deploycomp.report.summary import latency_table

PLANNED = "planned for 30% of fp32 latency; lowest group L2 norm removed"
CNN_GROUPS = [
    {"members": ["features.0", "features.1", "features.3"], "unit": "channel", "before": 32,
     "after": 16, "reason": f"32 -> 16 channels ({PLANNED}; predicted -0.0186 ms, KL +0.0654)",
     "predicted_saving_ms": 0.0186, "loss_increase": 0.0654},
    {"members": ["classifier.1", "features.3", "features.4"], "unit": "channel", "before": 64,
     "after": 32, "reason": f"64 -> 32 channels ({PLANNED}; predicted -0.0412 ms, KL +0.1210)",
     "predicted_saving_ms": 0.0412, "loss_increase": 0.121},
]  # fmt: skip
CNN_LAYERS = [
    {"name": "features.0", "kind": "conv2d", "in_before": 1, "in_after": 1, "out_before": 32,
     "out_after": 16, "macs_before": 225_792, "macs_after": 112_896},
    {"name": "features.3", "kind": "conv2d", "in_before": 32, "in_after": 16, "out_before": 64,
     "out_after": 32, "macs_before": 3_612_672, "macs_after": 903_168},
    {"name": "classifier.1", "kind": "linear", "in_before": 3136, "in_after": 1568,
     "out_before": 10, "out_after": 10, "macs_before": 31_360, "macs_after": 15_680},
    {"name": "classifier.3", "kind": "linear", "in_before": 10, "in_after": 10, "out_before": 10,
     "out_after": 10, "macs_before": 100, "macs_after": 100},
]  # fmt: skip
CNN_RECORD = {
    "mode": "planned", "keep_fraction": None, "joint": True, "channel_multiple": 16,
    "steps": 300, "params_before": 50_186, "params_after": 12_954,
    "macs_before": sum(la["macs_before"] for la in CNN_LAYERS),  # 3,869,924
    "macs_after": sum(la["macs_after"] for la in CNN_LAYERS),  # 1,031,844
    "groups": CNN_GROUPS, "layers": CNN_LAYERS,
    "refused": {"classifier.3": "its outputs reach the model output"},
    "predicted": {"batch_size": 64, "fp32_ms": 0.412, "pruned_fp32_ms": 0.206,
                  "compiled_ms": 0.109, "target_ms": 0.1236, "source": "roofline"},
}  # fmt: skip
# bytes on disk per "backend/variant", as the loader sums them (the fp32 engines: unpruned model)
SIZES = {
    "onnxruntime/compiled": 16_400, "onnxruntime/fp32": 203_000,
    "openvino/compiled": 21_300, "openvino/default_precision": 204_800, "openvino/fp32": 204_800,
}  # fmt: skip
# (backend, batch) -> {variant: median ms}
MEDIANS_MS = {
    ("onnxruntime", 1): {"fp32": 0.084, "compiled": 0.061},
    ("onnxruntime", 64): {"fp32": 4.2, "compiled": 1.4},
    ("openvino", 1): {"fp32": 0.071, "compiled": 0.052},
    ("openvino", 64): {"fp32": 3.0, "compiled": 0.8},
}

ATTN = "encoder.layer.0.attention"
HEADS = "12 -> 8 heads (keep 67%, rounded up to a multiple of 1; lowest group L2 norm removed)"


def _bert_layer(name: str, in_ch: tuple[int, int], out_ch: tuple[int, int]) -> dict:
    macs = [128 * i * o for i, o in zip(in_ch, out_ch, strict=True)]  # 128 tokens
    return {"name": name, "kind": "linear", "in_before": in_ch[0], "in_after": in_ch[1],
            "out_before": out_ch[0], "out_after": out_ch[1], "macs_before": macs[0],
            "macs_after": macs[1]}  # fmt: skip


BERT_LAYERS = [
    *(_bert_layer(f"{ATTN}.self.{x}", (384, 384), (384, 256)) for x in ("query", "key", "value")),
    _bert_layer(f"{ATTN}.output.dense", (384, 256), (384, 384)),
    _bert_layer("encoder.layer.0.intermediate.dense", (384, 384), (1536, 1536)),
    _bert_layer("encoder.layer.0.output.dense", (1536, 1536), (384, 384)),
]  # fmt: skip
BERT_RECORD = {
    "mode": "fixed", "keep_fraction": 0.67, "joint": True, "channel_multiple": 16, "steps": 500,
    "params_before": 22_713_216, "params_after": 22_122_624,
    "macs_before": sum(la["macs_before"] for la in BERT_LAYERS),  # 226,492,416
    "macs_after": sum(la["macs_after"] for la in BERT_LAYERS),  # 201,326,592
    "groups": [{"members": [f"{ATTN}.output.dense", f"{ATTN}.self"], "unit": "head",
                "before": 12, "after": 8, "reason": HEADS, "predicted_saving_ms": None,
                "loss_increase": None}],
    "layers": BERT_LAYERS, "refused": {},
    "predicted": {"batch_size": 8, "fp32_ms": 6.4, "pruned_fp32_ms": 5.12, "compiled_ms": None,
                  "source": "roofline"},
}  # fmt: skip
OLD_RECORD = {
    "keep_fraction": 0.5, "channel_multiple": 16, "steps": 20, "params_before": 50_186,
    "params_after": 12_954, "refused": {},
    "groups": [{"members": ["features.0", "features.1", "features.3"], "unit": "channel",
                "before": 32, "after": 16, "reason": "32 -> 16 channels (keep 50%, rounded up "
                "to a multiple of 16; lowest group L2 norm removed)"}],
}  # fmt: skip


def _measurement() -> MeasurementResult:
    rows = []
    for (backend, batch), medians in MEDIANS_MS.items():
        for variant, ms in medians.items():
            stats = LatencyStats(batch, 100, ms, ms * 1.1, ms * 1.2, ms, ms * 0.9, batch / ms * 1e3)
            rows.append(LatencyRow(backend, variant, "int8" if variant == "compiled" else "fp32",
                                   "test host", stats))  # fmt: skip
    return MeasurementResult(tuple(rows), (), None, 2, (0, 1), {})


LATENCY = latency_table(_measurement())


def _markdown(record: dict, latency=LATENCY, sizes=SIZES) -> str:
    return "\n".join(pruning_lines(pruning_section(record, latency, sizes), table))


def test_section_is_the_record_plus_flops_sizes_and_both_speedups():
    section = pruning_section(CNN_RECORD, LATENCY, SIZES)
    assert {k: section[k] for k in CNN_RECORD} == CNN_RECORD
    assert (section["flops_before"], section["flops_after"]) == (7_739_848, 2_063_688)
    assert section["engine_bytes"] == SIZES
    assert section["predicted_speedup"] == 0.412 / 0.109
    assert section["predicted_pruning_speedup"] == 2.0
    # batch 64 only
    assert section["measured_speedup"] == pytest.approx({"onnxruntime": 3.0, "openvino": 3.75})
    json.dumps(section)  # report.json carries it


def test_markdown_summary_has_the_counts_sizes_and_predicted_against_measured():
    text = _markdown(CNN_RECORD)
    assert "planned under the latency target (multiples of 16" in text
    assert "inside the joint quantization-aware training loop, with the quantizers" in text
    assert "over 300 steps" in text
    assert "Parameters: 50,186 -> 12,954 (26%)." in text
    assert "FLOPs per sample (2 x MACs, batch 1): 7.74 MFLOPs -> 2.06 MFLOPs (27%)." in text
    assert (
        "Engine size on disk, fp32 engine of the unpruned model -> compiled engine: "
        "onnxruntime 0.203 MB -> 0.0164 MB (8%); openvino 0.205 MB -> 0.0213 MB (10%)."
    ) in text
    assert (
        "Predicted speedup over the unpruned fp32 model at batch 64: 3.78x (0.412 -> 0.109 ms, "
        "the pruned model at its planned precisions; pruning alone 2.00x; roofline)."
    ) in text
    assert (
        "Measured at batch 64 (fp32 engine of the unpruned model / compiled engine): "
        "onnxruntime 3.00x, openvino 3.75x."
    ) in text


def test_markdown_tables_give_group_predictions_and_each_changed_layer_with_its_reasons():
    lines = pruning_lines(pruning_section(CNN_RECORD, LATENCY, SIZES), table)
    assert (
        "| layers | unit | before | after | predicted saving (ms) | loss increase | reason |"
    ) in lines
    assert any(
        line.startswith("| features.0, features.1, features.3 | channel | 32 | 16 | 0.0186 | "
                        "0.0654 | 32 -> 16 channels (planned for 30%")
        for line in lines
    )  # fmt: skip
    assert "Layers that lost channels (1 unchanged):" in lines
    assert "| layer | kind | in channels | out channels | MACs (batch 1) | reason |" in lines
    conv2 = next(line for line in lines if line.startswith("| features.3 |"))
    # features.3 loses inputs to the first group and outputs to the second: both reasons
    assert conv2.startswith("| features.3 | conv2d | 32 -> 16 | 64 -> 32 | 3,612,672 -> 903,168 |")
    assert "KL +0.0654); 64 -> 32 channels" in conv2
    assert not any(line.startswith("| classifier.3 |") for line in lines)
    assert "- classifier.3: its outputs reach the model output" in lines


def test_attention_layers_take_the_reason_of_their_head_group_and_giga_flops_read_short():
    text = _markdown(BERT_RECORD, sizes={})
    assert "Kept 67% of every prunable group (rounded up to multiples of 16)" in text
    assert "FLOPs per sample (2 x MACs, batch 1): 0.453 GFLOPs -> 0.403 GFLOPs (89%)." in text
    for layer in ("self.query", "self.key", "self.value"):
        assert f"| {ATTN}.{layer} | linear | 384 -> 384 | 384 -> 256 |" in text
    assert (  # a member itself, losing its inputs
        f"| {ATTN}.output.dense | linear | 384 -> 256 | 384 -> 384 | 18,874,368 -> 12,582,912 "
        f"| {HEADS} |"
    ) in text
    assert "Layers that lost channels (2 unchanged):" in text
    assert "intermediate.dense" not in text
    # no compiled prediction: the speedup is pruning alone, and said so
    assert "1.25x (6.40 -> 5.12 ms, the pruned model in fp32: pruning only; roofline)" in text
    assert "predicted saving" not in text and "loss increase" not in text  # all null
    assert "Engine size" not in text


def test_missing_measurement_at_the_predicted_batch_size_is_said_plainly():
    text = _markdown(CNN_RECORD, latency=[e for e in LATENCY if e["batch_size"] == 1])
    assert "Predicted speedup over the unpruned fp32 model at batch 64: 3.78x" in text
    assert (
        "Not measured at batch 64: the run has no fp32 and compiled latency at that batch size; "
        "compile with --batch-sizes 64 to compare."
    ) in text
    assert "Measured at" not in text


def test_html_has_the_same_numbers_and_tables():
    page = pruning_html(pruning_section(CNN_RECORD, LATENCY, SIZES), _table)
    assert page.startswith("<h2>Pruning</h2>")
    assert "7.74 MFLOPs -&gt; 2.06 MFLOPs (27%)" in page
    assert "onnxruntime 0.203 MB -&gt; 0.0164 MB (8%)" in page
    assert "onnxruntime 3.00x, openvino 3.75x" in page
    assert "<th>predicted saving (ms)</th><th>loss increase</th><th>reason</th>" in page
    assert '<td class="num">0.0186</td><td class="num">0.0654</td>' in page
    assert "<p>Layers that lost channels (1 unchanged):</p>" in page
    assert "<td>features.3</td><td>conv2d</td><td>32 -&gt; 16</td><td>64 -&gt; 32</td>" in page
    assert "<li>classifier.3: its outputs reach the model output</li>" in page


def test_an_older_record_still_renders():
    section = pruning_section(copy.deepcopy(OLD_RECORD), LATENCY, SIZES)
    assert section["flops_before"] is None and section["predicted_speedup"] is None
    assert section["measured_speedup"] == {}
    text = "\n".join(pruning_lines(section, table))
    assert "Kept 50% of every prunable group" in text
    assert "pruned, then trained 20 steps with distillation from the unpruned model" in text
    assert "| layers | unit | before | after | reason |" in text
    assert "FLOPs" not in text and "Predicted" not in text and "Layers that lost" not in text
    assert "onnxruntime 0.203 MB -> 0.0164 MB (8%)" in text  # sizes come from the run
    page = pruning_html(section, _table)
    assert "<h2>Pruning</h2>" in page and "Kept 50%" in page


def test_no_record_no_section():
    assert pruning_section(None, LATENCY, SIZES) is None
    assert pruning_lines(None, table) == [] and pruning_html(None, _table) == ""


def _write_run(run_dir: Path) -> Path:
    for key, size in SIZES.items():
        backend, variant = key.split("/")
        engine_dir = run_dir / "engines" / f"{backend}-{variant}"
        Engine(
            backend=backend, variant=variant, path=f"engines/{backend}-{variant}",
            files=("model.bin",), device="cpu", precision="fp32", build_seconds=1.0,
            build_config={}, backend_version="1.0",
        ).save(engine_dir / "engine.json")  # fmt: skip
        (engine_dir / "model.bin").write_bytes(b"\0" * size)
    _measurement().save(run_dir / "measurement.json")
    write_json_atomic(run_dir / "pruning.json", CNN_RECORD)
    return run_dir


def test_a_pruned_run_reports_its_section_through_json_markdown_and_html(tmp_path):
    report = build_report(_write_run(tmp_path))
    assert report["pruning"]["engine_bytes"] == SIZES  # the model files, not engine.json
    assert report["pruning"]["measured_speedup"] == pytest.approx(
        {"onnxruntime": 3.0, "openvino": 3.75}
    )
    markdown = render_markdown(report)
    assert "## Pruning" in markdown and "onnxruntime 3.00x, openvino 3.75x" in markdown
    assert "| features.3 | conv2d | 32 -> 16 | 64 -> 32 |" in markdown
    assert "<h2>Pruning</h2>" in render_html(report)
