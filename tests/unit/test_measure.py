"""The measuring code itself: latency statistics, interleaving, output comparison, machine load.

Sessions here are real :class:`Session` subclasses that sleep a known time or record the call
order; they test the timing harness, not a backend.
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np
import pytest

from deploycomp.artifacts import AccuracyRow, LatencyStats, MachineLoad
from deploycomp.backends.base import Session
from deploycomp.errors import BackendError, DataError, DeployCompError
from deploycomp.measure import (
    accuracy_row,
    collect_environment,
    compare_outputs,
    evaluate,
    latency_stats,
    measure_latency,
    monitor_load,
    pin_threads,
)
from deploycomp.modelspec import EvalSet

BATCH = {"x": np.zeros((8, 4), dtype=np.float32)}


class SleepSession(Session):
    """Sleeps ``sleep_ms`` per call and records its calls in a shared log."""

    input_names = ("x",)

    def __init__(self, name: str, sleep_ms: float, log: list[str]) -> None:
        self.name, self.sleep_ms, self.log = name, sleep_ms, log

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.log.append(self.name)
        time.sleep(self.sleep_ms / 1e3)
        return [inputs["x"][:, :2]]


class FailingSession(Session):
    input_names = ("x",)

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise RuntimeError("device lost")


def test_latency_stats_math():
    stats = latency_stats(np.arange(1, 101) * 1_000_000, batch_size=4)  # 1..100 ms
    assert isinstance(stats, LatencyStats)
    assert stats.runs == 100
    assert stats.median_ms == pytest.approx(50.5)
    assert stats.p90_ms == pytest.approx(90.1)
    assert stats.p99_ms == pytest.approx(99.01)
    assert stats.mean_ms == pytest.approx(50.5)
    assert stats.min_ms == pytest.approx(1.0)
    assert stats.throughput_per_s == pytest.approx(4 / 0.0505, rel=1e-4)


def test_sleeping_sessions_are_timed_in_order_of_their_sleep():
    log: list[str] = []
    sessions = {"slow": SleepSession("slow", 4.0, log), "fast": SleepSession("fast", 1.0, log)}
    result = measure_latency(sessions, BATCH, warmup_runs=1, block_runs=3, rounds=2)
    slow, fast = result.stats["slow"], result.stats["fast"]
    assert slow.runs == fast.runs == 6
    assert slow.batch_size == 8
    assert slow.min_ms >= 4.0 and fast.min_ms >= 1.0  # sleep never returns early
    assert slow.median_ms > fast.median_ms + 1.5
    assert slow.throughput_per_s == pytest.approx(8 / (slow.median_ms / 1e3), rel=1e-3)


def test_blocks_are_interleaved_and_rotated():
    log: list[str] = []
    sessions = {name: SleepSession(name, 0.0, log) for name in ("a", "b", "c")}
    measure_latency(sessions, BATCH, warmup_runs=1, block_runs=2, rounds=3, max_attempts=1)
    warmup, timed = log[:3], log[3:]
    assert warmup == ["a", "b", "c"]
    blocks = [timed[i] for i in range(0, len(timed), 2)]
    assert all(timed[i] == timed[i + 1] for i in range(0, len(timed), 2))
    assert blocks == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_per_session_inputs_and_missing_inputs():
    log: list[str] = []
    sessions = {"a": SleepSession("a", 0.0, log), "b": SleepSession("b", 0.0, log)}
    small = {"x": np.zeros((2, 4), np.float32)}
    result = measure_latency(sessions, {"a": BATCH, "b": small}, warmup_runs=0, rounds=1)
    assert result.stats["a"].batch_size == 8 and result.stats["b"].batch_size == 2
    with pytest.raises(DataError, match=r"no inputs for sessions \['b'\]"):
        measure_latency(sessions, {"a": BATCH}, rounds=1)


def test_machine_load_is_reported_with_attempts():
    sessions = {"a": SleepSession("a", 0.5, [])}
    result = measure_latency(sessions, BATCH, warmup_runs=0, block_runs=2, rounds=2)
    if not sys.platform.startswith("linux"):
        assert result.machine_load is None
        return
    load = result.machine_load
    assert isinstance(load, MachineLoad)
    assert 1 <= load.attempts <= 3
    assert 0.0 <= load.other_cpu_fraction <= 1.0
    assert load.idle == (load.other_cpu_fraction <= 0.10) or load.attempts == 3


def test_invalid_settings_and_failing_sessions_are_clear_errors():
    with pytest.raises(DeployCompError, match="block_runs=0"):
        measure_latency({"a": SleepSession("a", 0, [])}, BATCH, block_runs=0)
    with pytest.raises(BackendError, match="session 'bad' failed.*device lost"):
        measure_latency({"bad": FailingSession()}, BATCH, rounds=1)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs the Linux affinity API")
def test_pin_threads_pins_and_restores():
    import torch

    original, torch_threads = os.sched_getaffinity(0), torch.get_num_threads()
    try:
        cpus = pin_threads(1)
        assert cpus == [min(original)]
        assert os.sched_getaffinity(0) == {cpus[0]} and torch.get_num_threads() == 1
        with pytest.raises(DeployCompError, match="cannot pin"):
            pin_threads(len(original) + 1)
    finally:
        os.sched_setaffinity(0, original)
        torch.set_num_threads(torch_threads)


def test_monitor_load_fractions_are_sane():
    with monitor_load() as window:
        deadline = time.perf_counter() + 0.05
        while time.perf_counter() < deadline:  # busy: counted as own time, not other
            pass
    if not os.path.exists("/proc/stat"):
        assert window.result is None
        return
    load = window.result
    assert 0.0 <= load.other_cpu_fraction <= 1.0
    assert load.loadavg_1m >= 0.0
    assert load.attempts == 1


def test_compare_identical_outputs():
    ref = np.random.default_rng(0).standard_normal((16, 10)).astype(np.float32)
    result = compare_outputs(ref, ref.copy())
    assert result["top1_agreement"] == 1.0
    assert result["cosine"] == pytest.approx(1.0)
    assert result["sqnr_db"] == math.inf
    assert result["finite"] is True


def test_compare_noisy_outputs():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((64, 10))
    noisy = ref + 0.01 * rng.standard_normal(ref.shape)
    result = compare_outputs(ref, noisy)
    assert 35.0 < result["sqnr_db"] < 45.0  # noise 100x below the signal in amplitude: ~40 dB
    assert 0.9 < result["top1_agreement"] <= 1.0
    assert 0.999 < result["cosine"] < 1.0


def test_compare_nan_outputs_and_shape_mismatch():
    ref = np.ones((4, 3))
    bad = ref.copy()
    bad[1, 2] = np.nan
    result = compare_outputs(ref, bad)
    assert result["finite"] is False
    assert result["sqnr_db"] is None and result["cosine"] is None
    with pytest.raises(DataError, match="shape"):
        compare_outputs(ref, np.ones((4, 2)))


def test_zero_rows_have_cosine_one():
    assert compare_outputs(np.zeros((2, 3)), np.zeros((2, 3)))["cosine"] == 1.0


def test_evaluate_and_accuracy_row():
    batches = [{"x": np.eye(4, dtype=np.float32)[:2]}, {"x": np.eye(4, dtype=np.float32)[2:]}]
    eval_set = EvalSet(name="eye", batches=batches, labels=np.array([0, 1, 2, 0]))

    def identity(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [inputs["x"]]

    logits, top1 = evaluate(identity, eval_set, progress=False)
    assert logits.shape == (4, 4) and top1 == 0.75
    row = accuracy_row("onnxruntime", "compiled", eval_set, logits, top1, np.eye(4))
    assert isinstance(row, AccuracyRow)
    assert (row.metric, row.value, row.num_samples, row.top1_agreement) == ("top1", 0.75, 4, 1.0)
    assert AccuracyRow.from_dict(row.to_dict()) == row

    unlabelled = EvalSet(name="eye", batches=batches)
    assert evaluate(identity, unlabelled, progress=False)[1] is None
    with pytest.raises(DataError, match="3 labels for 4 samples"):
        evaluate(identity, EvalSet("eye", batches, labels=np.arange(3)), progress=False)


def test_environment_lists_versions_without_importing_backends():
    env = collect_environment()
    assert env["versions"]["deploycomp"]
    assert env["cpu_count"] >= 1
    assert set(env["cpu_flags"]) <= {
        "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
        "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "amx_fp16",
    }  # fmt: skip
    assert {"torch", "numpy", "onnx", "onnxruntime", "openvino"} <= set(env["versions"])
    assert env["versions"]["numpy"] == np.__version__
