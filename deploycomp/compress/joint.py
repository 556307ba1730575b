"""Joint compression in torch: :func:`compress_` swaps, in place, every Linear and Conv2d a
CompressionPlan does not keep fp32 for its Compressed* wrapper (2:4 mask, learned-step weight and
input fake quantization); :func:`train_joint` then trains that student against the fp32 teacher by
KL distillation on unlabelled batches under a :class:`JointConfig` (Adam, one learning rate for
weights and one for quantizer steps, masks recomputed every k steps until a freeze point, atomic
checkpoints that a later call resumes exactly) and returns the history. Masks, steps and weights
stay on the wrappers, for export to read. Under ``torchrun`` (torch.distributed initialised with
more than one process) the same call trains data-parallel: see
:mod:`deploycomp.compress.distributed`.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from deploycomp.artifacts import Artifact, CompressionPlan, LayerDecision
from deploycomp.compress.checkpoint_key import (
    START_AFRESH,
    CheckpointError,
    key_in_name,
    read_checkpoint,
)
from deploycomp.compress.distributed import DataParallel, is_distributed
from deploycomp.compress.fake_quant import ActivationFakeQuant, WeightFakeQuant
from deploycomp.compress.modules import (
    DEFAULT_SR_STE_DECAY,
    CompressedConv2d,
    CompressedEmbedding,
    CompressedLinear,
    _CompressedLayer,
)
from deploycomp.errors import DeployCompError, closest_match_hint

if TYPE_CHECKING:
    from deploycomp.prune.schedule import StructuredPruning

_WRAPPERS: dict[str, type[_CompressedLayer]] = {
    "linear": CompressedLinear,
    "conv2d": CompressedConv2d,
    "conv2d_depthwise": CompressedConv2d,
    "conv2d_grouped": CompressedConv2d,
    "embedding": CompressedEmbedding,
}
# "add" decisions quantize only a residual add's inputs: export places those; nothing to wrap.
_ACTIVATION_ONLY_KINDS = ("add",)
# The planner keeps "matmul" (activation x activation, or a weight of unusual rank) in fp32.
_FP32_ONLY_KINDS = ("matmul",)
_QUANTIZERS = (WeightFakeQuant, ActivationFakeQuant)
# Fields that change how a run is reported, not what it computes; a resume may change them.
# One step's inputs: a tensor, or named tensors passed to the model in order.
Batch = torch.Tensor | dict[str, torch.Tensor]
_RESUMABLE_CHANGES = ("log_every", "checkpoint_every")


def _is_all_fp32(d: LayerDecision) -> bool:
    return (d.weight, d.activation, d.sparsity) == ("fp32", "fp32", "none")


def compress_(
    model: nn.Module,
    plan: CompressionPlan,
    *,
    sr_ste_decay: float = DEFAULT_SR_STE_DECAY,
    check_shapes: bool = True,
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
        check_shapes: refuse a decision whose weight shape differs from the module's; False for
            a student that structured pruning brings to the plan's shapes during training.

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
        if not check_shapes:
            decision = dataclasses.replace(decision, weight_shape=())
        replacements[decision.name] = _WRAPPERS[decision.kind].from_decision(
            module, decision, sr_ste_decay
        )
    for name, wrapper in replacements.items():
        model.set_submodule(name, wrapper)


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


def _inputs(batches: Iterable[Any]) -> list[Batch]:
    """Each batch's model inputs: a tensor, or a dict of named tensors for a model of several
    inputs (called with the values in order); the first element of a tuple or list (labels
    after it are ignored)."""
    inputs = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]

    def usable(x: Any) -> bool:
        if isinstance(x, dict):
            return bool(x) and all(isinstance(v, torch.Tensor) for v in x.values())
        return isinstance(x, torch.Tensor)

    if not inputs or not all(usable(x) for x in inputs):
        found = "no batches" if not inputs else f"a {type(inputs[0]).__name__}"
        raise DeployCompError(
            f"train_joint needs a non-empty sequence of input tensors, dicts of named input "
            f"tensors, or (input, ...) tuples; got {found}; pass e.g. [x for x, _ in loader]"
        )
    return inputs


def _to(x: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


def run_model(model: nn.Module, x: Batch) -> Any:
    """``model(x)``, or ``model(*x.values())`` for named inputs."""
    return model(*x.values()) if isinstance(x, dict) else model(x)


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
    parallel: DataParallel | None = None,
) -> None:
    """Write the checkpoint; in a data-parallel run rank 0 writes it, holding every rank's RNG.
    It holds the key its file name carries (see :mod:`deploycomp.compress.checkpoint_key`), so a
    file renamed to another run's key is refused."""
    payload = {
        "step": step,
        "student": student.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng_state": torch.get_rng_state(),
        "config": dataclasses.asdict(config),
        "history": history,
        "key": key_in_name(path),
    }
    if parallel is None:
        _write_atomic(path, payload)
        return
    payload.update(world_size=parallel.world_size, rng_states=parallel.rng_states())
    written = False
    try:
        if parallel.rank == 0:
            _write_atomic(path, payload)
        written = True
    finally:
        parallel.confirm_rank_zero(written, f"write the checkpoint {str(path)!r}")


