"""fold_: trained wrappers become plain layers on the exact quantization grid, with export info."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from deploycomp.artifacts import CompressionPlan, LayerDecision
from deploycomp.compress.fold import fold_
from deploycomp.compress.joint import JointConfig, compress_, train_joint
from deploycomp.compress.modules import CompressedLinear, _CompressedLayer
from deploycomp.errors import DeployCompError


class _ConvNet(nn.Module):
    """A dense conv (K = 4 * 3 * 3 = 36), a depthwise conv and two linears, on 4x8x8."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect")
        self.depthwise = nn.Conv2d(8, 8, 3, groups=8, bias=False)
        self.fc1 = nn.Linear(8 * 3 * 3, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = nn.functional.avg_pool2d(torch.relu(self.depthwise(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _decision(name, kind, shape, weight, activation, sparsity):
    return LayerDecision(name, f"/{name}/op", kind, shape, 0, weight, activation, sparsity, "test")


PLAN = CompressionPlan(
    "convnet",
    "cpu",
    8,
    (
        _decision("conv", "conv2d", (8, 4, 3, 3), "int4_sym_group12", "int8_sym_per_tensor", "2:4"),
        _decision(
            "depthwise", "conv2d_depthwise", (8, 1, 3, 3), "int8_sym_per_channel", "fp32", "none"
        ),
        _decision("fc1", "linear", (32, 72), "int8_sym_per_channel", "uint8_per_tensor", "2:4"),
        _decision("fc2", "linear", (10, 32), "fp32", "fp32", "2:4"),
    ),
    seed=0,
)
GRIDS = {"int8_sym_per_tensor": (-128, 127), "uint8_per_tensor": (0, 255)}


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randn(16, 4, 8, 8, generator=generator) for _ in range(3)]


def _trained() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = _ConvNet()
    teacher = copy.deepcopy(model)
    compress_(model, PLAN)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    config = JointConfig(steps=12, lr=3e-3, mask_update_every=3, log_every=4)
    train_joint(model, teacher, _batches(), config, progress=False)
    return model.eval(), teacher


def test_fold_gives_plain_layers_on_the_exact_grid_with_zeros_where_pruned():
    model, _ = _trained()
    info = fold_(model)
    assert sorted(info) == ["conv", "depthwise", "fc1", "fc2"]
    assert not any(isinstance(m, _CompressedLayer) for m in model.modules())
    assert type(model.conv) is nn.Conv2d and model.conv.padding_mode == "reflect"
    assert model.depthwise.groups == 8 and model.depthwise.bias is None
    for name, layer_info in info.items():
        weight = model.get_submodule(name).weight.detach().numpy()
        rows = weight.reshape(weight.shape[0], -1)
        mask = layer_info["mask"]
        if mask is not None:
            assert mask.dtype == np.bool_ and mask.shape == weight.shape
            assert np.all(weight[~mask] == 0.0), name
            groups = mask.reshape(mask.shape[0], -1, 4).sum(axis=-1)
            assert np.all(groups == 2), name
        scale = layer_info["weight_scale"]
        if layer_info["weight"] == "fp32":
            assert scale is None
            continue
        assert scale.dtype == np.float32
        qmax = 7 if layer_info["weight"].startswith("int4") else 127
        # one step per channel ([out]) or per group of consecutive weights ([out, K / g])
        steps = scale.reshape(scale.shape[0], -1)
        per_element = np.repeat(steps, rows.shape[1] // steps.shape[1], axis=1)
        codes = np.rint(rows / per_element)
        assert np.abs(codes).max() <= qmax, name
        assert np.array_equal(codes.astype(np.float32) * per_element, rows), name
    assert info["conv"]["weight_scale"].shape == (8, 3)
    assert info["fc1"]["weight_scale"].shape == (32,)
    assert info["depthwise"]["mask"] is None and info["depthwise"]["activation_scale"] is None
    assert info["fc1"]["activation"] == "uint8_per_tensor"
    assert info["fc1"]["activation_scale"] > 0 and isinstance(
        info["fc1"]["activation_scale"], float
    )


def test_folded_model_with_input_fake_quant_reproduces_the_wrapped_model():
    model, _ = _trained()
    x = torch.randn(8, 4, 8, 8)
    with torch.no_grad():
        expected = model(x)
    info = fold_(model)

    def input_fake_quant(scheme, scale):
        qmin, qmax = GRIDS[scheme]
        return lambda module, args: torch.clamp(torch.round(args[0] / scale), qmin, qmax) * scale

    for name, layer_info in info.items():
        if layer_info["activation_scale"] is not None:
            hook = input_fake_quant(layer_info["activation"], layer_info["activation_scale"])
            model.get_submodule(name).register_forward_pre_hook(hook)
    with torch.no_grad():
        folded = model(x)
    # The folded weight is the grid value at the exported scale; training's forward differs from
    # it by the float rounding of LSQ's gradient scaling (about 1e-7 relative).
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)


def test_single_layer_fold_matches_the_wrapper_forward():
    torch.manual_seed(0)
    layer = CompressedLinear(
        nn.Linear(16, 8), weight="int4_sym_group8", activation="int8_sym_per_tensor"
    )
    x = torch.randn(32, 16)
    layer.train()(x)  # calibrates the input quantizer
    model = nn.Sequential(layer).eval()
    input_quant = layer.input_quant
    with torch.no_grad():
        expected = model(x)
        fold_(model)
        folded = model(input_quant(x))
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    assert model[0].bias is layer.bias


def test_fold_refuses_an_uncalibrated_input_quantizer_and_leaves_the_model():
    model = _ConvNet()
    compress_(model, PLAN)
    with pytest.raises(DeployCompError, match="'conv'.*never seen a batch"):
        fold_(model)
    assert isinstance(model.conv, _CompressedLayer)
    with pytest.raises(DeployCompError, match="bare CompressedLinear"):
        fold_(CompressedLinear(nn.Linear(8, 4)))
