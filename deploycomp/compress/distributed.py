"""Data-parallel joint compression: what :func:`~deploycomp.compress.joint.train_joint` does
differently when it runs under ``torchrun`` (torch.distributed initialised, more than one process).

Takes the student, the teacher and the global batches and returns a :class:`DataParallel` that
holds the student wrapped in ``DistributedDataParallel``. Every process reads the same batch at a
step and trains on its own slice along dim 0 (``tensor_split``, so slices differ by at most one
sample); losses and gradients are weighted so that the update equals a single-process run on the
whole batch up to float reduction order. Three things depend on the slice size and are corrected:
the distillation loss's mean over rows (weighted by the slice's share), the LSQ gradient scale of
input quantizers (``1 / sqrt(numel * qmax)``, rescaled by a gradient hook) and the input
quantizers' first-batch calibration (the maximum over every process's slice). BatchNorm layers
normalise with their frozen running statistics during distillation
(:func:`~deploycomp.compress.joint.distillation_mode`), so the slice size does not reach them
(SyncBatchNorm, which does not run on the CPU, is not needed). Masks are recomputed by every
process from the same synchronised weights, and checked to agree at each recomputation.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from deploycomp.compress.fake_quant import ActivationFakeQuant
from deploycomp.errors import DeployCompError


def is_distributed() -> bool:
    """Whether torch.distributed is initialised with more than one process.

    Example:
        >>> is_distributed()
        False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank, 0 when not distributed.

    Example:
        >>> rank()
        0
    """
    return dist.get_rank() if is_distributed() else 0


class DataParallel:
    """One training run's data-parallel state; :func:`train_joint` builds and closes it.

    Args:
        student: the compressed student; its Parameters and buffers are broadcast from rank 0.
        teacher: the fp32 teacher; its state is broadcast from rank 0 as well, so that every
            process distills toward the same target even if the ranks built it differently.
        inputs: the global batches; each needs at least one sample per process along dim 0.

    Raises:
        DeployCompError: a batch has fewer samples than there are processes.
    """

    def __init__(
        self, student: nn.Module, teacher: nn.Module, inputs: Sequence[torch.Tensor]
    ) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        for index, x in enumerate(inputs):
            samples = x.shape[0] if x.ndim else 0
            if samples < self.world_size:
                raise DeployCompError(
                    f"batch {index} has {samples} sample(s) along dim 0 but the run has "
                    f"{self.world_size} processes, and each process trains on its own slice of "
                    f"every batch; use batches of at least {self.world_size} samples or fewer "
                    f"processes"
                )
        with torch.no_grad():
            for tensor in teacher.state_dict().values():
                dist.broadcast(tensor, src=0)
        # static_graph: the training graph is the same at every step, which lets Parameters a
        # forward never reaches go unreduced without find_unused_parameters' per-step graph walk.
        # device_ids=None: inputs are moved to the student's device before the forward.
        self.model = DistributedDataParallel(student, static_graph=True)
        self._slice_fraction = 1.0  # this process's share of the current batch's samples
        self._handles = []
        for module in student.modules():
            if isinstance(module, ActivationFakeQuant):
                self._handles.append(module.register_forward_pre_hook(_calibrate_on_all_slices))
                self._handles.append(module.step.register_hook(self._rescale_step_gradient))

    def shard(self, x: Any) -> Any:
        """This process's slice of the global batch ``x`` (a tensor, or a dict of named tensors
        sharing their first axis); sets the slice's loss weight."""
        if isinstance(x, dict):
            return {k: self.shard(v) for k, v in x.items()}
        local = x.tensor_split(self.world_size, dim=0)[self.rank]
        self._slice_fraction = local.shape[0] / x.shape[0]
        return local

    @property
    def loss_weight(self) -> float:
        """Factor on the slice's mean loss so that DDP's gradient average is the batch mean's."""
        return self._slice_fraction * self.world_size

    def _rescale_step_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        # LSQ scales an input step's gradient by 1 / sqrt(numel): numel of the slice here, of the
        # whole batch in a single process.
        return grad * math.sqrt(self._slice_fraction)

    def global_loss(self, local_loss: torch.Tensor) -> torch.Tensor:
        """The whole batch's mean loss, the same on every process (for history and checks)."""
        total = local_loss.detach() * self._slice_fraction
        dist.all_reduce(total)
        return total

    def check_masks_agree(self, masks: dict[str, torch.Tensor], step: int) -> None:
        """Raise on every process if any process's masks differ from another's.

        Masks are computed from weights that DDP keeps identical; a difference means the weights
        diverged, and training on would silently average gradients of different models.
        """
        if not masks:
            return
        kept = torch.cat([m.flatten() for m in masks.values()]).to(torch.uint8)
        either = torch.stack([kept, 1 - kept])
        dist.all_reduce(either, op=dist.ReduceOp.MAX)  # both 1 where two processes disagree
        disagree = either.sum(dim=0) > 1
        if bool(disagree.any()):
            ends = itertools.accumulate(m.numel() for m in masks.values())
            first = int(disagree.nonzero()[0])
            name = next(n for n, end in zip(masks, ends) if first < end)
            raise DeployCompError(
                f"after step {step} the 2:4 masks differ between processes (first in layer "
                f"{name!r}), so their weights have diverged; check that every process runs the "
                f"same code and model, and that nothing but train_joint updates the student"
            )

    def rng_states(self) -> list[torch.Tensor]:
        """Every process's CPU RNG state, by rank (collective: all processes must call it)."""
        state = torch.get_rng_state()
        states = [torch.empty_like(state) for _ in range(self.world_size)]
        dist.all_gather(states, state)
        return states

    def confirm_rank_zero(self, succeeded: bool, what: str) -> None:
        """Share rank 0's outcome of ``what``; the other processes raise if it failed."""
        flag = torch.tensor(int(succeeded))
        dist.broadcast(flag, src=0)
        if not bool(flag) and self.rank != 0:
            raise DeployCompError(
                f"rank 0 failed to {what}; its own error says why (see its log above)"
            )

    def close(self) -> None:
        """Remove the hooks; the student is usable on its own again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@torch.no_grad()
def _calibrate_on_all_slices(quant: ActivationFakeQuant, args: tuple[torch.Tensor, ...]) -> None:
    """Initialise an input quantizer's step from the maximum over every process's slice.

    A single process initialises it from the whole first batch; the maximum over the slices is
    the same number, so every process starts from the step a single process would.
    """
    if not quant.training or bool(quant.initialized):
        return
    amax = args[0].detach().abs().amax().to(quant.step.dtype)
    dist.all_reduce(amax, op=dist.ReduceOp.MAX)
    quant._init_from(amax)
