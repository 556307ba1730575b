"""Sensitivity: the loss increase of each (layer, option) with only that layer compressed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from deploycomp.errors import DeployCompError
from deploycomp.plan.options import ACT_INT8, WEIGHT_INT4, WEIGHT_INT8, Option
from deploycomp.plan.sensitivity import measure_sensitivity, module_for_layers


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


OPTIONS = [
    Option(),
    Option(WEIGHT_INT8, ACT_INT8),
    Option(WEIGHT_INT4),
    Option(WEIGHT_INT8, ACT_INT8, "2:4"),
]


def test_scores_grow_with_damage_and_leave_the_model_unchanged():
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    batches = [torch.randn(32, 256) for _ in range(2)]
    table = measure_sensitivity(
        model,
        {"0": OPTIONS, "2": OPTIONS},
        batches,
        _forward,
        input_clips={"0": 5.0, "2": 5.0},
        progress=False,
    )
    for name in ("0", "2"):
        row = table[name]
        assert row["fp32"] == 0.0
        # int8 rounding < int4 rounding < pruning half of the weights
        assert 0 < row["int8"] < row["int4 w-only"] < row["2:4+int8"]
    assert all(isinstance(m, nn.Linear) for m in (model[0], model[2]))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_is_deterministic():
    batches = [torch.randn(16, 256, generator=torch.Generator().manual_seed(1))]
    first = measure_sensitivity(_mlp(), {"0": OPTIONS}, batches, _forward, progress=False)
    second = measure_sensitivity(_mlp(), {"0": OPTIONS}, batches, _forward, progress=False)
    assert first == second


def test_needs_batches():
    with pytest.raises(DeployCompError, match="calibration batches"):
        measure_sensitivity(_mlp(), {"0": OPTIONS}, [], _forward, progress=False)


def test_module_for_layers_keeps_only_real_modules(tmp_path):
    from deploycomp.export.onnx_export import export_fp32
    from deploycomp.modelspec import ModelSpec
    from deploycomp.plan.inventory import build_inventory

    model = _mlp().eval()
    x = torch.randn(4, 256).numpy()
    spec = ModelSpec(name="mlp", model=model, example_inputs={"x": x}, calibration=[{"x": x}])
    layers = build_inventory(export_fp32(spec, tmp_path / "m.onnx"), {"batch": 1})
    assert module_for_layers(model, layers) == {"0": "0", "2": "2"}
