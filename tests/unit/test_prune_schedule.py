"""Structured pruning inside the joint loop: zeroed units of a compressed student compute what
their removal computes (quantizers and 2:4 masks do not break groups), training ends on the
planned shapes with re-estimated ranges, and a run resumed after the removal step repeats an
uninterrupted one."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from deploycomp.artifacts import CompressionPlan, LayerDecision
from deploycomp.compress.joint import JointConfig, compress_, train_joint
from deploycomp.compress.modules import _CompressedLayer
from deploycomp.prune import build_groups, prune_group
from deploycomp.prune.apply import scale_units
from deploycomp.prune.schedule import StructuredPruning
from deploycomp.prune.train import plan_pruning


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = x.mean(dim=(2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


W8A8 = ("int8_sym_per_channel", "int8_sym_per_tensor")


def _plan(model: nn.Module, sparse: tuple[str, ...] = ("conv2", "fc2")) -> CompressionPlan:
    decisions = []
    for name in ("conv1", "conv2", "fc1", "fc2"):
        module = model.get_submodule(name)
        kind = "conv2d" if isinstance(module, nn.Conv2d) else "linear"
        sparsity = "2:4" if name in sparse else "none"
        decisions.append(LayerDecision(name, f"/{name}", kind, (), 0, *W8A8, sparsity, "test"))
    return CompressionPlan("cnn", "test", 1, tuple(decisions), seed=0)


def _setup(sparse: tuple[str, ...] = ("conv2", "fc2")):
    torch.manual_seed(0)
    model = CNN().eval()
    groups = build_groups(model, (torch.randn(2, 3, 8, 8),)).prunable()
    plans = plan_pruning(model, groups, 0.5, 8)
    student = copy.deepcopy(model)
    compress_(student, _plan(model, sparse), check_shapes=False)
    batches = [torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    return model, student, plans, batches


def _zeroed_and_removed(sparse: tuple[str, ...]):
    _, student, plans, batches = _setup(sparse)
    student.train()
    student(batches[0])  # initialise the input quantizers
    student.eval()
    for plan in plans:
        scale_units(student, plan.group, plan.drop, 0.0)
    zeroed = student(batches[1])
    for plan in plans:
        prune_group(student, plan.group, plan.keep)
    return student, zeroed, student(batches[1])


def test_zeroed_units_of_a_quantized_student_compute_their_removal():
    student, zeroed, removed = _zeroed_and_removed(sparse=())
    torch.testing.assert_close(removed, zeroed, rtol=1e-5, atol=1e-5)
    assert student.conv1.weight.shape[0] == 16 and student.fc1.weight_quant.step.shape == (32,)


def test_removed_input_columns_reselect_a_valid_2_4_mask():
    # Removing input columns shifts the groups of 4 along the reduction axis, so a 2:4 layer
    # that loses inputs re-selects its mask on the surviving weights: not the zeroed model's
    # output exactly, which is why removal happens before the masks freeze.
    student, zeroed, removed = _zeroed_and_removed(sparse=("conv2", "fc2"))
    for layer in (student.conv2, student.fc2):
        assert layer.mask.shape == layer.weight.shape
        groups = layer.mask.reshape(layer.mask.shape[0], -1, 4).sum(dim=-1)
        assert bool((groups == 2).all())
    assert torch.nn.functional.cosine_similarity(removed.flatten(), zeroed.flatten(), 0) > 0.95


def _pruning(plans, batches, steps):
    return StructuredPruning(plans, steps, batches[:2], lambda m, b: m(b))


def test_joint_training_ends_on_the_planned_shapes_with_reestimated_ranges():
    model, student, plans, batches = _setup()
    pruning = _pruning(plans, batches, 10)
    history = train_joint(student, model, batches, JointConfig(steps=10, log_every=5),
                          progress=False, pruning=pruning)  # fmt: skip
    assert history["pruned_at_step"] == pruning.removal_step == 6
    assert all(torch.isfinite(torch.tensor(history["losses"])))
    assert (student.conv1.out_channels, student.conv2.in_channels) == (16, 16)
    assert (student.fc1.out_features, student.fc2.in_features) == (32, 32)
    assert student.conv2.mask.shape == student.conv2.weight.shape
    # the re-estimated input range of fc1 is the max over the calibration batches of the
    # pruned student at the removal step; training after it moved the step, so recompute it
    # from a fresh removal on the unpruned student at the same point.
    _, fresh, _, _ = _setup()
    again = _pruning(plans, batches, 10)
    for step in range(1, again.removal_step):
        again.after_step(fresh, step)
    seen = []
    handle = fresh.fc1.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().amax()))
    assert again.after_step(fresh, again.removal_step)
    handle.remove()
    assert len(seen) == 2
    expected = max(float(v) for v in seen) / fresh.fc1.input_quant.qmax
    assert float(fresh.fc1.input_quant.step.detach()) == pytest.approx(expected, rel=1e-6)


class _Interrupt(nn.Module):
    """A teacher that stops the run after ``calls`` forward passes."""

    def __init__(self, model: nn.Module, calls: int) -> None:
        super().__init__()
        self.model, self.calls = model, calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls -= 1
        if self.calls < 0:
            raise KeyboardInterrupt
        return self.model(x)


def test_resume_after_the_removal_step_repeats_an_uninterrupted_run(tmp_path):
    config = JointConfig(steps=10, log_every=5, checkpoint_every=4)
    model, student, plans, batches = _setup()
    train_joint(student, copy.deepcopy(model), batches, config, progress=False,
                pruning=_pruning(plans, batches, 10))  # fmt: skip
    path = tmp_path / "ckpt.pt"
    _, first, _, _ = _setup()
    with pytest.raises(KeyboardInterrupt):  # checkpoint at step 8, after the removal at step 6
        train_joint(first, _Interrupt(copy.deepcopy(model), 9), batches, config, progress=False,
                    checkpoint_path=path, pruning=_pruning(plans, batches, 10))  # fmt: skip
    _, resumed, _, _ = _setup()
    train_joint(resumed, copy.deepcopy(model), batches, config, progress=False,
                checkpoint_path=path, resume=True, pruning=_pruning(plans, batches, 10))  # fmt: skip
    assert resumed.conv1.out_channels == 16
    for (name, a), b in zip(student.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert all(isinstance(resumed.get_submodule(n), _CompressedLayer) for n in ("fc1", "fc2"))


def test_heads_and_ffn_neurons_of_a_quantized_bert_stack_prune_inside_the_loop():
    pytest.importorskip("transformers")
    from test_prune_graph import BertStack

    torch.manual_seed(3)
    model = BertStack().eval()
    hidden = torch.randn(4, 5, 16)
    groups = build_groups(model, (hidden[:2],)).prunable()
    plans = plan_pruning(model, groups, 0.5, 8)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "head"]
    decisions = tuple(LayerDecision(n, f"/{n}", "linear", (), 0, *W8A8, "none", "test")
                      for n in linears)  # fmt: skip
    student = copy.deepcopy(model)
    compress_(student, CompressionPlan("bert", "test", 1, decisions, seed=0), check_shapes=False)
    batches = [torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    student.train()
    student(batches[0])  # initialise the input quantizers
    student.eval()
    zeroed_student = copy.deepcopy(student)
    for plan in plans:
        scale_units(zeroed_student, plan.group, plan.drop, 0.0)
    expected = zeroed_student(batches[1])
    for plan in plans:
        prune_group(zeroed_student, plan.group, plan.keep)
    torch.testing.assert_close(zeroed_student(batches[1]), expected, rtol=1e-5, atol=1e-5)

    history = train_joint(student, model, batches, JointConfig(steps=10, log_every=5),
                          progress=False, pruning=_pruning(plans, batches, 10))  # fmt: skip
    attention = student.layers[0].attention.self
    assert (attention.num_attention_heads, attention.all_head_size) == (2, 8)
    assert attention.query.weight.shape == (8, 16) and attention.query.weight_quant.step.shape == (8,)
    assert student.layers[1].intermediate.dense.out_features == 16
    assert history["pruned_at_step"] == 6 and torch.isfinite(student(hidden)).all()
