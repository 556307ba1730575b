"""Calibration outliers: an absurd value is clipped with a note, NaN/inf is refused, ordinary
ranges do not move, and a QDQ model with broken ranges fails the export check."""

import dataclasses

import numpy as np
import onnx
import pytest

from deploycomp import zoo
from deploycomp.api import export
from deploycomp.errors import DataError, ExportError
from deploycomp.export.calibrate import (
    OUTLIER_ORDERS,
    TensorRange,
    calibrate,
    probe_session,
    robust_range,
)
from deploycomp.export.check import QDQ_MIN_COSINE, check_exported, check_fidelity
from deploycomp.export.onnx_export import export_fp32, torch_outputs
from deploycomp.export.qdq import LayerQuant, activation_sites, insert_qdq
from deploycomp.hw import resolve_target
from deploycomp.plan.inventory import build_inventory


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    """The fmnist-cnn zoo model, its fp32 graph and its activation sites."""
    spec = zoo.load("fmnist-cnn", eval_limit=64)
    fp32 = export_fp32(spec, tmp_path_factory.mktemp("fmnist") / "fp32.onnx")
    layers = [la for la in build_inventory(fp32, {"batch": 32}) if la.eligible]
    sites = activation_sites(fp32, {la.node for la in layers})
    return spec, fp32, layers, sites


def _with_outlier(spec, batch: int, value: float):
    calibration = [dict(b) for b in spec.calibration]
    x = calibration[batch]["input"].copy()
    x.flat[100] = value
    calibration[batch]["input"] = x
    return dataclasses.replace(spec, calibration=calibration)


def _plain_ranges(fp32: onnx.ModelProto, tensors, batches) -> dict[str, tuple[float, float]]:
    """Min and max of each tensor over every value of every batch, by direct inference (graph
    unoptimized, as calibration runs it: fused kernels round differently)."""
    session = probe_session(fp32, tensors)
    outputs = [session.run(list(tensors), b) for b in batches]
    return {
        name: (min(float(o[i].min()) for o in outputs), max(float(o[i].max()) for o in outputs))
        for i, name in enumerate(tensors)
    }


def test_ordinary_ranges_equal_the_plain_min_and_max(fmnist):
    spec, fp32, _, sites = fmnist
    tensors = list(dict.fromkeys(sites.values()))
    notes = []
    ranges = calibrate(fp32, tensors, spec.calibration, progress=False, log=notes.append)
    plain = _plain_ranges(fp32, tensors, spec.calibration)
    assert {n: (r.min, r.max) for n, r in ranges.items()} == plain
    assert all(r.clip == max(abs(r.min), abs(r.max)) for r in ranges.values())
    assert notes == []


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["normal", "lognormal", "cauchy", "sparse_relu", "constant"])
def test_robust_range_is_the_plain_range_without_outliers(kind, seed):
    rng = np.random.default_rng(seed)
    data = {
        "normal": lambda: rng.normal(size=(8, 4096)),
        "lognormal": lambda: rng.lognormal(sigma=2.0, size=(8, 4096)),
        "cauchy": lambda: rng.standard_cauchy(size=(8, 4096)),
        "sparse_relu": lambda: np.maximum(rng.normal(size=(8, 4096)) - 3.0, 0.0),
        "constant": lambda: np.full((8, 4096), -2.5),
    }[kind]().astype(np.float32)
    sample = data[:, rng.choice(4096, 1024, replace=False)].ravel()
    lo, hi, clipped = robust_range(list(data.min(axis=1)), list(data.max(axis=1)), sample)
    assert (lo, hi, clipped) == (float(data.min()), float(data.max()), False)


@pytest.mark.parametrize("outlier", [3e38, -3e38, 1e6 * 10.0**OUTLIER_ORDERS, np.inf, np.nan])
def test_robust_range_drops_an_absurd_extreme(outlier):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(4, 4096)).astype(np.float32)
    data[2, 7] = outlier
    sample = data.ravel()  # the outlier is in the sample too
    lo, hi, clipped = robust_range(list(data.min(axis=1)), list(data.max(axis=1)), sample)
    clean = np.delete(data.ravel(), 2 * 4096 + 7)
    assert clipped and (lo, hi) == (float(clean.min()), float(clean.max()))


