"""Joint compression in torch: LSQ numerics, compress_ on a plan, distillation training, resume."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from deploycomp.artifacts import CompressionPlan, LayerDecision
from deploycomp.compress.fake_quant import ActivationFakeQuant, WeightFakeQuant
from deploycomp.compress.joint import JointConfig, compress_, train_joint
from deploycomp.compress.modules import CompressedConv2d, CompressedLinear
from deploycomp.errors import DeployCompError
from deploycomp.kernels.sparsity import is_2_4_sparse, mask_2_4

INT8_W, INT8_A = "int8_sym_per_channel", "int8_sym_per_tensor"


class _TinyNet(nn.Module):
    """2 convolutions (a dense one with K = 9, a depthwise one) and 2 linears, on 1x12x12."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(), nn.AvgPool2d(2)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10)
        )
        with torch.no_grad():  # confident logits, so that distillation has something to match
            self.classifier[3].weight.mul_(10.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _decision(name, kind, shape, weight=INT8_W, activation=INT8_A, sparsity="2:4"):
    return LayerDecision(name, f"/{name}/op", kind, shape, 0, weight, activation, sparsity, "test")


def _plan(*decisions: LayerDecision) -> CompressionPlan:
    return CompressionPlan("tiny", "cpu", 8, tuple(decisions), seed=0)


def _full_plan() -> CompressionPlan:
    """2:4 + int8 on the layers whose reduction size allows it, int8 alone on the rest."""
    return _plan(
        _decision("features.0", "conv2d", (8, 1, 3, 3), sparsity="none"),
        _decision("features.2", "conv2d_depthwise", (8, 1, 3, 3), sparsity="none"),
        _decision("classifier.1", "linear", (32, 128), activation="uint8_per_tensor"),
        _decision("classifier.3", "linear", (32, 10), activation="uint8_per_tensor"),
    )


def _batches(n: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(16, 1, 12, 12, generator=generator) for _ in range(n)]


def _student_teacher() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = _TinyNet()
    teacher = copy.deepcopy(model)
    compress_(model, _full_plan())
    return model, teacher


# ------------------------------------------------------------------ fake quantization numerics


@pytest.mark.parametrize("scheme, qmax, group", [(INT8_W, 127, None), ("int4_sym_group4", 7, 4)])
def test_weight_fake_quant_forward_is_round_clip_scale(scheme, qmax, group):
    weight = torch.randn(6, 2, 2, 2)
    quant = WeightFakeQuant(scheme, weight)
    with torch.no_grad():
        quant.step.mul_(0.8)  # so that the extremes clip
    step = quant.scale()
    if group is None:
        assert step.shape == (6,)
        rows, step_view = weight.reshape(6, 8), step.reshape(6, 1)
        expected = (torch.round(rows / step_view).clamp(-qmax, qmax) * step_view).reshape(
            6, 2, 2, 2
        )
    else:
        assert step.shape == (6, 2)
        rows, step_view = weight.reshape(6, 2, 4), step.reshape(6, 2, 1)
        expected = (torch.round(rows / step_view).clamp(-qmax, qmax) * step_view).reshape(
            6, 2, 2, 2
        )
    torch.testing.assert_close(quant(weight), expected, rtol=0, atol=1e-6)
    codes = quant.to_integer(weight)
    assert codes.abs().max() == qmax
    torch.testing.assert_close(
        codes.reshape(6, -1).float() * step.repeat_interleave(group or 8, dim=-1).reshape(6, -1),
        expected.reshape(6, -1),
        rtol=0,
        atol=1e-6,
    )


def test_weight_step_initialised_on_surviving_weights():
    weight = torch.tensor([[4.0, -1.0, 0.5, 0.2, 0.1, 0.3, -0.6, 0.0]])
    mask = torch.tensor([[False, True, True, False, True, True, True, False]])
    torch.testing.assert_close(
        WeightFakeQuant("int4_sym_group4", weight).scale(), torch.tensor([[4.0 / 7, 0.6 / 7]])
    )
    quant = WeightFakeQuant("int4_sym_group4", weight, mask)
    torch.testing.assert_close(quant.scale(), torch.tensor([[1.0 / 7, 0.6 / 7]]))
    step_parameter = quant.step
    quant.reinit(weight)
    assert quant.step is step_parameter
    assert quant.scale()[0, 0].item() == pytest.approx(4.0 / 7)


def test_gradient_reaches_the_step_sizes():
    weight = torch.randn(4, 16, requires_grad=True)
    quant = WeightFakeQuant("int4_sym_group8", weight)
    (quant(weight) ** 2).sum().backward()
    assert quant.step.grad.shape == (4, 2)
    assert quant.step.grad.abs().min() > 0
    assert weight.grad is not None and weight.grad.abs().sum() > 0

    act = ActivationFakeQuant("int8_sym_per_tensor").train()
    x = torch.randn(32, requires_grad=True)
    (act(x) * torch.arange(32.0)).sum().backward()
    assert act.step.grad is not None and act.step.grad.abs() > 0


@pytest.mark.parametrize("scheme, qmin, qmax", [(INT8_A, -128, 127), ("uint8_per_tensor", 0, 255)])
def test_activation_fake_quant_initialises_from_first_training_batch(scheme, qmin, qmax):
    quant = ActivationFakeQuant(scheme)
    x = torch.linspace(-2.0, 3.0, 101)
    assert not quant.initialized
    torch.testing.assert_close(quant.eval()(x), x)  # identity until a training batch is seen
    out = quant.train()(x)
    assert quant.initialized
    step = quant.scale()
    assert step.item() == pytest.approx(3.0 / qmax)
    torch.testing.assert_close(
        out, torch.round(x / step).clamp(qmin, qmax) * step, rtol=0, atol=1e-6
    )
    quant(3 * x)  # later batches do not move the step
    assert quant.scale().item() == pytest.approx(step.item())


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(DeployCompError, match="int4_sym_group<g>"):
        WeightFakeQuant("int3_sym", torch.randn(2, 4))
    with pytest.raises(DeployCompError, match="multiple of 32"):
        WeightFakeQuant("int4_sym_group32", torch.randn(2, 48))
    with pytest.raises(DeployCompError, match="uint8_per_tensor"):
        ActivationFakeQuant("int16")


# ------------------------------------------------------------------------------- compress_


def test_compress_wraps_planned_modules_and_keeps_parameters():
    model = _TinyNet()
    weight = model.classifier[1].weight
    keys = set(model.state_dict())
    plan = _plan(
        _decision("features.0", "conv2d", (8, 1, 3, 3), activation="fp32", sparsity="none"),
        _decision("classifier.1", "linear", (128, 32)),  # MatMul layout, [in, out]
        _decision(
            "classifier.3", "linear", (10, 32), weight="fp32", activation="fp32", sparsity="none"
        ),
        _decision("add_0", "add", (), weight="none", sparsity="none"),
    )
    assert compress_(model, plan) is None
    assert isinstance(model.features[0], CompressedConv2d)
    assert isinstance(model.classifier[1], CompressedLinear)
    assert type(model.features[2]) is nn.Conv2d and type(model.classifier[3]) is nn.Linear
    assert model.classifier[1].weight is weight
    assert model.features[0].input_quant is None and model.features[0].mask is None
    assert keys <= set(model.state_dict())
    assert model(torch.randn(2, 1, 12, 12)).shape == (2, 10)


def test_compress_unknown_name_lists_known_modules():
    model = _TinyNet()
    with pytest.raises(DeployCompError, match=r"'classifer.1'.*classifier\.1"):
        compress_(model, _plan(_decision("classifer.1", "linear", (32, 128))))
    assert type(model.classifier[1]) is nn.Linear


def test_compress_rejects_2_4_on_ineligible_layer_and_leaves_model_untouched():
    model = _TinyNet()
    plan = _plan(
        _decision("classifier.1", "linear", (32, 128)),
        _decision("features.2", "conv2d_depthwise", (8, 1, 3, 3)),  # reduction size 9
    )
    with pytest.raises(DeployCompError, match=r"'features\.2'.*multiple of 4, got 9"):
        compress_(model, plan)
    assert type(model.classifier[1]) is nn.Linear


def test_compress_rejects_kind_mismatch():
    with pytest.raises(DeployCompError, match="kind 'linear'.*Conv2d"):
        compress_(_TinyNet(), _plan(_decision("features.0", "linear", (8, 1, 3, 3))))


def test_compressed_weights_are_2_4_sparse_and_on_the_int8_grid():
    model, _ = _student_teacher()
    for name in ("classifier.1", "classifier.3"):
        layer = model.get_submodule(name)
        assert layer.mask is not None
        effective = layer.effective_weight().detach()
        assert is_2_4_sparse(effective), name
        for row in effective:
            assert row.unique().numel() <= 255
        codes = layer.weight_quant.to_integer(effective)
        torch.testing.assert_close(
            codes.float() * layer.weight_quant.scale()[:, None], effective, rtol=0, atol=1e-6
        )
    assert model.get_submodule("features.0").mask is None


# ------------------------------------------------------------------------------ train_joint


def test_train_joint_lowers_distillation_loss_and_freezes_masks():
    student, teacher = _student_teacher()
    # Perturb the student so it starts measurably away from the teacher.
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.2 * torch.randn_like(p))
    config = JointConfig(
        steps=40,
        lr=3e-3,
        lr_quant=1e-3,
        temperature=2.0,
        mask_update_every=5,
        freeze_masks_at=0.5,
        seed=0,
        log_every=1,
    )
    teacher_before = copy.deepcopy(teacher.state_dict())
    history = train_joint(student, teacher, _batches(), config, progress=False)

    losses = history["losses"]
    assert len(losses) == 40 and history["final_loss"] == losses[-1]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert history["mask_freeze_step"] == 20
    assert [u["step"] for u in history["mask_updates"]] == [5, 10, 15]  # none at or after 20
    assert history["mask_updates"][0]["flips"] > 0
    for name in ("classifier.1", "classifier.3"):
        layer = student.get_submodule(name)
        assert bool(layer.mask_frozen) and layer.update_mask() == 0
        assert is_2_4_sparse(layer.effective_weight().detach())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key


