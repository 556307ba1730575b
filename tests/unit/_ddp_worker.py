"""Worker that test_distributed.py launches with ``python -m torch.distributed.run``.

Every rank trains the same small compressed MLP data-parallel (gloo, CPU): a joint run with
checkpoints, the same run interrupted and resumed, a sequential run, and a run whose rank 1 is
made to diverge (the mask check must stop both ranks). Each rank writes what it
ends with (state dicts and histories) to ``<out_dir>/rank<r>.pt``. :func:`setup` is shared with the
test's single-process reference run.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deploycomp.artifacts import CompressionPlan, LayerDecision
from deploycomp.compress.joint import JointConfig, compress_, train_joint
from deploycomp.compress.sequential import compress_and_train
from deploycomp.errors import DeployCompError

INTERRUPT_AFTER_STEPS = 7


def setup() -> tuple[nn.Module, CompressionPlan, list[torch.Tensor], JointConfig]:
    """The fp32 model, its plan (2:4 + int8 on every Linear), the batches and the config."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)
    )
    with torch.no_grad():  # confident logits, so that distillation has something to match
        model[4].weight.mul_(5.0)
    layers = tuple(
        LayerDecision(
            name,
            f"/{name}/Gemm",
            "linear",
            tuple(model.get_submodule(name).weight.shape),
            0,
            "int8_sym_per_channel",
            "int8_sym_per_tensor" if name == "0" else "uint8_per_tensor",
            "2:4",
            "test",
        )
        for name in ("0", "2", "4")
    )
    plan = CompressionPlan("mlp", "cpu", 31, layers, seed=0)
    generator = torch.Generator().manual_seed(1)
    # 31 samples: the two ranks take slices of 16 and 15, so the loss weighting is exercised.
    batches = [torch.randn(31, 16, generator=generator) for _ in range(4)]
    # Learning rates small enough that float reduction order does not flip a rounding decision
    # within the run, so that the data-parallel result stays comparable to one process's.
    config = JointConfig(
        steps=12,
        lr=1e-3,
        lr_quant=1e-5,
        mask_update_every=2,
        freeze_masks_at=0.5,
        log_every=1,
        checkpoint_every=4,
    )
    return model, plan, batches, config


class _Interrupted(Exception):
    pass


def _interrupt_after(teacher: nn.Module, calls: int) -> None:
    seen = []

    def hook(module: nn.Module, inputs: Any) -> None:
        seen.append(1)
        if len(seen) > calls:
            raise _Interrupted

    teacher.register_forward_pre_hook(hook)


def _diverge_on_rank_one(student: nn.Module, teacher: nn.Module) -> None:
    """Rescale rank 1's first-layer weights behind DDP's back, before the first step."""

    def hook(module: nn.Module, inputs: Any) -> None:
        if dist.get_rank() == 1:
            with torch.no_grad():
                student[0].weight.mul_(torch.rand_like(student[0].weight))

    teacher.register_forward_pre_hook(hook)


def _mask_check_error(model: nn.Module, plan: CompressionPlan, batches: list, config: Any) -> str:
    student, teacher = copy.deepcopy(model), copy.deepcopy(model)
    compress_(student, plan)
    _diverge_on_rank_one(student, teacher)
    try:
        train_joint(student, teacher, batches, config, progress=False)
    except DeployCompError as err:
        return str(err)
    return ""


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    model, plan, batches, config = setup()
    results = {}
    for mode in ("joint", "sequential"):
        student, history = compress_and_train(
            model, None, plan, batches, config, mode=mode, progress=False
        )
        results[mode] = {"state": student.state_dict(), "history": history}

    checkpoint = out_dir / "joint.pt"
    teacher = copy.deepcopy(model)
    _interrupt_after(teacher, INTERRUPT_AFTER_STEPS)
    try:
        compress_and_train(
            model, teacher, plan, batches, config, progress=False, checkpoint_path=checkpoint
        )
    except _Interrupted:
        pass
    student, history = compress_and_train(
        model, None, plan, batches, config, progress=False, checkpoint_path=checkpoint, resume=True
    )
    results["resumed"] = {"state": student.state_dict(), "history": history}
    results["mask_check_error"] = _mask_check_error(model, plan, batches, config)
    results["world_size"] = dist.get_world_size()
    torch.save(results, out_dir / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
