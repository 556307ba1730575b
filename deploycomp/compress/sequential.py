"""Sequential compression, the baseline that joint compression is measured against, and the one
entry point the pipeline trains through.

:func:`train_sequential` takes an uncompressed model, a CompressionPlan and a JointConfig and
trains in two phases on the same data order, total steps and learning rates as
:func:`~deploycomp.compress.joint.train_joint`: *prune* (the plan's 2:4 masks alone, weights and
activations fp32, masks recomputed and frozen on the config's schedule) for ``steps // 2`` steps,
then *quantize* (the whole plan, with the masks of the prune phase frozen from the start and the
weight quantizers initialised on the pruned weights) for the rest. :func:`compress_and_train`
returns a trained copy of the model in either mode, with its history.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deploycomp.artifacts import CompressionPlan
from deploycomp.compress.distributed import rank
from deploycomp.compress.fold import plain_layer
from deploycomp.compress.joint import (
    JointConfig,
    _check_teacher,
    _inputs,
    compress_,
    train_joint,
)
from deploycomp.compress.modules import DEFAULT_SR_STE_DECAY, FP32, _CompressedLayer
from deploycomp.errors import DeployCompError, closest_match_hint

if TYPE_CHECKING:
    from deploycomp.prune.schedule import StructuredPruning

MODES = ("joint", "sequential")
PHASES = ("prune", "quantize")


def sparsity_only(plan: CompressionPlan) -> CompressionPlan:
    """The plan's 2:4 decisions with weights and activations kept fp32 (the prune phase's plan).

    Example:
        >>> from deploycomp.artifacts import LayerDecision
        >>> decision = LayerDecision("0", "/0/Gemm", "linear", (4, 8), 32,
        ...     "int8_sym_per_channel", "int8_sym_per_tensor", "2:4", "example")
        >>> sparsity_only(CompressionPlan("mlp", "cpu", 1, (decision,), seed=0)).layers[0].weight
        'fp32'
    """
    layers = tuple(
        dataclasses.replace(d, weight=FP32, activation=FP32)
        for d in plan.layers
        if d.sparsity != "none"
    )
    return dataclasses.replace(plan, layers=layers)


def phase_checkpoint_paths(checkpoint_path: str | Path) -> dict[str, Path]:
    """Where each phase of a sequential run keeps its checkpoint: a suffix per phase.

    Example:
        >>> phase_checkpoint_paths("run/seq.pt")["quantize"].as_posix()
        'run/seq.quantize.pt'
    """
    path = Path(checkpoint_path)
    return {phase: path.with_name(f"{path.stem}.{phase}{path.suffix}") for phase in PHASES}


def _unwrap_(model: nn.Module) -> dict[str, torch.Tensor]:
    """Put plain layers (sharing weight and bias) back in place of wrappers; returns their masks."""
    masks = {}
    for name, layer in list(model.named_modules()):
        if isinstance(layer, _CompressedLayer):
            if layer.mask is not None:
                masks[name] = layer.mask.clone()
            model.set_submodule(name, plain_layer(layer, layer.weight))
    return masks


def _empty_history(config: JointConfig) -> dict[str, Any]:
    return {
        "logged_steps": [],
        "losses": [],
        "mask_updates": [],
        "final_loss": None,
        "mask_freeze_step": config.freeze_step,
    }


def train_sequential(
    model: nn.Module,
    teacher: nn.Module,
    plan: CompressionPlan,
    batches: Sequence[Any],
    config: JointConfig,
    *,
    progress: bool = True,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    sr_ste_decay: float = DEFAULT_SR_STE_DECAY,
) -> dict[str, Any]:
    """Compress ``model`` in place under ``plan`` sequentially: prune and fine-tune, then quantize.

    The prune phase runs ``config.steps // 2`` steps of :func:`train_joint` with the plan's 2:4
    masks alone (recomputed every ``mask_update_every`` steps, frozen after ``freeze_masks_at`` of
    the phase). The quantize phase applies the whole plan for the remaining steps: every mask is
    the prune phase's, frozen from the start; weight quantizers are initialised on the pruned
    weights, input quantizers on the phase's first batch. Step ``t`` of the whole run reads the
    batch a joint run reads at step ``t``. Under ``torchrun`` both phases train data-parallel.

    Args:
        model: the uncompressed student (a model :func:`compress_` has not touched); its
            Linear/Conv2d layers are replaced by wrappers, as ``compress_`` would.
        teacher: the fp32 model; never updated.
        plan: the plan to apply (the same as a joint run's).
        batches: input tensors, or tuples whose first element is the input.
        config: as for :func:`train_joint`; ``steps`` counts both phases.
        progress: show a progress bar per phase.
        checkpoint_path: ``run/seq.pt`` makes the phases checkpoint to ``run/seq.prune.pt`` and
            ``run/seq.quantize.pt`` (see :func:`phase_checkpoint_paths`).
        resume: continue an interrupted run from its phase checkpoints.
        sr_ste_decay: SR-STE decay of the 2:4 layers.

    Returns:
        History: ``mode`` (``"sequential"``); ``phases`` with the ``prune`` and ``quantize``
        histories of :func:`train_joint` (step numbers local to the phase); ``phase_steps``;
        and over the whole run, ``logged_steps``, ``losses``, ``final_loss`` (the quantize
        phase's), and the prune phase's ``mask_updates`` and ``mask_freeze_step``.

    Raises:
        DeployCompError: the plan does not fit the model (checked before training), or any error
            of :func:`train_joint`.

    Example:
        >>> from deploycomp.artifacts import LayerDecision
        >>> model = nn.Sequential(nn.Linear(8, 4))
        >>> decision = LayerDecision("0", "/0/Gemm", "linear", (4, 8), 32,
        ...     "int8_sym_per_channel", "fp32", "2:4", "example")
        >>> plan = CompressionPlan("mlp", "cpu", 1, (decision,), seed=0)
        >>> history = train_sequential(model, copy.deepcopy(model), plan, [torch.randn(16, 8)],
        ...     JointConfig(steps=10, log_every=5), progress=False)
        >>> history["phase_steps"], history["logged_steps"]
        ({'prune': 5, 'quantize': 5}, [5, 10])
    """
    inputs = _inputs(batches)
    _check_teacher(model, teacher)
    # A dry run on a copy, so that a plan the model cannot take fails now, not after phase 1.
    compress_(copy.deepcopy(model), plan, sr_ste_decay=sr_ste_decay)
    paths = phase_checkpoint_paths(checkpoint_path) if checkpoint_path is not None else None
    if paths is not None and not resume and rank() == 0:
        # A quantize checkpoint is only valid after this run's prune phase; resume trusts that.
        paths["quantize"].unlink(missing_ok=True)
    prune_steps = config.steps // 2
    quantize_config = dataclasses.replace(
        config, steps=config.steps - prune_steps, freeze_masks_at=0.0
    )
    compress_(model, sparsity_only(plan), sr_ste_decay=sr_ste_decay)
    if prune_steps:
        prune_history = train_joint(
            model,
            teacher,
            inputs,
            dataclasses.replace(config, steps=prune_steps),
            progress=progress,
            checkpoint_path=paths["prune"] if paths else None,
            resume=resume,
        )
    else:  # a 1-step run: the masks are the magnitude masks, untrained
        prune_history = _empty_history(dataclasses.replace(config, freeze_masks_at=0.0))
    masks = _unwrap_(model)
    compress_(model, plan, sr_ste_decay=sr_ste_decay)
    for name, mask in masks.items():
        model.get_submodule(name).set_mask(mask)
    offset = prune_steps % len(inputs)
    quantize_history = train_joint(
        model,
        teacher,
        inputs[offset:] + inputs[:offset],
        quantize_config,
        progress=progress,
        checkpoint_path=paths["quantize"] if paths else None,
        resume=resume and paths is not None and paths["quantize"].is_file(),
    )
    return {
        "mode": "sequential",
        "phases": {"prune": prune_history, "quantize": quantize_history},
        "phase_steps": {"prune": prune_steps, "quantize": quantize_config.steps},
        "logged_steps": prune_history["logged_steps"]
        + [prune_steps + t for t in quantize_history["logged_steps"]],
        "losses": prune_history["losses"] + quantize_history["losses"],
        "final_loss": quantize_history["final_loss"],
        "mask_updates": prune_history["mask_updates"],
        "mask_freeze_step": prune_history["mask_freeze_step"],
    }


def compress_and_train(
    model: nn.Module,
    teacher: nn.Module | None,
    plan: CompressionPlan,
    batches: Sequence[Any],
    config: JointConfig,
    *,
    mode: str = "joint",
    progress: bool = True,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    sr_ste_decay: float = DEFAULT_SR_STE_DECAY,
    pruning: StructuredPruning | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Compress a copy of ``model`` under ``plan`` and train it, jointly or sequentially.

    ``model`` itself is not modified. ``"joint"`` is :func:`compress_` then :func:`train_joint`;
    ``"sequential"`` is :func:`train_sequential`; both see the same batches in the same order
    for ``config.steps`` steps at the same learning rates, so their results compare.

    Args:
        model: the uncompressed fp32 model.
        teacher: the fp32 model to distill from; None uses a copy of ``model``.
        plan: what to do to each layer.
        batches: input tensors, or tuples whose first element is the input.
        config: steps, learning rates and mask schedule.
        mode: ``"joint"`` or ``"sequential"``.
        progress: show progress bars.
        checkpoint_path: checkpoint file (sequential mode adds a suffix per phase).
        resume: continue an interrupted run from its checkpoint(s).
        sr_ste_decay: SR-STE decay of the 2:4 layers.
        pruning: structured pruning trained inside the joint loop (joint mode only); ``plan``
            then holds the pruned shapes, which the student reaches during training.

    Returns:
        ``(student, history)``: the trained, still wrapped student (pass it to ``fold_`` for
        export) and the history of :func:`train_joint` or :func:`train_sequential`, with
        ``mode`` added; both have ``logged_steps``, ``losses`` and ``final_loss`` over the run.

    Raises:
        DeployCompError: an unknown mode, or any error of the mode's training function.

    Example:
        >>> from deploycomp.artifacts import LayerDecision
        >>> model = nn.Sequential(nn.Linear(8, 4))
        >>> decision = LayerDecision("0", "/0/Gemm", "linear", (4, 8), 32,
        ...     "int8_sym_per_channel", "fp32", "2:4", "example")
        >>> plan = CompressionPlan("mlp", "cpu", 1, (decision,), seed=0)
        >>> student, history = compress_and_train(model, None, plan, [torch.randn(16, 8)],
        ...     JointConfig(steps=4, log_every=2), progress=False)
        >>> type(student[0]).__name__, type(model[0]).__name__, history["mode"]
        ('CompressedLinear', 'Linear', 'joint')
    """
    if mode not in MODES:
        raise DeployCompError(
            f"unknown compression mode {mode!r}; expected one of {MODES}."
            f"{closest_match_hint(mode, MODES)}"
        )
    student = copy.deepcopy(model)
    teacher = copy.deepcopy(model) if teacher is None else teacher
    options = {"progress": progress, "checkpoint_path": checkpoint_path, "resume": resume}
    if mode == "sequential" and pruning is not None:
        raise DeployCompError(
            "structured pruning trains inside the joint loop; use mode 'joint' with pruning"
        )
    if mode == "sequential":
        history = train_sequential(
            student, teacher, plan, batches, config, sr_ste_decay=sr_ste_decay, **options
        )
        return student, history
    compress_(student, plan, sr_ste_decay=sr_ste_decay, check_shapes=pruning is None)
    history = train_joint(student, teacher, batches, config, pruning=pruning, **options)
    return student, {"mode": "joint", **history}