def test_masks_stop_changing_after_the_freeze_point():
    config = JointConfig(steps=12, lr=5e-2, mask_update_every=2, freeze_masks_at=0.5, log_every=4)
    student, teacher = _student_teacher()
    history = train_joint(student, teacher, _batches(), config, progress=False)
    assert [u["step"] for u in history["mask_updates"]] == [2, 4]
    # The same run stopped at the freeze point (6 steps, same updates) holds the masks it froze.
    at_freeze, teacher = _student_teacher()
    short = dataclasses.replace(config, steps=6, freeze_masks_at=1.0)
    train_joint(at_freeze, teacher, _batches(), short, progress=False)
    for name in ("classifier.1", "classifier.3"):
        frozen = student.get_submodule(name)
        assert torch.equal(frozen.mask, at_freeze.get_submodule(name).mask), name
    # ... although the weights moved enough that a magnitude mask would now differ.
    layer = student.get_submodule("classifier.1")
    assert not torch.equal(mask_2_4(layer.weight), layer.mask)


class _Interrupted(Exception):
    pass


def _interrupt_after(model: nn.Module, calls: int) -> None:
    """Make ``model`` raise on its call number ``calls + 1``, as a killed run would stop."""
    seen = []

    def hook(module, inputs):
        seen.append(1)
        if len(seen) > calls:
            raise _Interrupted

    model.register_forward_pre_hook(hook)