def _write_atomic(path: Path, payload: dict[str, Any]) -> None:
    """torch.save into a temporary file beside ``path``, then rename it into place."""
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
    parallel: DataParallel | None = None,
) -> tuple[int, dict[str, Any]]:
    if path is None or not path.is_file():
        raise CheckpointError(
            f"there is no checkpoint at {str(path) if path else None!r} to resume from; pass the "
            f"checkpoint_path an earlier run wrote, or start afresh with --no-resume "
            f"(resume=False in a library call)"
        )
    where = f"the checkpoint {str(path)!r}"
    state = read_checkpoint(path)
    if key_in_name(path) is not None and state.get("key") != key_in_name(path):
        raise CheckpointError(
            f"{where} holds key {state.get('key')!r}, its name says {key_in_name(path)!r}: it "
            f"was written for another model, target or budget and renamed; {START_AFRESH}"
        )
    ours, theirs = dataclasses.asdict(config), state["config"]
    changed = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
    if set(changed) - set(_RESUMABLE_CHANGES):
        raise CheckpointError(
            f"{where} was written under a different JointConfig (field: (checkpoint, now) "
            f"{changed!r}); resume with the same config, or {START_AFRESH}"
        )
    try:
        student.load_state_dict(state["student"])
    except RuntimeError as err:
        found = " ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise CheckpointError(
            f"{where} does not fit this student ({found[:200]}); build the student with the same "
            f"model and plan (compress_) as the run that wrote it, or {START_AFRESH}"
        ) from err
    world_size = parallel.world_size if parallel is not None else 1
    if state.get("world_size", 1) != world_size:
        raise CheckpointError(
            f"{where} was written by a run on {state.get('world_size', 1)} process(es), this run "
            f"has {world_size}; every process trains on a slice of each batch, so resume on the "
            f"same number of processes (torchrun --nproc_per_node), or {START_AFRESH}"
        )
    optimizer.load_state_dict(state["optimizer"])
    rng_state = state["rng_state"] if parallel is None else state["rng_states"][parallel.rank]
    torch.set_rng_state(rng_state)
    return int(state["step"]), state["history"]


def _checkpoint_step(path: Path | None) -> int:
    """The step a checkpoint was written at (0 when there is none)."""
    if path is None or not path.is_file():
        return 0
    return int(read_checkpoint(path, peek=True)["step"])


