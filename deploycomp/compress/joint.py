"""Joint compression in torch: :func:`compress_` swaps, in place, every Linear and Conv2d a
CompressionPlan does not keep fp32 for its Compressed* wrapper (2:4 mask, learned-step weight and
input fake quantization); :func:`train_joint` then trains that student against the fp32 teacher by
KL distillation on unlabelled batches under a :class:`JointConfig` (Adam, one learning rate for
weights and one for quantizer steps, masks recomputed every k steps until a freeze point, atomic
checkpoints that a later call resumes exactly) and returns the history. Masks, steps and weights
stay on the wrappers, for export to read.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from deploycomp.artifacts import Artifact, CompressionPlan, LayerDecision
from deploycomp.compress.fake_quant import ActivationFakeQuant, WeightFakeQuant
from deploycomp.compress.modules import (
    DEFAULT_SR_STE_DECAY,
    CompressedConv2d,
    CompressedLinear,
    _CompressedLayer,
)
from deploycomp.errors import DeployCompError, closest_match_hint

_WRAPPERS: dict[str, type[_CompressedLayer]] = {
    "linear": CompressedLinear,
    "conv2d": CompressedConv2d,
    "conv2d_depthwise": CompressedConv2d,
    "conv2d_grouped": CompressedConv2d,
}
# "add" decisions quantize only a residual add's inputs: export places those; nothing to wrap.
_ACTIVATION_ONLY_KINDS = ("add",)
# The planner keeps "matmul" (activation x activation, or a weight of unusual rank) in fp32.
_FP32_ONLY_KINDS = ("matmul",)
_QUANTIZERS = (WeightFakeQuant, ActivationFakeQuant)
# Fields that change how a run is reported, not what it computes; a resume may change them.
_RESUMABLE_CHANGES = ("log_every", "checkpoint_every")


def _is_all_fp32(d: LayerDecision) -> bool:
    return (d.weight, d.activation, d.sparsity) == ("fp32", "fp32", "none")


def compress_(
    model: nn.Module, plan: CompressionPlan, *, sr_ste_decay: float = DEFAULT_SR_STE_DECAY
) -> None:
    """Swap, in place, each planned Linear/Conv2d for its joint-compression wrapper.

    Decisions are looked up by ``decision.name``, a module path as in ``model.named_modules()``.
    All-fp32 decisions and ``add`` decisions are skipped (nothing to train), so their names need not
    match a module. Every decision is checked before the model is touched: on an error the model is
    left as it was.

    Args:
        model: the student; its modules are replaced, its Parameters are kept.
        plan: the plan whose ``layers`` say what to do to each layer.
        sr_ste_decay: SR-STE decay for layers with a 2:4 mask.

    Raises:
        DeployCompError: a name matches no module (the message lists some that exist) or is
            planned twice or already compressed, or a kind, shape or scheme does not fit the layer
            (2:4 on a reduction size not divisible by 4); the message names the layer.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 4))
        >>> decision = LayerDecision("0", "/0/Gemm", "linear", (4, 8), 32,
        ...     "int8_sym_per_channel", "int8_sym_per_tensor", "2:4", "example")
        >>> compress_(model, CompressionPlan("mlp", "cpu", 1, (decision,), seed=0))
        >>> type(model[0]).__name__
        'CompressedLinear'
    """
    modules = dict(model.named_modules())
    replacements: dict[str, _CompressedLayer] = {}
    for decision in plan.layers:
        if decision.kind in _ACTIVATION_ONLY_KINDS:
            continue
        if decision.kind not in _WRAPPERS:
            if decision.kind in _FP32_ONLY_KINDS and _is_all_fp32(decision):
                continue
            raise DeployCompError(
                f"layer {decision.name!r}: joint compression cannot apply kind {decision.kind!r} "
                f"(weight {decision.weight!r}, activation {decision.activation!r}, sparsity "
                f"{decision.sparsity!r}); it wraps kinds {tuple(_WRAPPERS)}; keep this layer fp32"
            )
        if _is_all_fp32(decision):
            continue
        module = modules.get(decision.name) if decision.name else None
        if module is None:
            layer_names = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))]
            raise DeployCompError(
                f"plan layer {decision.name!r} matches no module of the model."
                f"{closest_match_hint(decision.name, modules)} Linear/Conv2d modules include "
                f"{layer_names[:6]!r}; names are module paths as in model.named_modules(); was "
                f"the plan made for another model?"
            )
        if decision.name in replacements:
            raise DeployCompError(
                f"plan layer {decision.name!r} appears twice in the plan; keep one decision a layer"
            )
        if isinstance(module, _CompressedLayer):
            raise DeployCompError(
                f"layer {decision.name!r} is already compressed; call compress_ once, on a model "
                f"that has not been compressed"
            )
        replacements[decision.name] = _WRAPPERS[decision.kind].from_decision(
            module, decision, sr_ste_decay
        )
    for name, wrapper in replacements.items():
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, wrapper)


@dataclasses.dataclass(frozen=True)
class JointConfig(Artifact):
    """How :func:`train_joint` trains.

    Example:
        >>> JointConfig(steps=400, lr=1e-4).freeze_step
        300
    """

    steps: int = 200  # optimizer steps in all
    lr: float = 1e-4  # Adam learning rate of weights, biases and every other model Parameter
    lr_quant: float = 1e-3  # Adam learning rate of the quantizer steps
    temperature: float = 2.0  # softmax temperature of the distillation loss
    mask_update_every: int = 10  # recompute 2:4 masks from magnitudes after every k steps
    freeze_masks_at: float = 0.75  # fraction of steps after which masks stop changing
    seed: int = 0  # torch.manual_seed at the start
    log_every: int = 10  # record the loss (and update the progress bar) every this many steps
    checkpoint_every: int = 50  # write the checkpoint every this many steps, and after the last

    def __post_init__(self) -> None:
        for name in ("steps", "mask_update_every", "log_every", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise DeployCompError(f"JointConfig.{name} must be a positive int, got {value!r}")
        for name in ("lr", "lr_quant", "temperature"):
            if not getattr(self, name) > 0:  # also rejects NaN
                raise DeployCompError(
                    f"JointConfig.{name} must be > 0, got {getattr(self, name)!r}"
                )
        if not 0 <= self.freeze_masks_at <= 1:
            raise DeployCompError(
                f"JointConfig.freeze_masks_at is a fraction of the steps, in [0, 1]; got "
                f"{self.freeze_masks_at!r}"
            )

    @property
    def freeze_step(self) -> int:
        """The step after which masks are frozen (0: frozen from the start)."""
        return round(self.freeze_masks_at * self.steps)


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T)) * T^2``, averaged over rows.

    Logits of any rank are read as rows over their last axis (classes, or vocabulary).

    Example:
        >>> logits = torch.tensor([[1.0, 2.0]])
        >>> distillation_loss(logits, logits, 2.0)
        tensor(0.)
    """
    classes = student_logits.shape[-1]
    log_p_student = F.log_softmax(student_logits.reshape(-1, classes) / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.reshape(-1, classes) / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def _inputs(batches: Iterable[Any]) -> list[torch.Tensor]:
    inputs = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        found = "no batches" if not inputs else f"a {type(inputs[0]).__name__}"
        raise DeployCompError(
            f"train_joint needs a non-empty sequence of input tensors (or (input, ...) tuples), "
            f"got {found}; pass e.g. [x for x, _ in loader]"
        )
    return inputs


def _param_groups(student: nn.Module, config: JointConfig) -> list[dict[str, Any]]:
    quantizers = [m for m in student.modules() if isinstance(m, _QUANTIZERS)]
    quant_ids = {id(p) for m in quantizers for p in m.parameters()}
    params = [p for p in student.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) not in quant_ids], "lr": config.lr},
        {"params": [p for p in params if id(p) in quant_ids], "lr": config.lr_quant},
    ]
    return [g for g in groups if g["params"]]


