"""Tests of deploycomp.report on a realistic run directory built from the artifact dataclasses: two
backends, two batch sizes (one where the compiled engine is slower than fp32), a labelled and an
unlabelled eval set, and a target that is not this host (cross-compilation)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deploycomp.artifacts import (
    AccuracyRow,
    CompressionPlan,
    Engine,
    ExportedModel,
    LatencyRow,
    LatencyStats,
    LayerDecision,
    MachineLoad,
    MeasurementResult,
    TensorSpec,
    write_json_atomic,
)
from deploycomp.errors import OutputDirError
from deploycomp.report import build_report, render_markdown, write_report

HOST = "AMD EPYC 9V74, 2 cores, avx512_vnni, avx512_bf16"
# (backend, batch) -> {variant: (median_ms, p90_ms)}; onnxruntime at batch 64 is slower compiled.
VARIANTS = ("fp32", "default_precision", "compiled")
MEDIANS_MS = {
    ("onnxruntime", 1): dict(zip(VARIANTS, ((0.84, 0.91), (0.84, 0.90), (0.37, 0.41)))),
    ("onnxruntime", 64): dict(zip(VARIANTS, ((10.2, 11.0), (10.3, 11.2), (15.0, 16.1)))),
    ("openvino", 1): dict(zip(VARIANTS, ((0.61, 0.70), (0.45, 0.52), (0.29, 0.33)))),
    ("openvino", 64): dict(zip(VARIANTS, ((8.8, 9.4), (6.1, 6.6), (4.0, 4.4)))),
}
PRECISION = {"fp32": "fp32", "default_precision": "bf16", "compiled": "int8"}


def _layer(
    index: int,
    weight: str = "int8_sym_per_channel",
    activation: str = "int8_sym_per_tensor",
    reason: str = "int8 pays on avx512_vnni",
) -> LayerDecision:
    return LayerDecision(
        name=f"blocks.{index}.fc", onnx_node=f"/blocks.{index}/fc/Gemm", kind="linear",
        weight_shape=(256, 256), macs=65536 * (index + 1), weight=weight, activation=activation,
        sparsity="none", reason=reason,
        predicted_fp32_ms=0.02, predicted_ms=0.008,
    )  # fmt: skip


def _plan(num_layers: int = 3) -> CompressionPlan:
    layers = [_layer(i) for i in range(num_layers)]
    layers[0] = _layer(0, activation="uint8_per_tensor", reason="input is post-ReLU: uint8")
    layers[-1] = _layer(num_layers - 1, weight="fp32", activation="fp32",
                        reason="head: too sensitive (loss +0.31) <kept fp32>")  # fmt: skip
    return CompressionPlan(
        model_name="fashion_mlp",
        target_id="nvidia/a100",
        batch_size=64,
        layers=tuple(layers),
        seed=0,
    )


def _measurement() -> MeasurementResult:
    latency = []
    for (backend, batch), variants in MEDIANS_MS.items():
        for variant, (median_ms, p90_ms) in variants.items():
            stats = LatencyStats(
                batch_size=batch, runs=200, median_ms=median_ms, p90_ms=p90_ms,
                p99_ms=p90_ms * 1.1, mean_ms=median_ms * 1.02, min_ms=median_ms * 0.95,
                throughput_per_s=batch / median_ms * 1000.0,
            )  # fmt: skip
            latency.append(LatencyRow(backend, variant, PRECISION[variant], HOST, stats))
    accuracy = []
    for backend in ("onnxruntime", "openvino"):
        for variant, top1 in (("fp32", 0.912), ("default_precision", 0.911), ("compiled", 0.9081)):
            accuracy.append(AccuracyRow(
                backend, variant, "fashion_mnist_test", "top1", top1, 10000,
                1.0 if variant == "fp32" else 0.987, 0.9993, 31.2, True,
            ))  # fmt: skip
            accuracy.append(AccuracyRow(
                backend, variant, "calibration_unlabelled", "", None, 512,
                1.0 if variant == "fp32" else 0.9824, 0.9991, 28.4, True,
            ))  # fmt: skip
    return MeasurementResult(
        latency=tuple(latency), accuracy=tuple(accuracy),
        machine_load=MachineLoad(other_cpu_fraction=0.012, loadavg_1m=0.3, attempts=1, idle=True),
        threads=2, pinned_cpus=(0, 1),
        environment={"cpu": {"model": "AMD EPYC 9V74", "cores": 2}, "os": "Linux",
                     "versions": {"numpy": "2.1.0"}},
    )  # fmt: skip


def _write_run(run_dir: Path, num_layers: int = 3, measurement: bool = True) -> Path:
    _plan(num_layers).save(run_dir / "plan.json")
    spec = TensorSpec("input", ("batch", 784), "float32")
    ExportedModel(
        path="model.onnx", baseline_path="model_fp32.onnx", opset=17, inputs=(spec,),
        outputs=(TensorSpec("logits", ("batch", 10), "float32"),),
        checks={"max_abs_error": 0.004, "sqnr_db": 33.0}, quantized_nodes=12,
        versions={"torch": "2.5.1", "onnx": "1.17.0"},
    ).save(run_dir / "exported.json")  # fmt: skip
    for backend in ("onnxruntime", "openvino"):
        for variant, precision in PRECISION.items():
            Engine(
                backend=backend, variant=variant, path=f"engines/{backend}-{variant}",
                files=("model.onnx",), device="cpu", precision=precision, build_seconds=1.5,
                build_config={"threads": 2}, backend_version="1.20.0",
            ).save(run_dir / "engines" / f"{backend}-{variant}" / "engine.json")  # fmt: skip
    if measurement:
        _measurement().save(run_dir / "measurement.json")
    write_json_atomic(run_dir / "target.json", {
        "profile": {"id": "nvidia/a100", "name": "NVIDIA A100", "kind": "gpu", "vendor": "nvidia",
                    "architecture": "sm_80"},
        "reason": "named on the command line",
        "is_host": False,
        "host": HOST,
        "unavailable_backends": {"tensorrt": "no NVIDIA GPU on this host"},
    })  # fmt: skip
    write_json_atomic(run_dir / "run.json", {
        "model": "fashion_mlp", "model_description": "3-layer MLP on Fashion-MNIST",
        "command": "deploycomp compile fashion_mlp --target nvidia/a100",
        "deploycomp_version": "0.1.0",
        "seed": 0, "started": "2025-01-01T12:00:00", "stage_seconds": {"plan": 0.4, "measure": 9.1},
        "notes": [],
    })  # fmt: skip
    return run_dir


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_report(_write_run(tmp_path_factory.mktemp("run")))


def test_json_has_speedups_as_exact_ratio_of_medians(written: dict[str, Path]) -> None:
    report = json.loads(written["json"].read_text())
    assert len(report["latency"]) == 4
    for entry in report["latency"]:
        medians = MEDIANS_MS[(entry["backend"], entry["batch_size"])]
        assert entry["speedup_vs_fp32"] == medians["fp32"][0] / medians["compiled"][0]
        assert entry["speedup_vs_default_precision"] == (
            medians["default_precision"][0] / medians["compiled"][0]
        )
        assert entry["compiled"]["measured_on"] == HOST
        assert entry["compiled_slower_than_fp32"] == (medians["compiled"][0] > medians["fp32"][0])
    assert report["summary"]["slower_than_fp32"] == [
        {"backend": "onnxruntime", "batch_size": 64, "speedup": 10.2 / 15.0}
    ]
    assert report["summary"]["cross_compiled"] is True


def test_json_has_accuracy_drops_and_unlabelled_agreement(written: dict[str, Path]) -> None:
    report = json.loads(written["json"].read_text())
    labelled = [e for e in report["accuracy"] if e["eval_set"] == "fashion_mnist_test"]
    assert {e["backend"] for e in labelled} == {"onnxruntime", "openvino"}
    assert labelled[0]["drop_points"] == pytest.approx((0.912 - 0.9081) * 100, abs=1e-9)
    unlabelled = [e for e in report["accuracy"] if e["eval_set"] == "calibration_unlabelled"]
    assert unlabelled[0]["drop_points"] is None and not unlabelled[0]["labelled"]
    assert unlabelled[0]["top1_agreement"] == 0.9824
    assert report["layers"]["count"] == 3
    assert report["layers"]["rows"][0]["activation"] == "uint8_per_tensor"
    assert report["measurement"]["machine_load"]["attempts"] == 1
    assert report["versions"]["numpy"] == "2.1.0"


def test_markdown_renders_the_same_from_report_json(written: dict[str, Path]) -> None:
    report = json.loads(written["json"].read_text())
    assert render_markdown(report) == written["md"].read_text()


def test_slower_than_fp32_verdict_in_markdown_and_html(written: dict[str, Path]) -> None:
    sentence = "on onnxruntime at batch 64 the INT8 engine is 0.68x the speed of fp32: slower"
    assert sentence in written["md"].read_text()
    assert sentence in written["html"].read_text()
    assert "on openvino at batch 64 the INT8 engine is 2.20x the speed of fp32" in (
        written["md"].read_text()
    )


def test_cross_compilation_warning_and_unavailable_backends(written: dict[str, Path]) -> None:
    for fmt in ("md", "html"):
        text = written[fmt].read_text()
        assert "NOT on the target" in text
        assert "tensorrt" in text and "no NVIDIA GPU on this host" in text
    markdown = written["md"].read_text()
    assert markdown.index("NOT on the target") < markdown.index("## Latency")
    report = json.loads(written["json"].read_text())
    assert report["cross_compilation"]["unavailable_backends"] == {
        "tensorrt": "no NVIDIA GPU on this host"
    }


def test_html_is_self_contained_and_escaped(written: dict[str, Path]) -> None:
    page = written["html"].read_text()
    assert page.count("data:image/png;base64,") == 3
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "<kept fp32>" not in page and "&lt;kept fp32&gt;" in page


def test_missing_measurement_still_renders_with_note(tmp_path: Path) -> None:
    paths = write_report(_write_run(tmp_path, measurement=False))
    report = json.loads(paths["json"].read_text())
    assert report["latency"] == [] and report["measurement"] is None
    markdown = paths["md"].read_text()
    assert "measurement.json is missing" in markdown
    assert "No latency was measured." in markdown
    assert "measurement.json is missing" in paths["html"].read_text()


def test_large_plan_collapses_markdown_layer_table(tmp_path: Path) -> None:
    report = build_report(_write_run(tmp_path, num_layers=45))
    markdown = render_markdown(report)
    layer_rows = [line for line in markdown.splitlines() if line.startswith("| blocks.")]
    assert 0 < len(layer_rows) <= 12
    assert "| blocks.44.fc |" in markdown  # the fp32 head differs from the usual scheme
    assert "Showing" in markdown and len(report["layers"]["rows"]) == 45


def test_malformed_artifact_names_the_file(tmp_path: Path) -> None:
    _write_run(tmp_path)
    (tmp_path / "measurement.json").write_text("{not json")
    with pytest.raises(OutputDirError, match="measurement.json"):
        build_report(tmp_path)
    with pytest.raises(OutputDirError, match="does not exist"):
        build_report(tmp_path / "absent")


def test_import_loads_no_matplotlib() -> None:
    code = "import sys, deploycomp.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _write_engine_layers(run_dir: Path) -> None:
    """A GPU engine beside the CPU ones, with the layers.json its backend writes: one layer on a
    sparse kernel, one whose 2:4 weights ran dense, one dense layer without 2:4 weights."""
    from deploycomp.artifacts import EngineLayer
    from deploycomp.report.engine_layers import write_engine_layers

    engine_dir = run_dir / "engines" / "tensorrt-compiled"
    Engine(
        backend="tensorrt", variant="compiled", path="engines/tensorrt-compiled",
        files=("model.engine", "layers.json"), device="cuda:0", precision="int8",
        build_seconds=12.0, build_config={}, backend_version="10.8.0",
    ).save(engine_dir / "engine.json")  # fmt: skip
    write_engine_layers(engine_dir, "tensorrt", [
        EngineLayer("fc1 + relu1", "gemm", "int8", True, True, "sm80_xmma_sparse_gemm_i8i8"),
        EngineLayer("fc2", "gemm", "int8", False, True, "sm80_xmma_gemm_i8i8",
                    "2:4 weights but TensorRT chose a dense kernel"),
        EngineLayer("head", "gemm", "fp32", False, False, "sm80_xmma_gemm_f32f32"),
    ])  # fmt: skip


def test_engine_layers_section_from_layers_json(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path)
    _write_engine_layers(run_dir)
    paths = write_report(run_dir)
    report = json.loads(paths["json"].read_text())
    (entry,) = report["engine_layers"]
    assert entry["engine"] == "tensorrt-compiled"
    assert (entry["sparse_kernels"], entry["sparse_weights"], entry["dense_2_4"]) == (1, 2, 1)
    assert [row["name"] for row in entry["layers"]] == ["fc1 + relu1", "fc2", "head"]
    markdown = paths["md"].read_text()
    section = markdown[markdown.index("## Engine layers") : markdown.index("## Environment")]
    assert "**Warning:** 1 layer with 2:4 weights ran a dense kernel" in section
    assert "| fc1 + relu1 | gemm | int8 | yes | yes |" in section
    assert "| fc2 | gemm | int8 | yes | no | 2:4 weights but TensorRT chose a dense kernel |" in (
        section
    )
    assert "| head | gemm | fp32 | no | no |" in section
    page = paths["html"].read_text()
    assert "<h2>Engine layers</h2>" in page and "1 layer with 2:4 weights ran a dense" in page


def test_no_layers_json_no_engine_layers_section(written: dict[str, Path]) -> None:
    assert json.loads(written["json"].read_text())["engine_layers"] is None
    assert "Engine layers" not in written["md"].read_text()
    assert "Engine layers" not in written["html"].read_text()


def test_malformed_layers_json_names_the_file(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path)
    _write_engine_layers(run_dir)
    (run_dir / "engines" / "tensorrt-compiled" / "layers.json").write_text('{"layers": 3}')
    with pytest.raises(OutputDirError, match="layers.json"):
        build_report(run_dir)
