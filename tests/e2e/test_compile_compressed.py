"""Joint compression through the whole pipeline on the real Fashion-MNIST CNN: plan from the CPU
profile, train, back off, export with the learned scales, build and measure real engines, report."""

import json

import numpy as np
import onnx
import pytest

from deploycomp.api import MeasureConfig, compile_model
from deploycomp.artifacts import CompressionPlan
from deploycomp.cli import main
from deploycomp.compress.config import CompressConfig
from deploycomp.plan.joint_planner import Budget

QUICK = MeasureConfig(rounds=1, block_runs=3, warmup_runs=2, eval_limit=500)


def _compile(out, config, log=lambda _: None, **kwargs):
    return compile_model(
        "fmnist-cnn",
        target="intel/xeon-icx",
        out_dir=out,
        batch_sizes=(1,),
        measure_config=QUICK,
        log=log,
        progress=False,
        compress=config,
        **kwargs,
    )


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "joint"
    config = CompressConfig(budget=Budget(max_accuracy_drop=1.0), steps=40, compare_sequential=True)
    report = _compile(out, config, backends=("onnxruntime", "openvino"))
    return out, report


def test_cpu_plan_uses_no_2_4_and_every_layer_has_a_reason(joint_run):
    out, _ = joint_run
    plan = CompressionPlan.load(out / "plan.json")
    assert all(d.sparsity == "none" for d in plan.layers)
    assert all(d.reason for d in plan.layers)
    compressed = [d for d in plan.layers if d.weight != "fp32"]
    assert compressed, "the fastest CPU plan quantizes something"
    for d in compressed:
        assert d.predicted_ms < d.predicted_fp32_ms, d.reason  # never a choice that cannot pay


def test_export_matches_the_trained_student_within_tolerance(joint_run):
    out, _ = joint_run
    record = json.loads((out / "compression.json").read_text())
    checks = record["export_checks"]
    assert checks["student_cosine"] >= checks["student_min_cosine"]
    assert checks["student_top1_agreement"] >= checks["student_min_top1_agreement"]
    assert checks["student_sqnr_db"] > 30


def _dequantized_weights(path, nodes):
    """Each named node's weight input as ONNX computes it: the DequantizeLinear output feeding
    input 1, read by exposing it as a graph output and running without graph optimizations."""
    import onnxruntime as ort

    model = onnx.load(str(path))
    tensors = {n.name: n.input[1] for n in model.graph.node if n.name in nodes}
    for tensor in tensors.values():
        model.graph.output.append(onnx.ValueInfoProto(name=tensor))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options)
    feed = {"input": np.zeros((1, 1, 28, 28), np.float32)}
    values = session.run(list(tensors.values()), feed)
    return dict(zip(tensors, values))