def test_an_extreme_calibration_value_is_clipped_with_a_note(fmnist):
    spec, fp32, _, sites = fmnist
    tensors = list(dict.fromkeys(sites.values()))
    notes = []
    ranges = calibrate(fp32, tensors, _with_outlier(spec, 3, 3e38).calibration,
                       progress=False, log=notes.append)
    plain = _plain_ranges(fp32, tensors, spec.calibration)
    assert len(notes) == 1 and "\n" not in notes[0]
    assert "'input'" in notes[0] and "3e+38" in notes[0] and "used [" in notes[0]
    for name, (lo, hi) in plain.items():  # every range as on the clean data, within 10%
        assert ranges[name].min == pytest.approx(lo, rel=0.1, abs=1e-6), name
        assert ranges[name].max == pytest.approx(hi, rel=0.1), name


def test_compiling_with_an_extreme_value_gives_a_sane_checked_model(fmnist, tmp_path, capsys):
    spec = _with_outlier(fmnist[0], 0, 3e38)  # in a batch the export check runs on, too
    lines = []
    exported = export(spec, resolve_target("auto"), "onnxruntime", tmp_path, log=lines.append,
                      progress=False)
    lines += capsys.readouterr().out.splitlines()
    assert any("clipped the range of 'input'" in line and "3e+38" in line for line in lines)
    checks = exported.checks
    assert checks["qdq_cosine"] > 0.95 and checks["qdq_top1_agreement"] > 0.85
    # the inputs are clipped before anything runs on them: the torch reference stays finite
    assert checks.get("reference_nonfinite_samples", 0) == 0 and checks["samples"] == 64


def test_the_export_check_fails_a_qdq_model_with_a_broken_range(fmnist, tmp_path):
    """The model calibration made before outliers were clipped: the input range reaches 3e38,
    so every ordinary input quantizes to zero."""
    spec, fp32, layers, sites = fmnist
    ranges = calibrate(fp32, list(dict.fromkeys(sites.values())), spec.calibration,
                       progress=False)
    ranges["input"] = TensorRange(min=-0.81, max=3e38, clip=3e38)
    quant = {
        la.node: LayerQuant(la, "uint8_per_tensor" if ranges[sites[la.node]].non_negative
                            else "int8_sym_per_tensor")
        for la in layers
    }
    onnx.save(fp32, str(tmp_path / "fp32.onnx"))
    onnx.save(insert_qdq(fp32, quant, ranges), str(tmp_path / "qdq.onnx"))
    args = (lambda b: torch_outputs(spec.model, b, ["input"]), str(tmp_path / "fp32.onnx"),
            str(tmp_path / "qdq.onnx"), spec.calibration[:2])
    with pytest.raises(ExportError) as err:
        check_exported(*args)
    message = str(err.value)
    assert "\n" not in message and "export check 'QDQ cosine' failed" in message
    assert f"expected >= {QDQ_MIN_COSINE}" in message and "calibration batches" in message
    # Without the floors (a compressed student is checked against itself elsewhere) the same
    # model is measured and recorded, not failed.
    assert check_exported(*args, floors=False)["qdq_cosine"] < QDQ_MIN_COSINE


def test_top1_agreement_floor_applies_to_classifiers_on_enough_samples():
    checks = {"qdq_cosine": 0.9, "qdq_top1_agreement": 0.0, "samples": 64.0}
    with pytest.raises(ExportError, match=r"'QDQ top-1 agreement' failed.* 0\.0% of 64 "):
        check_fidelity(checks, classes=10)
    check_fidelity(checks, classes=1)  # one output per sample: argmax says nothing
    check_fidelity({**checks, "samples": 4.0}, classes=10)  # too few samples to judge


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_calibration_data_is_refused_in_one_line(fmnist, bad):
    spec, fp32, _, sites = fmnist
    calibration = [dict(b) for b in spec.calibration]
    x = calibration[1]["input"].copy()
    x[5, 0, 3, 3] = x[9, 0, 0, 0] = bad
    calibration[1]["input"] = x
    with pytest.raises(DataError) as err:
        calibrate(fp32, list(sites.values()), calibration, progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert "calibration[1]['input'] contains 2 NaN or infinite values" in message
    assert "sample 5" in message and "Clean or drop those samples" in message
