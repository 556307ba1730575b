"""The whole pipeline on the real Fashion-MNIST CNN: engines, measurement, report, cross-compiling."""

import json
import subprocess
import sys

import numpy as np
import pytest

from deploycomp.api import MeasureConfig, compile_model
from deploycomp.artifacts import CompressionPlan, MeasurementResult

QUICK = MeasureConfig(rounds=1, block_runs=3, warmup_runs=2, eval_limit=1000)


@pytest.fixture(scope="module")
def host_run(tmp_path_factory):
    pytest.importorskip("openvino")
    out = tmp_path_factory.mktemp("runs") / "fmnist"
    report = compile_model("fmnist-cnn", target="auto", out_dir=out, batch_sizes=(1, 8),
                           measure_config=QUICK, log=lambda _: None, progress=False)
    return out, report


def test_host_run_writes_every_artifact(host_run):
    out, report = host_run
    for name in ("plan.json", "model.onnx", "model_fp32.onnx", "exported.json", "target.json",
                 "measurement.json", "run.json", "report.json", "report.md", "report.html"):
        assert (out / name).is_file(), name
    for engine in ("onnxruntime-compiled", "onnxruntime-fp32", "openvino-compiled",
                   "openvino-fp32", "openvino-default_precision"):
        meta = json.loads((out / "engines" / engine / "engine.json").read_text())
        assert meta["path"] == f"engines/{engine}"
    assert not list(out.parent.glob(".*partial"))


def test_plan_quantizes_every_layer_with_a_reason(host_run):
    out, _ = host_run
    plan = CompressionPlan.load(out / "plan.json")
    assert len(plan.layers) == 4
    for layer in plan.layers:
        assert layer.weight == "int8_sym_per_channel"
        assert layer.activation in ("int8_sym_per_tensor", "uint8_per_tensor")
        assert layer.reason.startswith("int8:")


def test_measurement_has_both_batches_all_engines_and_real_accuracy(host_run):
    out, _ = host_run
    result = MeasurementResult.load(out / "measurement.json")
    keys = {(r.backend, r.variant, r.stats.batch_size) for r in result.latency}
    for backend, variant in [("onnxruntime", "compiled"), ("onnxruntime", "fp32"),
                             ("openvino", "compiled"), ("openvino", "fp32"),
                             ("openvino", "default_precision")]:
        assert {(backend, variant, 1), (backend, variant, 8)} <= keys
    rows = {(r.backend, r.variant): r for r in result.accuracy}
    fp32, int8 = rows[("torch", "fp32")], rows[("openvino", "compiled")]
    assert fp32.num_samples == 1000 and fp32.value > 0.85
    assert abs(fp32.value - int8.value) < 0.02
    assert int8.top1_agreement > 0.97 and int8.finite
    assert result.environment["cpu_model"]
    assert result.threads >= 1 and result.pinned_cpus


def test_report_states_speedups_and_labels_the_device(host_run):
    out, report = host_run
    md = (out / "report.md").read_text()
    assert "openvino" in md and "onnxruntime" in md
    assert "data:image/png;base64" in (out / "report.html").read_text()
    # Every speedup is the ratio of the two medians measured in this run.
    medians = {(r.backend, r.variant, r.stats.batch_size): r.stats.median_ms
               for r in MeasurementResult.load(out / "measurement.json").latency}
    assert len(report["latency"]) == 4
    for row in report["latency"]:
        key = (row["backend"], row["batch_size"])
        expected = medians[(*key[:1], "fp32", key[1])] / medians[(*key[:1], "compiled", key[1])]
        assert row["speedup_vs_fp32"] == pytest.approx(expected, rel=1e-9)
        assert row["measured_on"] == row["compiled"]["measured_on"]


def test_cross_compiling_for_a100_plans_for_tensorrt_and_labels_latency(tmp_path):
    out = tmp_path / "a100"
    compile_model("fmnist-cnn", target="nvidia/a100", out_dir=out, batch_sizes=(1,),
                  measure_config=QUICK, log=lambda _: None, progress=False,
                  backends=["tensorrt", "onnxruntime"])
    plan = CompressionPlan.load(out / "plan.json")
    # TensorRT takes symmetric int8 activations only: no uint8 in a plan for it.
    assert {layer.activation for layer in plan.layers} == {"int8_sym_per_tensor"}
    assert all("tensorrt on nvidia/a100" in layer.reason for layer in plan.layers)
    target = json.loads((out / "target.json").read_text())
    assert target["is_host"] is False and "tensorrt" in target["unavailable_backends"]
    md = (out / "report.md").read_text()
    assert "not on the target" in md or "NOT on the target" in md
    result = MeasurementResult.load(out / "measurement.json")
    assert {r.backend for r in result.latency} == {"onnxruntime"}
    assert all("nvidia" not in r.measured_on.lower() for r in result.latency)


def test_cli_compile_prints_the_report(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "deploycomp", "compile", "fmnist-cnn", "--backend", "onnxruntime",
         "-o", str(out), "--batch-sizes", "1", "--rounds", "1", "--eval-limit", "200"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "onnxruntime" in proc.stdout and "Accuracy" in proc.stdout
    assert (out / "report.html").is_file()


def test_report_command_re_renders_from_the_artifacts(host_run, capsys):
    from deploycomp.cli import main

    out, _ = host_run
    (out / "report.md").unlink()
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert "## Latency" in capsys.readouterr().out
    assert (out / "report.md").is_file() and (out / "report.html").is_file()


def test_targets_and_backends_commands(capsys):
    from deploycomp.cli import main

    assert main(["targets"]) == 0
    listing = capsys.readouterr().out
    for profile in ("nvidia/a100", "nvidia/a10", "nvidia/h100", "intel/xeon-spr", "intel/xeon-icx",
                    "intel/core-avxvnni", "generic/x86-64-avx2"):
        assert profile in listing
    assert "auto ->" in listing
    assert main(["backends"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "available" in lines["onnxruntime"] and "unavailable" not in lines["onnxruntime"]
    assert "unavailable" in lines["tensorrt"] and "TensorRT" in lines["tensorrt"]


def test_existing_onnx_file_is_quantized_from_npz_data(tmp_path):
    from deploycomp import zoo
    from deploycomp.export.onnx_export import export_fp32

    spec = zoo.load("fmnist-cnn", eval_limit=500)
    model_path = tmp_path / "cnn.onnx"
    export_fp32(spec, model_path)
    images = np.concatenate([b["input"] for b in spec.eval_sets[0].batches])
    np.savez(tmp_path / "data.npz", input=images, labels=spec.eval_sets[0].labels)
    report = compile_model(str(model_path), data=str(tmp_path / "data.npz"),
                           out_dir=tmp_path / "out", backends=["onnxruntime"], batch_sizes=(1,),
                           measure_config=QUICK, log=lambda _: None, progress=False)
    plan = CompressionPlan.load(tmp_path / "out" / "plan.json")
    assert all(layer.weight == "int8_sym_per_channel" for layer in plan.layers)
    rows = MeasurementResult.load(tmp_path / "out" / "measurement.json").accuracy
    held_out = {r.variant: r for r in rows if r.backend == "onnxruntime"}
    assert held_out["compiled"].num_samples == 500 - 250
    assert held_out["compiled"].value > 0.85 and held_out["compiled"].top1_agreement > 0.97
    assert report["accuracy"]