def _mask_schedule(
    layers: dict[str, _CompressedLayer],
    step: int,
    config: JointConfig,
    history: dict[str, Any],
    parallel: DataParallel | None = None,
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
        if parallel is not None:
            parallel.check_masks_agree({n: layer.mask for n, layer in masked.items()}, step)


def _train_step(
    student: nn.Module,
    teacher: nn.Module,
    x: Batch,
    optimizer: torch.optim.Optimizer,
    config: JointConfig,
    step: int,
    parallel: DataParallel | None = None,
) -> float:
    """One distillation step; returns the (whole batch's) loss before the update."""
    if parallel is not None:
        x = parallel.shard(x)
    with torch.no_grad():
        teacher_logits = run_model(teacher, x)
    student_logits = run_model(student, x)
    for role, out in (("teacher", teacher_logits), ("student", student_logits)):
        if not isinstance(out, torch.Tensor):
            raise DeployCompError(
                f"the {role} returned a {type(out).__name__}; distillation needs a logits tensor; "
                f"wrap the model so that forward returns the logits"
            )
    loss = distillation_loss(student_logits, teacher_logits, config.temperature)
    # Every process checks the same all-reduced value, so all raise together or none does.
    batch_loss = loss.detach() if parallel is None else parallel.global_loss(loss)
    if not torch.isfinite(batch_loss):
        raise DeployCompError(
            f"the distillation loss became {batch_loss.item()!r} at step {step}; lower "
            f"JointConfig.lr ({config.lr!r}) or lr_quant ({config.lr_quant!r})"
        )
    optimizer.zero_grad(set_to_none=True)
    (loss if parallel is None else loss * parallel.loss_weight).backward()
    optimizer.step()
    return batch_loss.item()


def distillation_mode(student: nn.Module) -> None:
    """Put ``student`` in the mode it trains in, in place: deploycomp's compression modules in
    train mode (quantizers initialise and learn), the model's own layers as in inference.

    BatchNorm normalises with its running statistics and leaves them alone; dropout and
    stochastic depth are off. Distillation runs on a little data, often unlabelled and not the
    model's training distribution: updating BatchNorm statistics from it renormalises the network
    to that data (EfficientNet-Lite0's momentum of 0.01 replaces 95% of its ImageNet statistics in
    300 steps), and random dropout makes the student chase a teacher it cannot match exactly.
    The learned BatchNorm scales and shifts still train.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
        >>> distillation_mode(model)
        >>> model[1].training, model[2].training
        (False, False)
    """
    student.eval()
    for module in student.modules():
        if isinstance(module, (_CompressedLayer, WeightFakeQuant, ActivationFakeQuant)):
            module.train()


def train_joint(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[Any],
    config: JointConfig,
    *,
    progress: bool = True,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    pruning: StructuredPruning | None = None,
) -> dict[str, Any]:
    """Train a compressed student to match the fp32 teacher's logits; no labels needed.

    Step ``t`` (1-based) uses ``batches[(t - 1) % len(batches)]``, so a run is deterministic under
    ``config.seed`` and a resumed run repeats an uninterrupted one exactly. The student trains in
    :func:`distillation_mode` (its mode is restored afterwards), the teacher runs in eval mode
    without gradients.

    Under ``torchrun`` every process calls this with the same arguments and trains the student
    wrapped in DistributedDataParallel on its own slice of each batch (see
    :mod:`deploycomp.compress.distributed`): the result matches a single process on the same
    batches up to float reduction order, the history (whole-batch losses) is the same on every
    process, rank 0 alone shows the progress bar and writes the checkpoint, and a resume reads it
    on every process (a shared filesystem across machines) and needs as many processes.

    Args:
        student: a model after :func:`compress_`.
        teacher: the fp32 model (a deepcopy made before compressing); never updated.
        batches: input tensors, or tuples whose first element is the input (labels are ignored).
        config: steps, learning rates, temperature and the mask schedule.
        progress: show a tqdm progress bar.
        checkpoint_path: where to write the checkpoint (student state dict with masks and steps,
            optimizer state, step, RNG state, history) every ``config.checkpoint_every`` steps.
        resume: continue from ``checkpoint_path`` (written under the same config).
        pruning: structured pruning to run inside the loop: its units shrink to zero after each
            step and are removed at its removal step (the optimizer is rebuilt for the smaller
            Parameters); a resume past that step removes them before loading the checkpoint.
            Not under torchrun.

    Returns:
        History: ``logged_steps`` and ``losses`` (every ``log_every`` steps and the last),
        ``final_loss``, ``mask_updates`` (``step``, total ``flips`` and ``per_layer`` flips of
        each recomputation) and ``mask_freeze_step``.

    Raises:
        DeployCompError: bad batches or model outputs, a teacher sharing the student's
            Parameters, a non-finite loss, or a checkpoint missing, unreadable or not matching;
            under torchrun also a batch with fewer samples than processes, or masks that differ
            between processes.

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
    if pruning is not None and is_distributed():
        raise DeployCompError(
            "structured pruning changes Parameter shapes during training, which data-parallel "
            "training cannot follow; run it in one process (without torchrun)"
        )
    parallel = DataParallel(student, teacher, inputs) if is_distributed() else None
    was_training = student.training
    try:
        start = 0
        if resume:
            if pruning is not None and _checkpoint_step(path) >= pruning.removal_step:
                pruning.remove(student)
                optimizer = torch.optim.Adam(_param_groups(student, config))
            start, history = _load_checkpoint(path, config, student, optimizer, parallel)
        elif config.freeze_step == 0:
            _mask_schedule(layers, 0, config, history, parallel)
        distillation_mode(student)
        teacher.eval()
        show = progress and (parallel is None or parallel.rank == 0)
        forward = student if parallel is None else parallel.model
        with tqdm(
            total=config.steps, initial=start, desc="joint", disable=not show, leave=False
        ) as bar:
            for step in range(start + 1, config.steps + 1):
                x = _to(inputs[(step - 1) % len(inputs)], device)
                loss = _train_step(forward, teacher, x, optimizer, config, step, parallel)
                if pruning is not None and pruning.after_step(student, step):
                    optimizer = torch.optim.Adam(_param_groups(student, config))
                    history["pruned_at_step"] = step
                history["final_loss"] = loss
                if step % config.log_every == 0 or step == config.steps:
                    history["logged_steps"].append(step)
                    history["losses"].append(loss)
                    bar.set_postfix(loss=f"{loss:.4f}")
                _mask_schedule(layers, step, config, history, parallel)
                if path is not None and (
                    step % config.checkpoint_every == 0 or step == config.steps
                ):
                    _save_checkpoint(path, step, student, optimizer, config, history, parallel)
                bar.update(1)
    finally:
        student.train(was_training)
        if parallel is not None:
            parallel.close()
    return history