def test_checkpoint_resume_matches_an_uninterrupted_run(tmp_path):
    config = JointConfig(
        steps=40,
        lr=3e-3,
        mask_update_every=5,
        freeze_masks_at=0.75,
        seed=3,
        log_every=5,
        checkpoint_every=10,
    )
    straight, teacher = _student_teacher()
    expected = train_joint(straight, teacher, _batches(), config, progress=False)

    checkpoint = tmp_path / "run" / "joint.pt"
    interrupted, teacher = _student_teacher()
    _interrupt_after(teacher, 23)
    with pytest.raises(_Interrupted):
        train_joint(
            interrupted, teacher, _batches(), config, progress=False, checkpoint_path=checkpoint
        )
    assert torch.load(checkpoint, weights_only=True)["step"] == 20
    assert [p.name for p in checkpoint.parent.iterdir()] == ["joint.pt"]  # no temporary left

    resumed, teacher = _student_teacher()  # a fresh process: same model, same plan
    history = train_joint(
        resumed,
        teacher,
        _batches(),
        config,
        progress=False,
        checkpoint_path=checkpoint,
        resume=True,
    )
    assert history["logged_steps"] == expected["logged_steps"]
    assert history["losses"] == pytest.approx(expected["losses"], abs=1e-6)
    assert [u["flips"] for u in history["mask_updates"]] == [
        u["flips"] for u in expected["mask_updates"]
    ]
    final = straight.state_dict()
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, final[key], rtol=0, atol=1e-6, msg=key)
    assert torch.load(checkpoint, weights_only=True)["step"] == 40


