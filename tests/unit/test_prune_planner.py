"""Hardware-aware pruning amounts: the cost model's pruned shapes match a really pruned model, the
greedy planner meets its target deterministically and monotonically, and on an NVIDIA profile a
plan combines channel pruning with 2:4 on what remains."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from deploycomp.errors import DeployCompError
from deploycomp.export.onnx_export import export_fp32
from deploycomp.hw import load_profile
from deploycomp.modelspec import ModelSpec
from deploycomp.plan.inventory import build_inventory
from deploycomp.plan.joint_planner import Budget, layer_options, plan_joint
from deploycomp.prune import build_groups, prune_group
from deploycomp.prune.planner import channel_effects, plan_amounts, pruned_layers


class Net(nn.Module):
    """Conv + BN, an inverted residual (expand, depthwise, project, residual add), then an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(32, 96, 1), nn.BatchNorm2d(96), nn.ReLU6())
        self.depthwise = nn.Sequential(
            nn.Conv2d(96, 96, 3, padding=1, groups=96), nn.BatchNorm2d(96), nn.ReLU6()
        )
        self.project = nn.Sequential(nn.Conv2d(96, 32, 1), nn.BatchNorm2d(32))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc1 = nn.Linear(32, 1024)
        self.fc2 = nn.Linear(1024, 1024)
        self.fc3 = nn.Linear(1024, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.depthwise(self.expand(x)))
        x = self.pool(x)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():  # give the BatchNorms real statistics so zeroing is not a no-op
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _inventory(model: nn.Module, path: Path, batch: int = 64, size: int = 32):
    x = torch.randn(batch, 3, size, size)
    spec = ModelSpec(
        name="net", model=model, example_inputs={"x": x.numpy()}, calibration=[{"x": x.numpy()}],
        eval_sets=[], batch_sizes=(batch,),
    )  # fmt: skip
    return build_inventory(export_fp32(spec, path), spec.dims(batch))


def _plan(model, layers, hw, backend, **kwargs):
    batches = [(torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(2)),)]
    groups = build_groups(model, (torch.randn(2, 3, 16, 16),)).prunable()
    return plan_amounts(
        model, groups, layers, hw, backend, multiple=16, batches=batches,
        forward=lambda m, b: m(*b), **kwargs,
    )  # fmt: skip


def test_predicted_shapes_match_the_pruned_model(tmp_path):
    model = _model()
    layers = _inventory(model, tmp_path / "full.onnx")
    hw = load_profile("intel/xeon-icx")
    amounts = _plan(model, layers, hw, "openvino", latency_target=None, keep_fraction=0.5)
    assert all("keep 50%, rounded up to a multiple of 16" in p.reason for p in amounts.plans)
    pruned = copy.deepcopy(model)
    for p in amounts.plans:
        if p.drop:
            prune_group(pruned, p.group, p.keep)
    real = {la.name: la for la in _inventory(pruned, tmp_path / "pruned.onnx")}
    groups = [p.group for p in amounts.plans]
    keep = [len(p.keep) for p in amounts.plans]
    predicted = pruned_layers(layers, channel_effects(model, groups), groups, keep)
    changed = 0
    for before, after in zip(layers, predicted):
        want = real[after.name]
        assert (after.in_channels, after.out_channels) == (want.in_channels, want.out_channels)
        assert after.macs == want.macs and after.weight_bytes_fp32 == want.weight_bytes_fp32
        assert after.weight_shape == want.weight_shape and after.groups == want.groups
        assert after.activation_bytes_fp32 == want.activation_bytes_fp32
        changed += after.macs != before.macs
    assert changed >= 6  # stem, expand, depthwise, project, fc1, fc2, fc3 lose channels


def test_planned_amounts_meet_the_target_deterministically(tmp_path):
    model = _model()
    layers = _inventory(model, tmp_path / "full.onnx")
    hw = load_profile("intel/xeon-icx")
    loose = _plan(model, layers, hw, "openvino", latency_target=0.5, keep_fraction=None)
    again = _plan(model, layers, hw, "openvino", latency_target=0.5, keep_fraction=None)
    tight = _plan(model, layers, hw, "openvino", latency_target=0.3, keep_fraction=None)
    assert [p.drop for p in loose.plans] == [p.drop for p in again.plans]
    for plan in (loose, tight):
        assert plan.reached and plan.pruned_fastest_ms <= plan.target_ms
        for p in plan.plans:
            assert len(p.keep) % 16 == 0 or len(p.keep) == p.group.size
            assert p.predicted_saving_ms is not None and p.loss_increase >= 0
    kept = lambda plan: sum(len(p.keep) for p in plan.plans)
    assert kept(tight) < kept(loose) < sum(p.group.size for p in loose.plans)
    assert tight.pruned_fastest_ms < loose.pruned_fastest_ms


def test_amounts_need_exactly_one_of_target_and_fraction(tmp_path):
    model = _model()
    layers = _inventory(model, tmp_path / "full.onnx")
    with pytest.raises(DeployCompError, match="either a latency target"):
        _plan(model, layers, load_profile("intel/xeon-icx"), "openvino",
              latency_target=None, keep_fraction=None)  # fmt: skip


def test_nvidia_plan_combines_channel_pruning_with_2_4(tmp_path):
    model = _model()
    layers = _inventory(model, tmp_path / "full.onnx", batch=2048, size=4)
    hw = load_profile("nvidia/a100")
    amounts = _plan(model, layers, hw, "tensorrt", latency_target=0.12, keep_fraction=None)
    assert any(p.drop for p in amounts.plans)
    pruned = copy.deepcopy(model)
    for p in amounts.plans:
        if p.drop:
            prune_group(pruned, p.group, p.keep)
    after = _inventory(pruned, tmp_path / "pruned.onnx", batch=2048, size=4)
    zero = {la.name: {} for la in after}
    for la in after:  # any option may be chosen: no sensitivity
        zero[la.name] = {o.key: 0.0 for o in layer_options(la, hw, "tensorrt",
                                                            unsigned_input=False)[0]}  # fmt: skip
    result = plan_joint(after, hw, "tensorrt", sensitivity=zero, budget=Budget(), batch_size=2048,
                        model_name="net", seed=0)  # fmt: skip
    sparse = [d for d in result.plan.layers if d.sparsity == "2:4"]
    assert sparse, [(d.name, d.weight, d.sparsity, d.reason) for d in result.plan.layers]
    pruned_names = {la.name for la, b in zip(after, layers) if la.macs < b.macs}
    assert pruned_names & {d.name for d in sparse}  # 2:4 on layers that also lost channels
