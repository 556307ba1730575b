"""compile --prune: the pruned model is what gets quantized and built; the fp32 baseline and the
accuracy reference stay the model as given; the report says what was removed and why."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from deploycomp.cli import main


def _conv_widths(path) -> list[int]:
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    widths = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            weight = node.input[1]
            if weight not in inits:  # QDQ: the weight comes through a DequantizeLinear
                dq = next(n for n in model.graph.node if weight in n.output)
                weight = dq.input[0]
            widths.append(int(numpy_helper.to_array(inits[weight]).shape[0]))
    return widths


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "pruned"
    code = main(["compile", "fmnist-cnn", "--target", "intel/xeon-icx", "--backend",
                 "onnxruntime", "-o", str(out), "--batch-sizes", "1", "--rounds", "2",
                 "--eval-limit", "200", "--prune", "50%", "--prune-steps", "20",
                 "--no-accuracy-guard"])  # fmt: skip  (20 steps: the report, not the accuracy)
    assert code == 0
    return out


def test_pruned_model_is_built_against_the_unpruned_baseline(pruned_run):
    assert _conv_widths(pruned_run / "model_fp32.onnx") == [32, 64]
    assert _conv_widths(pruned_run / "model.onnx") == [16, 32]
    record = json.loads((pruned_run / "pruning.json").read_text())
    assert [(g["before"], g["after"]) for g in record["groups"]] == [(32, 16), (64, 32), (128, 64)]
    assert record["params_after"] < 0.3 * record["params_before"]
    assert all("reach the model output" in why for why in record["refused"].values())


def test_report_has_the_pruning_section(pruned_run):
    report = json.loads((pruned_run / "report.json").read_text())
    assert report["pruning"]["channel_multiple"] == 16
    markdown = (pruned_run / "report.md").read_text()
    assert "## Pruning" in markdown and "64 -> 32 channels" in markdown
    assert "<h2>Pruning</h2>" in (pruned_run / "report.html").read_text()


def test_prune_needs_a_torch_model(tmp_path, capsys):
    data = tmp_path / "x.npz"
    np.savez(data, x=np.zeros((2, 4), np.float32))
    model = tmp_path / "m.onnx"
    node = onnx.helper.make_node("Relu", ["x"], ["y"])
    graph = onnx.helper.make_graph(
        [node], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])],
    )  # fmt: skip
    onnx.save(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), model
    )
    out = tmp_path / "out"
    code = main(["compile", str(model), "--data", str(data), "-o", str(out), "--prune", "0.5"])
    assert code == 1
    assert "structured pruning needs a torch model" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_prune_fraction_is_checked(tmp_path, capsys):
    code = main(["compile", "fmnist-cnn", "-o", str(tmp_path / "o"), "--prune", "1.5"])
    assert code == 1
    assert "expected a fraction in (0, 1]" in capsys.readouterr().err


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "joint"
    code = main(["compile", "fmnist-cnn", "--target", "intel/xeon-icx", "--backend",
                 "onnxruntime", "-o", str(out), "--batch-sizes", "64", "--rounds", "2",
                 "--eval-limit", "200", "--latency-target", "30%", "--prune", "auto",
                 "--steps", "30"])  # fmt: skip
    assert code == 0
    return out


def test_joint_pruning_plans_amounts_and_trains_them_with_the_quantizers(joint_run):
    record = json.loads((joint_run / "pruning.json").read_text())
    assert record["joint"] is True and record["mode"] == "planned"
    assert record["keep_fraction"] is None
    after = [g["after"] for g in record["groups"]]
    assert after != [g["before"] for g in record["groups"]]
    assert all(a % 16 == 0 for a in after)
    assert _conv_widths(joint_run / "model_fp32.onnx") == [32, 64]
    assert _conv_widths(joint_run / "model.onnx") == after[:2]
    predicted = record["predicted"]
    assert predicted["pruned_fp32_ms"] < predicted["fp32_ms"]
    assert predicted["batch_size"] == 64 and record["macs_after"] < record["macs_before"]
    plan = json.loads((joint_run / "plan.json").read_text())
    conv2 = next(d for d in plan["layers"] if d["name"] == "features.4")
    assert conv2["weight_shape"][:2] == [after[1], after[0]]  # planned on the pruned shapes
    compression = json.loads((joint_run / "compression.json").read_text())
    assert compression["rounds"][0]["accuracy"] is not None


def test_prune_auto_needs_a_latency_target(tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["compile", "fmnist-cnn", "-o", str(out), "--prune", "auto"])
    assert code == 1
    assert "--prune auto" in capsys.readouterr().err and not out.exists()
    code = main(["compile", "fmnist-cnn", "-o", str(out), "--prune", "auto", "--size-target",
                 "50%"])  # fmt: skip
    assert code == 1
    assert "--latency-target" in capsys.readouterr().err and not out.exists()


def test_a_fixed_fraction_with_a_size_target_prunes_inside_the_joint_loop(tmp_path):
    out = tmp_path / "fixed"
    code = main(["compile", "fmnist-cnn", "--target", "intel/xeon-icx", "--backend",
                 "onnxruntime", "-o", str(out), "--batch-sizes", "1", "--rounds", "2",
                 "--eval-limit", "200", "--size-target", "20%", "--prune", "50%",
                 "--steps", "20"])  # fmt: skip
    assert code == 0
    record = json.loads((out / "pruning.json").read_text())
    assert record["joint"] is True and record["keep_fraction"] == 0.5
    assert [(g["before"], g["after"]) for g in record["groups"]] == [(32, 16), (64, 32), (128, 64)]
    compression = json.loads((out / "compression.json").read_text())
    # 20% of the unpruned fp32 weight bytes, which is more than 20% of the pruned model's
    first = compression["rounds"][0]
    assert 0.2 * first["fp32_weight_bytes"] < first["weight_bytes"] <= 0.2 * 421_738 * 4