def test_learned_weights_land_on_the_integer_grid(tmp_path):
    # A trained student (2:4 + INT8 on one linear layer, INT4 weight-only on the other, steps
    # learned) exports weights that dequantize to exactly the student's folded weights.
    import copy

    from deploycomp import zoo
    from deploycomp.artifacts import LayerDecision
    from deploycomp.compress.fold import fold_
    from deploycomp.compress.joint import JointConfig
    from deploycomp.compress.sequential import compress_and_train
    from deploycomp.compress.stage import export_trained, training_batches

    spec = zoo.load("fmnist-cnn", eval_limit=64)
    decisions = (
        LayerDecision("classifier.1", "/classifier/classifier.1/Gemm", "linear", (128, 3136), 0,
                      "int8_sym_per_channel", "uint8_per_tensor", "2:4", "test"),
        LayerDecision("classifier.3", "/classifier/classifier.3/Gemm", "linear", (10, 128), 0,
                      "int4_sym_group32", "fp32", "none", "test"),
    )  # fmt: skip
    plan = CompressionPlan("fmnist-cnn", "intel/xeon-icx", 1, decisions, seed=0)
    student, _ = compress_and_train(spec.model, None, plan, training_batches(spec)[:4],
                                    JointConfig(steps=4), progress=False)  # fmt: skip
    folded = copy.deepcopy(student)
    fold_(folded)
    export_trained(student, spec, tmp_path)
    model = onnx.load(str(tmp_path / "model.onnx"))
    nodes = {n.name: n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")}
    fc1 = next(name for name in nodes if "classifier.1" in name)
    fc3 = next(name for name in nodes if "classifier.3" in name)
    weights = _dequantized_weights(tmp_path / "model.onnx", {fc1, fc3})
    expected1 = folded.classifier[1].weight.detach().numpy()
    expected3 = folded.classifier[3].weight.detach().numpy()
    # W8A8 stays a Gemm with transB=1 ([out, in]); INT4 weight-only became MatMul ([in, out]).
    got1 = weights[fc1] if nodes[fc1].op_type == "Gemm" else weights[fc1].T
    got3 = weights[fc3].T if nodes[fc3].op_type == "MatMul" else weights[fc3]
    np.testing.assert_allclose(got1, expected1, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got3, expected3, rtol=1e-6, atol=1e-9)
    assert np.all(got1.reshape(128, -1, 4).__ne__(0).sum(-1) <= 2)  # the 2:4 zeros survived


def test_engines_run_and_accuracy_holds(joint_run):
    _, report = joint_run
    rows = {r["backend"]: r for r in report["accuracy"]}
    for backend in ("onnxruntime", "openvino"):
        assert rows[backend]["finite"]
        assert rows[backend]["drop_points"] <= 2.0, rows[backend]


def test_report_shows_rounds_prediction_and_comparison(joint_run):
    out, report = joint_run
    section = report["compression"]
    assert section["rounds"] and section["rounds"][0]["accuracy"] is not None
    assert section["predicted_speedup"] > 1
    assert section["measured"] and section["measured"][0]["backend"] == section["plan_backend"]
    comparison = section["comparison"]
    assert comparison["joint"]["accuracy"] is not None
    assert comparison["sequential"]["accuracy"] is not None
    markdown = (out / "report.md").read_text()
    assert "## Compression" in markdown and "Joint against sequential" in markdown
    assert "predicted_speedup" in markdown or "Predicted speedup" in markdown
    assert "Compression" in (out / "report.html").read_text()


def test_closed_loop_backs_off_the_most_sensitive_layers(tmp_path):
    # One training step does not recover the fastest plan's loss: the 0-point limit is missed
    # and the second round forbids the chosen option of the most sensitive compressed layer.
    config = CompressConfig(budget=Budget(max_accuracy_drop=0.0), steps=1, max_rounds=2)
    # guard=None: this tests the loop's rounds, and one step may end below the accuracy guard
    report = _compile(tmp_path / "loop", config, backends=("onnxruntime",), guard=None)
    rounds = report["compression"]["rounds"]
    assert len(rounds) == 2
    assert rounds[0]["accuracy_drop_points"] > 0
    backed = rounds[0]["backed_off"]
    assert backed
    for entry in backed:
        name, key = entry.split(" (")
        assert rounds[1]["plan"][name] != key.rstrip(")")
    assert rounds[1]["stopped"] is None or "after 2 rounds" in rounds[1]["stopped"]


def test_closed_loop_stops_where_backing_off_breaks_the_budget(tmp_path):
    # At a size target only the INT4 plan meets, backing INT4 off would break the budget: the
    # loop keeps the round and says why instead of failing or exceeding the budget. One step at a
    # learning rate far too high makes sure the round misses the accuracy budget.
    config = CompressConfig(
        budget=Budget(size_target=0.2, max_accuracy_drop=0.0), steps=1, max_rounds=3, lr=0.1
    )
    report = _compile(tmp_path / "tight", config, backends=("onnxruntime",), guard=None)
    rounds = report["compression"]["rounds"]
    assert len(rounds) == 1
    assert "would break the budget" in rounds[0]["stopped"]
    assert rounds[0]["weight_bytes"] <= 0.2 * rounds[0]["fp32_weight_bytes"]


def test_on_this_machine_layer_options_are_measured_before_planning(tmp_path):
    out = tmp_path / "host"
    report = compile_model(
        "fmnist-cnn",
        target="auto",
        out_dir=out,
        batch_sizes=(1,),
        backends=("onnxruntime",),
        measure_config=QUICK,
        log=lambda _: None,
        progress=False,
        compress=CompressConfig(steps=5),
    )
    record = json.loads((out / "compression.json").read_text())
    shapes = {tuple(e["shape"]) for e in record["measured_options"]}
    assert shapes == {(1, 3136, 128), (1, 128, 10)}  # fmnist's two linear layers at batch 1
    assert all(
        e["backend"] == "onnxruntime" and e["latency_ms"] > 0 for e in record["measured_options"]
    )
    plan = CompressionPlan.load(out / "plan.json")
    for decision in plan.layers:
        if decision.kind == "linear":
            assert "measured" in decision.reason, decision.reason
            if decision.weight != "fp32":  # chosen for speed: it measured faster here
                assert decision.predicted_ms < decision.predicted_fp32_ms
    assert "were timed on onnxruntime" in (out / "report.md").read_text()
    assert report["compression"]["measured_options"] == len(record["measured_options"])


@pytest.fixture
def fmnist_onnx(tmp_path):
    from deploycomp import zoo
    from deploycomp.export.onnx_export import export_fp32

    spec = zoo.load("fmnist-cnn", eval_limit=64)
    model, data = tmp_path / "fmnist.onnx", tmp_path / "data.npz"
    export_fp32(spec, model)
    np.savez(data, input=spec.calibration[0]["input"])
    return model, data


def test_budget_flags_on_an_onnx_model_fail_cleanly(capsys, tmp_path, fmnist_onnx):
    model, data = fmnist_onnx
    out = tmp_path / "out"
    code = main(
        ["compile", str(model), "--data", str(data), "--latency-target", "0.5", "-o", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 1 and "arrived as ONNX" in err
    assert not out.exists() and not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--size-target", "1.5", "fraction in (0, 1]"),
        ("--latency-target", "fast", "expected a fraction"),
        ("--max-accuracy-drop", "-1", "points of the task metric from 0 to 100"),
    ],
)
def test_bad_budget_values(capsys, tmp_path, flag, value, expected):
    out = tmp_path / "out"
    code = main(["compile", "fmnist-cnn", flag, value, "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and expected in err
    assert not out.exists()


def test_compression_flags_build_the_config():
    from deploycomp.cli import _compress_config, build_parser

    args = build_parser().parse_args(
        [
            "compile",
            "fmnist-cnn",
            "--size-target",
            "20%",
            "--max-accuracy-drop",
            "0.5",
            "--mode",
            "sequential",
            "--epochs",
            "2",
            "--no-measure-options",
        ]
    )
    config = _compress_config(args)
    assert config.budget == Budget(size_target=0.2, max_accuracy_drop=0.5)
    assert (config.mode, config.epochs, config.measure_options) == ("sequential", 2.0, False)
    assert _compress_config(build_parser().parse_args(["compile", "fmnist-cnn"])) is None


def test_checkpoint_dir_resumes_a_finished_or_interrupted_training(tmp_path):
    checkpoints = tmp_path / "ckpt"
    config = CompressConfig(steps=6, checkpoint_dir=str(checkpoints))
    logs: list[str] = []
    first = _compile(tmp_path / "a", config, logs.append, backends=("onnxruntime",))
    (trained,) = checkpoints.glob("fmnist-cnn-*-round1-joint.pt")
    # The resumed compile trains the plan the checkpoint was written for, even when this
    # machine's re-measured option latencies would tip a near-tie the other way.
    plan_file = trained.with_name(trained.name.replace("-joint.pt", "-plan.json"))
    saved = json.loads(plan_file.read_text())
    saved["plan"]["layers"][3]["reason"] = "kept as the checkpoint's plan says"
    plan_file.write_text(json.dumps(saved))
    assert not any(line.startswith("resume") for line in logs)
    second = _compile(tmp_path / "b", config, logs.append, backends=("onnxruntime",))
    assert any(line.startswith("resume") for line in logs)
    # Resumed at the last step: the same trained student, so the same accuracy and loss.
    a, b = first["compression"]["rounds"][0], second["compression"]["rounds"][0]
    assert (a["accuracy"], a["final_loss"], a["plan"]) == (
        b["accuracy"],
        b["final_loss"],
        b["plan"],
    )
    reasons = [d.reason for d in CompressionPlan.load(tmp_path / "b" / "plan.json").layers]
    assert reasons[3] == "kept as the checkpoint's plan says"
    # Another training length is another key: not resumed, said so, the old files kept.
    logs.clear()
    other = CompressConfig(steps=7, checkpoint_dir=str(checkpoints))
    _compile(tmp_path / "c", other, logs.append, backends=("onnxruntime",))
    assert any("was written for another" in line and "steps" in line for line in logs), logs
    assert not any(line.startswith("resume") for line in logs)
    assert trained.is_file() and len(list(checkpoints.glob("fmnist-cnn-*-joint.pt"))) == 2
