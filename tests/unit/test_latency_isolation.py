"""Engines of one backend are timed with no other runtime's sessions loaded.

A runtime's worker threads live as long as its sessions (ONNX Runtime's spin after each call), so
``api.measure`` loads, times and releases one backend at a time. These tests run the real
backends on a small CNN and look, at each call of the timing function, at which runtime objects
exist in the process; they check the mechanism, not a timing.
"""

from __future__ import annotations

import gc
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from deploycomp.api import MeasureConfig, lower, measure
from deploycomp.export.onnx_export import export_fp32
from deploycomp.measure import latency as latency_module
from deploycomp.modelspec import EvalSet, ModelSpec

ort = pytest.importorskip("onnxruntime")
ov = pytest.importorskip("openvino")

BACKENDS = ("openvino", "onnxruntime")
QUICK = MeasureConfig(rounds=1, block_runs=2, warmup_runs=1)


class SmallCnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


def _runtime_objects() -> dict[int, str]:
    """id -> backend of every ONNX Runtime session and OpenVINO compiled model alive now."""
    found = {}
    for obj in gc.get_objects():
        kind = type(obj)  # not isinstance: some lazy module attributes warn when probed
        if issubclass(kind, ort.InferenceSession):
            found[id(obj)] = "onnxruntime"
        elif issubclass(kind, ov.CompiledModel):
            found[id(obj)] = "openvino"
    return found


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((16, 1, 8, 8)).astype(np.float32)
    batches = [{"x": images[:8]}, {"x": images[8:]}]
    eval_set = EvalSet("random", batches, labels=rng.integers(0, 10, 16))
    spec = ModelSpec("small-cnn", SmallCnn().eval(), {"x": images[:1]}, batches, [eval_set],
                     batch_sizes=(1, 4))
    run_dir = tmp_path_factory.mktemp("isolation")
    export_fp32(spec, run_dir / "model_fp32.onnx")
    shutil.copy(run_dir / "model_fp32.onnx", run_dir / "model.onnx")
    engines = lower(run_dir, BACKENDS, log=lambda _: None)
    return spec, engines


@pytest.fixture
def timed_calls(monkeypatch):
    """The real timing function, recording what it was given and which runtimes were alive."""
    real = latency_module.measure_latency
    already_alive = set(_runtime_objects())  # held elsewhere in this process, not by measure
    calls = []

    def recording(sessions, inputs, **kwargs):
        alive = {i: b for i, b in _runtime_objects().items() if i not in already_alive}
        batch = int(next(iter(inputs.values())).shape[0])
        calls.append({"keys": sorted(sessions), "alive": sorted(set(alive.values())),
                      "alive_count": len(alive), "batch": batch})
        return real(sessions, inputs, **kwargs)

    monkeypatch.setattr(latency_module, "measure_latency", recording)
    return calls


def test_each_backend_is_timed_alone_with_its_own_fp32_baseline(built, timed_calls):
    spec, engines = built
    result = measure(spec, engines, QUICK, log=lambda _: None, progress=False)

    keys = {b: sorted(f"{e.backend}-{e.variant}" for e in engines if e.backend == b)
            for b in BACKENDS}
    for call in timed_calls:
        backend = call["keys"][0].split("-")[0]
        assert call["keys"] == keys[backend], "every engine of one backend, no other, per call"
        assert f"{backend}-fp32" in call["keys"]  # ratios are taken within one timing call
        assert call["alive"] == [backend], f"{call['alive']} alive while timing {backend}"
        assert call["alive_count"] == len(keys[backend])
    timed = [(c["keys"][0].split("-")[0], c["batch"]) for c in timed_calls]
    assert sorted(timed) == sorted((b, n) for b in BACKENDS for n in spec.batch_sizes)

    assert {(r.backend, r.variant, r.stats.batch_size) for r in result.latency} == {
        (e.backend, e.variant, n) for e in engines for n in spec.batch_sizes
    }
    assert [(r.backend, r.variant) for r in result.accuracy] == [
        ("torch", "fp32"), *((e.backend, e.variant) for e in engines)
    ]
    for row in result.accuracy[1:]:  # the same fp32 graph as the reference (bf16 by default)
        assert row.num_samples == 16 and row.finite
        assert row.top1_agreement == 1.0 or row.variant == "default_precision"


def test_no_session_outlives_the_measurement(built, timed_calls):
    spec, engines = built
    before = set(_runtime_objects())
    measure(spec, engines, QUICK, log=lambda _: None, progress=False)
    assert set(_runtime_objects()) <= before


def test_each_block_waits_for_the_previous_blocks_threads_to_go_idle():
    import threading
    import time

    from deploycomp.measure.latency import SETTLE_MAX_S, settle

    assert settle() < 0.1  # an idle process starts at once

    def spin(seconds: float) -> None:  # a runtime's worker spinning after its call returned
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    worker = threading.Thread(target=spin, args=(0.25,))
    worker.start()
    waited = settle()
    worker.join()
    assert 0.2 <= waited <= SETTLE_MAX_S + 0.1