def _check_teacher(student: nn.Module, teacher: nn.Module) -> None:
    student_ids = {id(p) for p in student.parameters()}
    if teacher is student or any(id(p) in student_ids for p in teacher.parameters()):
        raise DeployCompError(
            "the teacher shares Parameters with the student, so training would move the target "
            "it distills from; pass a copy.deepcopy of the fp32 model made before compress_"
        )


def _save_checkpoint(
    path: Path,
    step: int,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: JointConfig,
    history: dict[str, Any],
) -> None:
    """torch.save into a temporary file beside ``path``, then rename it into place."""
    payload = {
        "step": step,
        "student": student.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng_state": torch.get_rng_state(),
        "config": dataclasses.asdict(config),
        "history": history,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_checkpoint(
    path: Path | None,
    config: JointConfig,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> tuple[int, dict[str, Any]]:
    if path is None or not path.is_file():
        raise DeployCompError(
            f"resume=True but there is no checkpoint at {str(path) if path else None!r}; pass the "
            f"checkpoint_path an earlier run wrote, or resume=False to start afresh"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DeployCompError(
            f"cannot read the checkpoint {str(path)!r}: {err}; delete it or pass resume=False"
        ) from err
    ours, theirs = dataclasses.asdict(config), state["config"]
    changed = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
    if set(changed) - set(_RESUMABLE_CHANGES):
        raise DeployCompError(
            f"the checkpoint {str(path)!r} was written under a different JointConfig (field: "
            f"(checkpoint, now) {changed!r}); resume with the same config or resume=False"
        )
    try:
        student.load_state_dict(state["student"])
    except RuntimeError as err:
        raise DeployCompError(
            f"the checkpoint {str(path)!r} does not fit this student: {err}; build the student "
            f"with the same model and plan (compress_) as the run that wrote it"
        ) from err
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_state"])
    return int(state["step"]), state["history"]


def _mask_schedule(
    layers: dict[str, _CompressedLayer], step: int, config: JointConfig, history: dict[str, Any]
) -> None:
    """After ``step`` completed steps: recompute masks every k steps, freeze them at the point."""
    masked = {name: layer for name, layer in layers.items() if layer.mask is not None}
    if not masked:
        return
    if step >= config.freeze_step:
        for layer in masked.values():
            layer.freeze_mask()
    elif step % config.mask_update_every == 0:
        per_layer = {name: layer.update_mask() for name, layer in masked.items()}
        history["mask_updates"].append(
            {"step": step, "flips": sum(per_layer.values()), "per_layer": per_layer}
        )


def _train_step(
    student: nn.Module,
    teacher: nn.Module,
    x: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    config: JointConfig,
    step: int,
) -> float:
    """One distillation step; returns the loss before the update."""
    with torch.no_grad():
        teacher_logits = teacher(x)
    student_logits = student(x)
    for role, out in (("teacher", teacher_logits), ("student", student_logits)):
        if not isinstance(out, torch.Tensor):
            raise DeployCompError(
                f"the {role} returned a {type(out).__name__}; distillation needs a logits tensor; "
                f"wrap the model so that forward returns the logits"
            )
    loss = distillation_loss(student_logits, teacher_logits, config.temperature)
    if not torch.isfinite(loss):
        raise DeployCompError(
            f"the distillation loss became {loss.item()!r} at step {step}; lower "
            f"JointConfig.lr ({config.lr!r}) or lr_quant ({config.lr_quant!r})"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def train_joint(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[Any],
    config: JointConfig,
    *,
    progress: bool = True,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train a compressed student to match the fp32 teacher's logits; no labels needed.

    Step ``t`` (1-based) uses ``batches[(t - 1) % len(batches)]``, so a run is deterministic under
    ``config.seed`` and a resumed run repeats an uninterrupted one exactly. The student trains in
    train mode (restored afterwards), the teacher runs in eval mode without gradients.

    Args:
        student: a model after :func:`compress_`.
        teacher: the fp32 model (a deepcopy made before compressing); never updated.
        batches: input tensors, or tuples whose first element is the input (labels are ignored).
        config: steps, learning rates, temperature and the mask schedule.
        progress: show a tqdm progress bar.
        checkpoint_path: where to write the checkpoint (student state dict with masks and steps,
            optimizer state, step, RNG state, history) every ``config.checkpoint_every`` steps.
        resume: continue from ``checkpoint_path`` (written under the same config).

    Returns:
        History: ``logged_steps`` and ``losses`` (every ``log_every`` steps and the last),
        ``final_loss``, ``mask_updates`` (``step``, total ``flips`` and ``per_layer`` flips of
        each recomputation) and ``mask_freeze_step``.

    Raises:
        DeployCompError: bad batches or model outputs, a teacher sharing the student's
            Parameters, a non-finite loss, or a checkpoint missing, unreadable or not matching.

    Example:
        >>> student, teacher, batches = nn.Linear(8, 4), nn.Linear(8, 4), [torch.randn(16, 8)]
        >>> config = JointConfig(steps=20, log_every=10)
        >>> train_joint(student, teacher, batches, config, progress=False)["logged_steps"]
        [10, 20]
    """
    inputs = _inputs(batches)
    _check_teacher(student, teacher)
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    layers = {n: m for n, m in student.named_modules() if isinstance(m, _CompressedLayer)}
    torch.manual_seed(config.seed)
    device = next(student.parameters()).device
    optimizer = torch.optim.Adam(_param_groups(student, config))
    history: dict[str, Any] = {"logged_steps": [], "losses": [], "mask_updates": []}
    history.update(final_loss=None, mask_freeze_step=config.freeze_step)
    start = 0
    if resume:
        start, history = _load_checkpoint(path, config, student, optimizer)
    elif config.freeze_step == 0:
        _mask_schedule(layers, 0, config, history)
    was_training = student.training
    student.train()
    teacher.eval()
    bar = tqdm(total=config.steps, initial=start, desc="joint", disable=not progress, leave=False)
    try:
        for step in range(start + 1, config.steps + 1):
            x = inputs[(step - 1) % len(inputs)].to(device)
            history["final_loss"] = _train_step(student, teacher, x, optimizer, config, step)
            if step % config.log_every == 0 or step == config.steps:
                history["logged_steps"].append(step)
                history["losses"].append(history["final_loss"])
                bar.set_postfix(loss=f"{history['final_loss']:.4f}")
            _mask_schedule(layers, step, config, history)
            if path is not None and (step % config.checkpoint_every == 0 or step == config.steps):
                _save_checkpoint(path, step, student, optimizer, config, history)
            bar.update(1)
    finally:
        bar.close()
        student.train(was_training)
    return history
