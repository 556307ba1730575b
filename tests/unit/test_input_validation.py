"""Bad model and data input, case by case: each is refused at load time with one line that has
the error type, a key phrase and the offending value (``check`` below)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from deploycomp.cli import main
from deploycomp.errors import DataError, ModelLoadError
from deploycomp.measure.accuracy import evaluate
from deploycomp.modelspec import EvalSet
from deploycomp.sources import load_model
from deploycomp.validate import spec_from_returned

X = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
LABELS = np.arange(8) % 3  # for X[8:], three classes
REMOVE = object()


class ReturnsDict(torch.nn.Module):
    def forward(self, x):
        return {"logits": x, "hidden": x}


class ReturnsTuple(torch.nn.Module):
    def forward(self, x):
        return x, x


class ReturnsInt(torch.nn.Module):
    def forward(self, x):
        return 3


def entry(**changes) -> dict:
    """A valid entrypoint result (a 4 -> 3 classifier, labelled eval set) with ``changes``."""
    value = {
        "model": torch.nn.Linear(4, 3),
        "example_inputs": {"input": X[:2]},
        "calibration": [{"input": X[:8]}],
        "eval_sets": [EvalSet("held-out", [{"input": X[8:]}], LABELS)],
    }
    value.update(changes)
    return {k: v for k, v in value.items() if v is not REMOVE}


def labelled(labels) -> list[EvalSet]:
    return [EvalSet("held-out", [{"input": X[8:]}], labels)]


def check(excinfo: pytest.ExceptionInfo, error: type, phrase: str, value: str) -> None:
    message = str(excinfo.value)
    assert excinfo.type is error, (excinfo.type, message)
    assert "\n" not in message and phrase in message and value in message, message


SPEC_CASES = [
    ("returns-dict", entry(model=ReturnsDict()), ModelLoadError, "return one tensor", "dict"),
    ("returns-tuple", entry(model=ReturnsTuple()), ModelLoadError, "return one tensor",
     "tuple of 2"),
    ("returns-int", entry(model=ReturnsInt()), ModelLoadError, "return one tensor", "int"),
    ("not-a-module", entry(model="resnet"), ModelLoadError, "torch.nn.Module", "str"),
    ("model-fails", entry(example_inputs={"input": np.ones((2, 5), np.float32)},
                          calibration=[{"input": np.ones((2, 5), np.float32)}], eval_sets=None),
     ModelLoadError, "failed on its example_inputs", "RuntimeError"),
    ("missing-key", entry(calibration=REMOVE), ModelLoadError, "without", "'calibration'"),
    ("float64-calibration", entry(calibration=[{"input": X[:8]}, {"input": X[:8].astype("f8")}]),
     DataError, "calibration[1]['input'] has dtype", "float64"),
    ("float64-eval", entry(eval_sets=[EvalSet("held-out", [{"input": X[8:].astype("f8")}])]),
     DataError, "expected float32", "float64"),
    ("int32-calibration", entry(calibration=[{"input": X[:8].astype(np.int32)}]),
     DataError, "has dtype", "int32"),
    ("zero-sample-example", entry(example_inputs={"input": X[:0]}), DataError, "0 samples",
     "(0, 4)"),
    ("zero-sample-calibration", entry(calibration=[{"input": X[:8]}, {"input": X[:0]}]),
     DataError, "calibration[1]['input'] has 0 samples", "(0, 4)"),
    ("empty-calibration", entry(calibration=[]), DataError, "is empty", "calibration"),
    ("scalar-input", entry(example_inputs={"input": np.array(1.0, np.float32)}), DataError,
     "0-d scalar", "example_inputs['input']"),
    ("bfloat16", entry(example_inputs={"input": torch.ones(2, 4, dtype=torch.bfloat16)}),
     DataError, "numpy cannot hold", "bfloat16"),
    ("uneven-batch", entry(example_inputs={"a": X[:2], "b": X[:3]}), DataError,
     "different sample counts", "'b': 3"),
    ("batch-sizes-zero", entry(batch_sizes=(0,)), ModelLoadError, "positive integers", "(0,)"),
    ("batch-sizes-negative", entry(batch_sizes=(1, -4)), ModelLoadError, "positive integers",
     "(1, -4)"),
    ("batch-sizes-string", entry(batch_sizes="1,64"), ModelLoadError, "positive integers",
     "'1,64'"),
    ("batch-sizes-floats", entry(batch_sizes=(1.0, 32.0)), ModelLoadError, "positive integers",
     "(1.0, 32.0)"),
    ("batch-sizes-empty", entry(batch_sizes=()), ModelLoadError, "non-empty", "()"),
    ("label-too-large", entry(eval_sets=labelled([0, 1, 2, 3, 0, 1, 2, 0])), DataError,
     "the model returns 3 classes", "label 3 at index 3"),
    ("label-negative", entry(eval_sets=labelled([0, 1, -1, 0, 0, 1, 2, 0])), DataError,
     "class indices from 0", "label -1 at index 2"),
    ("label-fraction", entry(eval_sets=labelled(LABELS + np.where(LABELS == 2, 0.5, 0.0))),
     DataError, "not an integer", "2.5"),
    ("label-strings", entry(eval_sets=labelled(np.array(["cat"] * 8))), DataError,
     "integer class indices", "'cat'"),
    ("label-count", entry(eval_sets=labelled(LABELS[:3])), DataError, "3 labels for 8 samples",
     "3"),
    ("label-shape", entry(eval_sets=labelled(np.zeros((8, 2), np.int64))), DataError,
     "one class index per sample", "(8, 2)"),
    ("labels-need-logits", entry(model=torch.nn.Sequential(torch.nn.Linear(4, 1),
                                                           torch.nn.Flatten(0))),
     DataError, "top-1 needs logits", "(2,)"),
    ("unknown-metric", entry(eval_sets=[EvalSet("held-out", [{"input": X[8:]}], LABELS, "f1")]),
     DataError, "deploycomp measures top1", "'f1'"),
    ("empty-eval-set", entry(eval_sets=[EvalSet("held-out", [])]), DataError, "is empty",
     "'held-out'"),
    ("eval-sets-type", entry(eval_sets="held-out"), DataError, "list of deploycomp.EvalSet",
     "str"),
    ("dynamic-axis-0", entry(dynamic_axes={"input": {0: "n"}}), ModelLoadError,
     "axis 0 is the batch", "axis 0"),
    ("name-type", entry(name=7), ModelLoadError, "non-empty string", "7"),
]


@pytest.mark.parametrize(
    "value, error, phrase, shown", [pytest.param(*case[1:], id=case[0]) for case in SPEC_CASES]
)
def test_bad_entrypoint_result_is_refused_on_one_line(value, error, phrase, shown):
    with pytest.raises(error) as excinfo:
        spec_from_returned(value, "user_model.py:build")
    check(excinfo, error, phrase, shown)


def test_good_entrypoint_result_is_normalized():
    spec = spec_from_returned(
        entry(eval_sets=labelled(LABELS.astype(np.float64)), batch_sizes=[1, np.int64(8)]),
        "user_model.py:build",
    )
    assert spec.batch_sizes == (1, 8) and not spec.model.training
    assert spec.eval_sets[0].labels.dtype == np.int64
    np.testing.assert_array_equal(spec.eval_sets[0].labels, LABELS)
    assert spec_from_returned(entry(eval_sets=None), "user_model.py:build").eval_sets == []


def test_evaluate_refuses_labels_outside_the_logits():
    eval_set = EvalSet("held-out", [{"input": X[8:]}], np.full(8, 4))  # built, never validated
    with pytest.raises(DataError) as excinfo:
        evaluate(lambda batch: [batch["input"][:, :3]], eval_set, progress=False)
    check(excinfo, DataError, "the model returns 3 classes", "label 4")


ENTRYPOINTS = textwrap.dedent('''
    import sys

    import numpy as np
    import torch

    def exits():
        sys.exit(3)

    def raises():
        raise ValueError("bad config\\nsecond line of the message")

    def needs_arguments(path):
        return None

    class Outputs(torch.nn.Module):
        def forward(self, x):
            return {"logits": x}

    def returns_dict_model():
        x = np.ones((8, 4), np.float32)
        return {"model": Outputs(), "example_inputs": {"input": x[:1]}, "calibration": [{"input": x}]}
''')


@pytest.mark.parametrize(
    "func, error, phrase, shown",
    [
        ("exits", ModelLoadError, "entrypoint", "called sys.exit(3)"),
        ("raises", ModelLoadError, "raised ValueError", "bad config"),
        ("needs_arguments", ModelLoadError, "calls it with none", "(path)"),
        ("returns_dict_model", ModelLoadError, "return one tensor", "dict"),
    ],
)
def test_bad_entrypoint_code_is_refused_on_one_line(tmp_path, func, error, phrase, shown):
    (tmp_path / "user_model.py").write_text(ENTRYPOINTS)
    ref = f"{tmp_path / 'user_model.py'}:{func}"
    with pytest.raises(error) as excinfo:
        load_model(ref)
    check(excinfo, error, phrase, shown)
    assert ref in str(excinfo.value) or func == "returns_dict_model"
    assert "second line" not in str(excinfo.value)


def test_exit_at_import_is_refused(tmp_path):
    (tmp_path / "script.py").write_text("import sys\nsys.exit('usage: script.py')\n")
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(f"{tmp_path / 'script.py'}:build")
    check(excinfo, ModelLoadError, "__name__ == '__main__'", "sys.exit('usage: script.py')")


def test_cli_prints_one_error_line_for_sys_exit(capsys, tmp_path):
    (tmp_path / "user_model.py").write_text(ENTRYPOINTS)
    out = tmp_path / "out"
    code = main(["compile", f"{tmp_path / 'user_model.py'}:exits", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("deploycomp: error: entrypoint ")
    assert "sys.exit(3)" in err[-1] and not any("Traceback" in line for line in err)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# .onnx with --data


def write_onnx(path: Path, *, batch: str | int = "batch", outputs: int = 1, bad_node=False) -> str:
    """x (batch, 4) float32 -> MatMul -> y (batch, 3): a three-class model."""
    weight = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])]
    if outputs == 2:
        nodes.append(helper.make_node("Relu", ["y"], ["z"]))
        outs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [batch, 3]))
    if bad_node:
        nodes.append(helper.make_node("Add", ["y"], ["sum"]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])], outs,
        [numpy_helper.from_array(weight, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


XS = np.random.default_rng(2).standard_normal((64, 4)).astype(np.float32)

NPZ_CASES = [
    ("rank", {"x": XS.reshape(64, 2, 2)}, "has shape (64, 2, 2)", "(N, 4)"),
    ("width", {"x": np.ones((64, 5), np.float32)}, "has shape (64, 5)", "(N, 4)"),
    ("dtype", {"x": XS.astype(np.float64)}, "expects float32", "float64"),
    ("scalar", {"x": np.float32(1.0)}, "0-d scalar", "'x'"),
    ("zero-samples", {"x": XS[:0]}, "0 samples", "(0, 4)"),
    ("missing-input", {"X": XS}, "missing", "['x']"),
    ("unknown-array", {"x": XS, "label": np.zeros(64, np.int64)}, "Did you mean 'labels'",
     "['label']"),
    ("no-labels-for-samples", {"x": XS, "labels": np.zeros(0, np.int64)}, "labels for",
     "0 labels for 64 samples"),
    ("too-many-labels", {"x": XS, "labels": np.zeros(65, np.int64)}, "labels for",
     "65 labels for 64 samples"),
    ("fractional-labels", {"x": XS, "labels": np.full(64, 1.5)}, "not an integer", "1.5"),
    ("string-labels", {"x": XS, "labels": np.array(["cat"] * 64)}, "integer class indices",
     "'cat'"),
    ("label-out-of-range", {"x": XS, "labels": np.arange(64) % 5}, "the model returns 3 classes",
     "label 3"),
]


@pytest.mark.parametrize(
    "arrays, phrase, shown", [pytest.param(*case[1:], id=case[0]) for case in NPZ_CASES]
)
def test_bad_npz_data_is_refused_on_one_line(tmp_path, arrays, phrase, shown):
    model = write_onnx(tmp_path / "m.onnx")
    np.savez(tmp_path / "data.npz", **arrays)
    with pytest.raises(DataError) as excinfo:
        load_model(model, str(tmp_path / "data.npz"))
    check(excinfo, DataError, phrase, shown)


def test_npz_with_a_pickled_object_array_is_refused(tmp_path):
    model = write_onnx(tmp_path / "m.onnx")
    np.savez(tmp_path / "data.npz", x=np.array([{"run": "code"}, None], dtype=object))
    with pytest.raises(DataError) as excinfo:
        load_model(model, str(tmp_path / "data.npz"))
    check(excinfo, DataError, "never unpickles", "'x'")


def test_npy_instead_of_npz_is_refused(tmp_path):
    model = write_onnx(tmp_path / "m.onnx")
    np.save(tmp_path / "data.npy", XS)
    with pytest.raises(DataError) as excinfo:
        load_model(model, str(tmp_path / "data.npy"))
    check(excinfo, DataError, "np.savez", "single .npy array")


@pytest.mark.parametrize(
    "kwargs, phrase, shown",
    [
        ({"outputs": 2}, "exactly one output", "2 outputs ['y', 'z']"),
        ({"bad_node": True}, "not a valid ONNX model", "input size 1"),
        ({"batch": 1}, "no dynamic batch axis", "[1, 4]"),
    ],
)
def test_unsupported_onnx_model_is_refused_on_one_line(tmp_path, kwargs, phrase, shown):
    model = write_onnx(tmp_path / "m.onnx", **kwargs)
    np.savez(tmp_path / "data.npz", x=XS)
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(model, str(tmp_path / "data.npz"))
    check(excinfo, ModelLoadError, phrase, shown)


def test_good_npz_loads_with_labels_split_after_calibration(tmp_path):
    model = write_onnx(tmp_path / "m.onnx")
    labels = (np.arange(64) % 3).astype(np.uint8)
    np.savez(tmp_path / "data.npz", x=XS, labels=labels)
    spec = load_model(model, str(tmp_path / "data.npz"))
    (held_out,) = spec.eval_sets
    assert sum(b["x"].shape[0] for b in spec.calibration) == 32 and held_out.num_samples == 32
    assert held_out.labels.dtype == np.int64
    np.testing.assert_array_equal(held_out.labels, labels[32:])


def test_zoo_model_refuses_data_it_would_ignore(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_model("fmnist-cnn", str(tmp_path / "data.npz"))
    check(excinfo, DataError, "only read for an .onnx model", "data.npz")