def test_resume_errors_are_clear(tmp_path):
    student, teacher = _student_teacher()
    config = JointConfig(steps=2, log_every=1)
    with pytest.raises(DeployCompError, match="no checkpoint"):
        train_joint(
            student,
            teacher,
            _batches(),
            config,
            progress=False,
            checkpoint_path=tmp_path / "missing.pt",
            resume=True,
        )
    train_joint(
        student, teacher, _batches(), config, progress=False, checkpoint_path=tmp_path / "ckpt.pt"
    )
    with pytest.raises(DeployCompError, match="different JointConfig.*'lr'"):
        train_joint(
            student,
            teacher,
            _batches(),
            JointConfig(steps=2, lr=1.0),
            progress=False,
            checkpoint_path=tmp_path / "ckpt.pt",
            resume=True,
        )
    with pytest.raises(DeployCompError, match="shares Parameters"):
        train_joint(student, student, _batches(), config, progress=False)


def test_joint_config_validates():
    with pytest.raises(DeployCompError, match="steps must be a positive int"):
        JointConfig(steps=0)
    with pytest.raises(DeployCompError, match="freeze_masks_at"):
        JointConfig(freeze_masks_at=1.5)
    assert JointConfig(steps=40, freeze_masks_at=0.75).freeze_step == 30


class _SamePaddedConv(nn.Conv2d):
    """An EfficientNet-port style convolution: "same" padding kept in a module, applied first."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.static_padding(x))


class _ScaledConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_a_same_padded_conv_subclass_is_wrapped_and_folded_with_its_padding():
    from deploycomp.compress.fold import plain_layer
    from deploycomp.compress.modules import wrappable

    torch.manual_seed(0)
    conv = _SamePaddedConv(4, 8, 3, stride=2)
    x = torch.randn(2, 4, 9, 9)
    wrapper = CompressedConv2d(conv)
    torch.testing.assert_close(wrapper(x), conv(x))
    torch.testing.assert_close(plain_layer(wrapper, wrapper.weight)(x), conv(x))
    assert not wrappable(_ScaledConv(4, 8, 3))
    with pytest.raises(DeployCompError, match="overrides Conv2d.forward"):
        CompressedConv2d(_ScaledConv(4, 8, 3))


def test_train_joint_keeps_batchnorm_statistics_and_initialises_the_quantizers():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
        nn.Linear(8 * 10 * 10, 10),
    )  # fmt: skip
    teacher = copy.deepcopy(model).eval()
    compress_(model, _plan(_decision("5", "linear", (10, 800), sparsity="none")))
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    dropout_modes = []
    model[3].register_forward_hook(lambda m, a, o: dropout_modes.append(m.training))
    model.train()
    train_joint(model, teacher, _batches(), JointConfig(steps=5, seed=0), progress=False)
    assert model.training  # the caller's mode comes back
    for key, value in stats.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert bool(model.get_submodule("5").input_quant.initialized)
    assert not torch.equal(model[1].weight, teacher[1].weight)  # the affine still trains
    assert dropout_modes == [False] * 5  # one forward per step, dropout off in each
