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
from deploycomp.prune.train import channel_multiple, plan_pruning, prune_with_distillation


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
