"""Property-based fuzzing of model and data input: whatever an ``--data`` .npz holds for a real
ONNX model, and whatever an entrypoint returns, loading either gives a spec whose data is
consistent, or raises a one-line DeployCompError; never another exception.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

from deploycomp.errors import DataError, DeployCompError
from deploycomp.modelspec import EvalSet, ModelSpec
from deploycomp.sources import load_model
from deploycomp.validate import spec_from_returned

FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CLASSES = 3
DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint8, np.bool_,
          np.complex64]  # fmt: skip


def loads_or_fails_on_one_line(load) -> ModelSpec | None:
    try:
        spec = load()
    except DeployCompError as exc:
        message = str(exc)
        assert message and "\n" not in message and message.isprintable(), repr(message)
        event(f"refused: {type(exc).__name__}")
        return None
    assert isinstance(spec, ModelSpec)
    event("loaded")
    return spec


def assert_consistent(spec: ModelSpec, classes: int | None = CLASSES) -> None:
    """What every later stage relies on: one dtype and sample shape per input, int labels."""
    example = spec.example_inputs
    assert example and all(isinstance(a, np.ndarray) and a.shape[0] > 0 for a in example.values())
    for batch in [*spec.calibration, *(b for es in spec.eval_sets for b in es.batches)]:
        assert set(batch) == set(example)
        for name, arr in batch.items():
            assert arr.dtype == example[name].dtype and arr.shape[1:] == example[name].shape[1:]
            assert arr.shape[0] > 0
    assert spec.batch_sizes and all(type(b) is int and b > 0 for b in spec.batch_sizes)
    for es in spec.eval_sets:
        if es.labels is not None:
            assert es.labels.dtype == np.int64 and es.labels.shape == (es.num_samples,)
            assert es.labels.min() >= 0 and (classes is None or es.labels.max() < classes)


def random_arrays(shapes: st.SearchStrategy | None = None) -> st.SearchStrategy[np.ndarray]:
    """Any of ``DTYPES`` (NaN and infinities included), any rank from 0-d, sides from 0."""
    return hnp.arrays(
        st.sampled_from(DTYPES),
        shapes or hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
    )


def finite_float32(rows: st.SearchStrategy[int], cols: int = 4) -> st.SearchStrategy[np.ndarray]:
    return rows.flatmap(
        lambda n: hnp.arrays(np.float32, (n, cols), elements=st.floats(-8, 8, width=32))
    )


# ---------------------------------------------------------------------------------------------
# (a) the --data .npz loader, against a real ONNX model x (batch, 4) -> (batch, 3)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    weight = np.random.default_rng(0).standard_normal((4, CLASSES)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(weight, "w")],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


@pytest.fixture(scope="module")
def npz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("npz") / "data.npz"


NAMES = st.sampled_from(["x", "labels"]) | st.text("xyzXlabes_.1", min_size=1, max_size=8)
GOOD_X = finite_float32(st.integers(1, 70))
LABELS = st.integers(0, 70).flatmap(
    lambda n: hnp.arrays(st.sampled_from([np.int64, np.uint8, np.float64, np.bool_]), (n,))
) | st.integers(0, 70).map(lambda n: np.arange(n) % CLASSES)


@st.composite
def npz_contents(draw: st.DrawFn) -> dict[str, np.ndarray]:
    x = GOOD_X | GOOD_X.map(lambda a: a.astype(np.float64)) | finite_float32(st.just(0))
    arrays = {"x": draw(x | random_arrays())} if draw(st.booleans()) else {}
    if draw(st.booleans()):
        arrays["labels"] = draw(LABELS | random_arrays())
    extra = draw(st.dictionaries(NAMES, random_arrays(), max_size=2))
    return {**extra, **arrays} if draw(st.booleans()) else {**arrays, **extra}


@FUZZ
@given(arrays=npz_contents())
def test_any_npz_loads_or_fails_on_one_line(arrays, onnx_model, npz_file):
    np.savez(npz_file, **arrays)
    spec = loads_or_fails_on_one_line(lambda: load_model(onnx_model, str(npz_file)))
    if spec is not None:
        assert spec.example_inputs["x"].dtype == np.float32
        assert_consistent(spec)


@FUZZ
@given(arrays=npz_contents(), objects=st.lists(st.integers() | st.text(), min_size=1))
def test_a_pickled_object_array_is_refused(arrays, objects, onnx_model, npz_file):
    arrays[next(iter(arrays), "x")] = np.array(objects + [None], dtype=object)
    np.savez(npz_file, **arrays)  # numpy pickles the object array when saving
    assert loads_or_fails_on_one_line(lambda: load_model(onnx_model, str(npz_file))) is None
    with pytest.raises(DataError, match="never unpickles"):
        load_model(onnx_model, str(npz_file))


@FUZZ
@given(data=st.binary(max_size=300) | st.just(b"PK\x03\x04") | st.just(b"\x93NUMPY\x01\x00"))
def test_arbitrary_bytes_as_data_fail_on_one_line(data, onnx_model, npz_file):
    npz_file.write_bytes(data)
    assert loads_or_fails_on_one_line(lambda: load_model(onnx_model, str(npz_file))) is None


@FUZZ
@given(x=GOOD_X, labelled=st.booleans())
def test_good_npz_always_loads(x, labelled, onnx_model, npz_file):
    labels = {"labels": np.arange(len(x)) % CLASSES} if labelled else {}
    np.savez(npz_file, x=x, **labels)
    spec = loads_or_fails_on_one_line(lambda: load_model(onnx_model, str(npz_file)))
    assert spec is not None
    assert_consistent(spec)
    assert sum(b["x"].shape[0] for b in spec.calibration) + sum(
        es.num_samples for es in spec.eval_sets
    ) == len(x)


# ---------------------------------------------------------------------------------------------
# (b) what an entrypoint returns, through the same validation the loader uses


class ReturnsTuple(torch.nn.Module):
    def forward(self, x):
        return x, x


def tiny_model() -> torch.nn.Module:
    return torch.nn.Linear(4, CLASSES)


MODELS = st.sampled_from([tiny_model, ReturnsTuple, lambda: "model", lambda: None]).map(
    lambda make: make()
)
ARRAYS = finite_float32(st.integers(1, 9)) | random_arrays()
BATCHES = (
    st.dictionaries(st.sampled_from(["input"]) | NAMES | st.integers(), ARRAYS, max_size=2)
    | ARRAYS
    | ARRAYS.map(torch.from_numpy)
    | st.sampled_from([None, 3, "input", [1.0, 2.0]])
)
GOOD_BATCH = finite_float32(st.integers(1, 9)).map(lambda a: {"input": a})
BATCH_LISTS = st.lists(GOOD_BATCH | BATCHES, max_size=3) | BATCHES
LABEL_VALUES = (
    LABELS
    | st.lists(st.integers(-2, 5) | st.floats(-1, 4) | st.text(max_size=2), max_size=9)
    | st.sampled_from([None, "cat", 2.5])
)
EVAL_SETS = st.builds(
    EvalSet,
    name=st.sampled_from(["held-out", "other"]) | st.sampled_from(["", 0, None]),
    batches=st.lists(GOOD_BATCH, min_size=1, max_size=2) | BATCH_LISTS,
    labels=st.none() | LABEL_VALUES,
    metric=st.sampled_from(["top1", "top1", "f1", 1]),
)
OPTIONAL = {
    "name": st.sampled_from(["user", "", 3, None]),
    "eval_sets": st.none() | st.lists(EVAL_SETS, max_size=2) | EVAL_SETS | st.just("held-out"),
    "batch_sizes": st.lists(st.integers(-2, 64) | st.floats(0, 8) | st.text(max_size=3),
                            max_size=3).map(tuple)
    | st.sampled_from([(1, 32), "1,64", 8, None, [1, 2]]),
    "dynamic_axes": st.dictionaries(
        NAMES | st.just("input"), st.dictionaries(st.integers(-1, 3), NAMES, max_size=2) | NAMES,
        max_size=2,
    ) | st.none(),
    "make_batch": st.sampled_from([None, 3, lambda n: {"input": np.ones((n, 4), np.float32)}]),
    "description": st.sampled_from(["", "tiny", 5]),
    "onnx_path": st.sampled_from([None, 7]),
    "unknown_key": st.just(1),
}


@st.composite
def entrypoint_results(draw: st.DrawFn) -> dict[str, Any]:
    value = {
        "model": draw(MODELS | st.just(tiny_model())),
        "example_inputs": draw(GOOD_BATCH | BATCHES),
        "calibration": draw(st.lists(GOOD_BATCH, min_size=1, max_size=3) | BATCH_LISTS),
    }
    for key in draw(st.lists(st.sampled_from(sorted(OPTIONAL)), unique=True, max_size=4)):
        value[key] = draw(OPTIONAL[key])
    for key in draw(st.lists(st.sampled_from(sorted(value)), unique=True, max_size=1)):
        if draw(st.integers(0, 3)) == 0:
            del value[key]
    return value


@FUZZ
@given(value=entrypoint_results(), as_spec=st.booleans())
def test_any_entrypoint_result_validates_or_fails_on_one_line(value, as_spec):
    def load():
        if as_spec and {"model", "example_inputs", "calibration"} <= set(value):
            kwargs = {k: v for k, v in value.items() if k != "unknown_key"}
            return spec_from_returned(ModelSpec(**{"name": "user", **kwargs}), "fuzz.py:build")
        return spec_from_returned(value, "fuzz.py:build")

    spec = loads_or_fails_on_one_line(load)
    if spec is not None:
        assert isinstance(spec.model, torch.nn.Module) and not spec.model.training
        assert_consistent(spec)


@FUZZ
@given(
    example=GOOD_BATCH,
    calibration=st.lists(GOOD_BATCH, min_size=1, max_size=3),
    eval_batches=st.lists(GOOD_BATCH, min_size=1, max_size=3),
    labelled=st.booleans(),
    batch_sizes=st.lists(st.integers(1, 64), min_size=1, max_size=3).map(tuple),
)
def test_good_entrypoint_result_always_validates(
    example, calibration, eval_batches, labelled, batch_sizes
):
    samples = sum(b["input"].shape[0] for b in eval_batches)
    labels = np.arange(samples) % CLASSES if labelled else None
    value = {
        "model": tiny_model(), "example_inputs": example, "calibration": calibration,
        "eval_sets": [EvalSet("held-out", eval_batches, labels)], "batch_sizes": batch_sizes,
    }  # fmt: skip
    spec = loads_or_fails_on_one_line(lambda: spec_from_returned(value, "fuzz.py:build"))
    assert spec is not None and spec.batch_sizes == batch_sizes
    assert_consistent(spec)
