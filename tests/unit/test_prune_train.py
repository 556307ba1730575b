"""Pruning with distillation: the plan's amounts, and a trained model that is smaller, dense and
close to its teacher."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from deploycomp.errors import DeployCompError
from deploycomp.hw import load_profile
from deploycomp.prune import build_groups, prune_group
from deploycomp.prune.apply import input_energy, scale_units
from deploycomp.prune.train import (
    best_removal,
    channel_multiple,
    drop_order,
    plan_pruning,
    prune_with_distillation,
    zeroed_kl,
)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 40, 3, padding=1), nn.BatchNorm2d(40), nn.ReLU(),
            nn.Conv2d(40, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _batches():
    generator = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(16, 1, 12, 12, generator=generator)} for _ in range(4)]


def test_channel_multiple_follows_the_profile():
    assert channel_multiple(load_profile("nvidia/h100")) == 16
    assert channel_multiple(load_profile("intel/xeon-icx")) == 16
    assert channel_multiple(load_profile("generic/x86-64-avx2")) == 8


def test_plan_rounds_kept_channels_up_to_the_multiple_and_drops_the_weakest():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    with torch.no_grad():
        model.body[0].weight[:5] *= 1e-3  # five clearly unimportant channels
    groups = build_groups(model, (torch.randn(2, 1, 12, 12),)).prunable()
    plans = {p.group.size: p for p in plan_pruning(model, groups, 0.3, 8)}
    assert (
        len(plans[40].keep) == 16 and len(plans[48].keep) == 16
    )  # ceil(12 / 8) * 8, ceil(14.4 / 8) * 8
    assert set(range(5)) <= set(plans[40].drop)
    assert "40 -> 16 channels" in plans[40].reason
    with pytest.raises(DeployCompError, match="keep_fraction 0"):
        plan_pruning(model, groups, 0.0, 8)


def test_pruned_student_is_smaller_and_matches_its_teacher():
    torch.manual_seed(0)
    teacher = SmallCNN().eval()
    example = (torch.randn(2, 1, 12, 12),)
    student, plans = prune_with_distillation(
        teacher, example, _batches, ["x"], keep_fraction=0.5, multiple=8, steps=30, progress=False
    )
    assert student.body[0].out_channels == 24 and student.body[3].out_channels == 24
    assert student.head.in_features == 24
    assert teacher.body[0].out_channels == 40  # the teacher is untouched
    # Distillation recovers what removing the same channels without training loses.
    untrained = copy.deepcopy(teacher)
    for plan in plans:
        prune_group(untrained, plan.group, plan.keep)
    x = torch.cat([b["x"] for b in _batches()])
    with torch.no_grad():
        target = torch.log_softmax(teacher(x), -1)

        def kl(model):
            return float(torch.nn.functional.kl_div(
                torch.log_softmax(model(x), -1), target, reduction="batchmean", log_target=True
            ))  # fmt: skip

        assert kl(student) < 0.5 * kl(untrained)  # measured 5.1e-4 against 1.3e-3


def test_output_change_ranks_channels_through_batchnorm_where_the_norm_cannot():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    with torch.no_grad():
        model.body[0].bias.zero_()
        model.body[0].weight[:5] *= 1e-3  # small weights, scaled back up by BatchNorm
        model.body[1].running_var[:5] = 1e-6
        model.body[0].weight[5:10] *= 10.0  # large weights that BatchNorm silences
        model.body[1].weight[5:10] = 1e-4
        model.body[1].bias[5:10] = 0.0
    x = torch.cat([b["x"] for b in _batches()])
    group = next(g for g in build_groups(model, (x[:1],)).prunable() if g.size == 40)
    energy = input_energy(model, [group], [x], lambda m, b: m(b))
    assert energy["body.3"].shape == (40,)
    by_norm, by_output = drop_order(model, group), drop_order(model, group, energy)
    assert set(by_norm[:5]) == set(range(5))
    assert set(by_output[:5]) == set(range(5, 10))

    def change(units):
        trial = copy.deepcopy(model)
        scale_units(trial, group, units, 0.0)
        with torch.no_grad():
            return float((trial(x) - model(x)).abs().mean())

    assert change(by_output[:5]) < 0.1 * change(by_norm[:5])
    # plan_pruning measures both rankings and keeps the one that moves the outputs least.
    forward = lambda m, b: m(b)
    (plan,) = plan_pruning(model, [group], 0.75, 8, [x], forward)
    assert set(plan.drop) == set(by_output[:8])  # 40 -> 32 channels
    assert "lowest output change removed, KL +" in plan.reason
    reference = [model(x).detach()]
    assert plan.loss_increase == pytest.approx(
        zeroed_kl(model, group, plan.drop, [x], forward, reference)
    )
    # Whichever order is listed, the lower KL wins.
    for orders in ({"a": by_norm, "b": by_output}, {"b": by_output, "a": by_norm}):
        removal = best_removal(model, group, 30, orders, [x], forward, reference)
        assert removal.ranking == "b" and set(removal.drop) == set(by_output[:10])


def test_distillation_keeps_batchnorm_statistics_and_turns_dropout_off():
    torch.manual_seed(0)
    teacher = nn.Sequential(SmallCNN(), nn.Dropout(0.5)).eval()
    dropout_modes = []  # the hook is copied with the model into the student
    teacher[1].register_forward_hook(lambda m, a, o: dropout_modes.append(m.training))
    example = (torch.randn(2, 1, 12, 12),)
    student, plans = prune_with_distillation(
        teacher, example, _batches, ["x"], keep_fraction=0.5, multiple=8, steps=6, progress=False
    )
    (plan,) = [p for p in plans if p.group.size == 40]
    kept = torch.tensor(plan.keep)
    bn, bn_teacher = student[0].body[1], teacher[0].body[1]
    torch.testing.assert_close(bn.running_mean, bn_teacher.running_mean[kept])
    torch.testing.assert_close(bn.running_var, bn_teacher.running_var[kept])
    assert not bn.weight.equal(bn_teacher.weight[kept])  # the affine still trains
    assert dropout_modes and not any(dropout_modes)
