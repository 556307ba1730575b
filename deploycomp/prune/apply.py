"""Physical removal of a channel group's channels, and per-channel importance scores.

Takes a model, a :class:`ChannelGroup` from :func:`build_groups` and the units (channels or heads)
to keep; slices every member in place so the model is smaller and dense: Linear/Conv weights and
biases, BatchNorm affine and running statistics, LayerNorm affine, the q/k/v projections of an
attention module, and for compressed layers their 2:4 mask and per-channel or per-group quantizer
steps, updating the size attributes (``in_features``, ``out_channels``, head counts, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from deploycomp.compress.modules import _CompressedLayer
from deploycomp.errors import DeployCompError
from deploycomp.kernels.sparsity import GROUP_SIZE, mask_2_4
from deploycomp.prune.attention import attention_spec
from deploycomp.prune.groups import ChannelGroup, ChannelSlot, expand_indices, units_of


def _set(module: nn.Module, name: str, tensor: torch.Tensor | None, dim: int, index: torch.Tensor):
    if tensor is None:
        return
    new = tensor.detach().index_select(dim, index).clone()
    if isinstance(tensor, nn.Parameter):
        new = nn.Parameter(new, requires_grad=tensor.requires_grad)
    setattr(module, name, new)


def _is_conv(module: nn.Module) -> bool:
    return hasattr(module, "out_channels")


def _slice_rows(module: nn.Module, index: torch.Tensor) -> None:
    """Output channels: weight rows, bias, 2:4 mask rows and quantizer steps of those rows."""
    _set(module, "weight", module.weight, 0, index)
    _set(module, "bias", module.bias, 0, index)
    count = len(index)
    if isinstance(module, _CompressedLayer):
        if module.mask is not None:
            _set(module, "mask", module.mask, 0, index)
        quant = module.weight_quant
        if quant is not None:
            _set(quant, "step", quant.step, 0, index)
            quant.out_channels = count
            quant.weight_shape = tuple(module.weight.shape)
    if _is_conv(module):
        module.out_channels = count
    else:
        module.out_features = count


def _slice_columns(module: nn.Module, index: torch.Tensor) -> None:
    """Input channels: weight columns; a compressed layer's mask and steps follow (see below)."""
    old_in = module.weight.shape[1]
    _set(module, "weight", module.weight, 1, index)
    if _is_conv(module):
        module.in_channels = len(index)
    else:
        module.in_features = len(index)
    if not isinstance(module, _CompressedLayer):
        return
    kept = torch.zeros(old_in, dtype=torch.bool)
    kept[index] = True
    kept_flat = kept.repeat_interleave(module.weight[0, 0].numel())
    if module.mask is not None:
        _set(module, "mask", module.mask, 1, index)
        rows = module.mask.reshape(module.mask.shape[0], -1, GROUP_SIZE).sum(dim=-1)
        # Removed columns can shift the groups of 4: re-select 2:4 on the surviving weights.
        if not bool((rows == GROUP_SIZE // 2).all()):
            module.mask.copy_(mask_2_4(module.weight.detach()))
    quant = module.weight_quant
    if quant is None:
        return
    old_groups = quant.groups_per_channel
    quant.weight_shape = tuple(module.weight.shape)
    quant.reduction_size = module.weight[0].numel()
    if quant.group_size is None:
        quant.elements_per_step = quant.reduction_size
        return
    per_group = kept_flat.reshape(old_groups, quant.group_size)
    whole = bool((per_group.all(dim=1) | ~per_group.any(dim=1)).all())
    quant.groups_per_channel = quant.reduction_size // quant.group_size
    if whole:
        _set(quant, "step", quant.step, 1, per_group.all(dim=1).nonzero().flatten())
    else:
        quant.step = nn.Parameter(quant.step.new_ones(quant.out_channels, quant.groups_per_channel))
        quant.reinit(module.weight.detach(), module.mask)


def _check_slot(model: nn.Module, slot: ChannelSlot, remaining: int) -> None:
    module = model.get_submodule(slot.module)
    if slot.role != "in" or not isinstance(module, _CompressedLayer):
        return
    reduction = remaining * module.weight[0, 0].numel() if module.weight.ndim > 1 else 0
    quant = module.weight_quant
    if module.mask is not None and reduction % GROUP_SIZE:
        raise DeployCompError(
            f"pruning {slot.module!r} to {remaining} input channels leaves a reduction size of "
            f"{reduction}, not a multiple of {GROUP_SIZE} as its 2:4 mask needs; keep a number of "
            f"channels that makes it one"
        )
    if quant is not None and quant.group_size and reduction % quant.group_size:
        raise DeployCompError(
            f"pruning {slot.module!r} to {remaining} input channels leaves a reduction size of "
            f"{reduction}, not a multiple of its quantization group size {quant.group_size}"
        )


def _slot_dim_size(module: nn.Module, slot: ChannelSlot) -> int:
    if slot.role == "head":
        spec = attention_spec(module)
        return getattr(module, spec.query).weight.shape[0]
    if slot.role == "in":
        return module.weight.shape[1]
    if slot.role == "bn":
        return module.num_features
    return module.weight.shape[0]


def _apply_slot(module: nn.Module, slot: ChannelSlot, index: torch.Tensor) -> None:
    if slot.role == "out":
        _slice_rows(module, index)
    elif slot.role == "in":
        _slice_columns(module, index)
    elif slot.role == "depthwise":
        _slice_rows(module, index)
        module.in_channels = module.groups = len(index)
    elif slot.role == "bn":
        for name in ("weight", "bias", "running_mean", "running_var"):
            _set(module, name, getattr(module, name), 0, index)
        module.num_features = len(index)
    elif slot.role == "ln":
        _set(module, "weight", module.weight, 0, index)
        _set(module, "bias", module.bias, 0, index)
        module.normalized_shape = (len(index),)
    elif slot.role == "head":
        spec = attention_spec(module)
        for child in spec.projections:
            _slice_rows(getattr(module, child), index)
        heads = len(index) // slot.unit
        setattr(module, spec.num_heads_attr, heads)
        if spec.all_head_size_attr:
            setattr(module, spec.all_head_size_attr, len(index))
    else:
        raise DeployCompError(f"unknown slot role {slot.role!r} in {slot!r}")


@torch.no_grad()
def prune_group(model: nn.Module, group: ChannelGroup, keep: Sequence[int]) -> None:
    """Keep units ``keep`` of ``group`` (channels, or heads) and remove the rest, in place.

    A compressed layer losing input columns keeps its 2:4 mask where the sliced mask still has 2
    of every 4 and otherwise re-selects 2:4 on the surviving weights; an int4 quantizer keeps its
    steps where whole quantization groups are removed and otherwise re-initialises them. In both
    re-selection cases that layer's output changes slightly (training is meant to recover it).

    Raises:
        DeployCompError: the group is not prunable, ``keep`` is empty, out of range or repeats a
            unit, or a compressed layer's 2:4 or group size would no longer divide its reduction.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> group = build_groups(model, (torch.randn(1, 4),)).prunable()[0]
        >>> prune_group(model, group, keep=[0, 3, 5])
        >>> model[0].out_features, model[2].in_features
        (3, 3)
    """
    if not group.prunable:
        raise DeployCompError(f"group is not prunable: {group.reason}")
    keep = sorted(int(i) for i in keep)
    if not keep or len(set(keep)) != len(keep) or keep[0] < 0 or keep[-1] >= group.size:
        raise DeployCompError(
            f"keep must be distinct units in [0, {group.size}) with at least one, got {keep!r}"
        )
    for slot in group.slots:
        _check_slot(model, slot, len(keep) * slot.unit)
    # An in-slot's offset moves when an earlier concat segment of the same module shrinks; slots
    # are applied from the highest offset down so every offset is read before it moves.
    for slot in sorted(group.slots, key=lambda s: -s.offset):
        module = model.get_submodule(slot.module)
        index = expand_indices(slot, keep, group.size, _slot_dim_size(module, slot))
        _apply_slot(module, slot, torch.tensor(index, dtype=torch.long))


@torch.no_grad()
def scale_units(model: nn.Module, group: ChannelGroup, units: Sequence[int], factor: float) -> None:
    """Multiply what the group's producers write for ``units`` by ``factor``, in place.

    Scales every non-``in`` slot's rows (Linear/Conv weight and bias, BatchNorm and LayerNorm
    affine, q/k/v rows of a head): with ``factor = 0`` the units output exactly zero, which for a
    ``zero_invariant`` group computes what :func:`prune_group` removing them computes. Training
    shrinks units toward zero this way before removing them.
    """
    for slot in group.slots:
        if slot.role == "in":
            continue
        module = model.get_submodule(slot.module)
        index = [i for unit in units for i in units_of(slot, unit)]
        layers = [module]
        if slot.role == "head":
            spec = attention_spec(module)
            layers = [module.get_submodule(n) for n in spec.projections]
        for layer in layers:
            layer.weight[index] *= factor
            if getattr(layer, "bias", None) is not None:
                layer.bias[index] *= factor


def _slot_weights(module: nn.Module, slot: ChannelSlot) -> list[tuple[torch.Tensor, int]]:
    """(tensor, channel dim) pairs whose slices a unit of this slot removes."""

    def masked(layer: nn.Module) -> torch.Tensor:
        mask = getattr(layer, "mask", None)
        return layer.weight if mask is None else layer.weight * mask

    if slot.role == "head":
        spec = attention_spec(module)
        layers = [getattr(module, name) for name in spec.projections]
        return [(masked(x), 0) for x in layers] + [(x.bias, 0) for x in layers]
    if slot.role == "in":
        return [(masked(module), 1)]
    if slot.role in ("out", "depthwise"):
        return [(masked(module), 0), (module.bias, 0)]
    return [(module.weight, 0), (module.bias, 0)]


@torch.no_grad()
def input_energy(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    batches: Sequence[Any],
    forward: Callable[[nn.Module, Any], Any],
) -> dict[str, torch.Tensor]:
    """Per consumer of the groups (their ``in`` slots): the mean square of each input channel.

    Runs ``forward(model, batch)`` on every batch with hooks on the consumers; the channel axis is
    1 for 4-d (NCHW) inputs and the last axis otherwise. The model runs in eval mode.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> groups = build_groups(model, (torch.randn(1, 4),)).prunable()
        >>> input_energy(model, groups, [torch.randn(3, 4)], lambda m, b: m(b))["2"].shape
        torch.Size([8])
    """
    names = sorted({s.module for g in groups for s in g.slots if s.role == "in"})
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().double()
            x = x.movedim(1, -1) if x.dim() == 4 else x
            x = x.reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] += x.shape[0]

        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    was = model.training
    model.eval()
    try:
        for batch in batches:
            forward(model, batch)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return {n: (sums[n] / counts[n]).float() for n in sums}


def _output_change(
    model: nn.Module, group: ChannelGroup, energy: dict[str, torch.Tensor]
) -> torch.Tensor | None:
    """Per unit, the summed ``E[x_c^2] * ||W[:, c]||^2`` over its consumers' input channels ``c``:
    how much the consumers' outputs move (in mean square, channels taken one at a time) when the
    unit is zeroed. None when a consumer was not measured or does not read the channels whole."""
    scores = torch.zeros(group.size, dtype=torch.float64)
    consumers = [s for s in group.slots if s.role == "in"]
    if not consumers:
        return None
    for slot in consumers:
        module = model.get_submodule(slot.module)
        ((weight, dim),) = _slot_weights(module, slot)
        columns = weight.detach().movedim(dim, 0)
        columns = columns.reshape(columns.shape[0], -1).double().pow(2).sum(1)
        if slot.module not in energy or energy[slot.module].shape != columns.shape:
            return None
        change = energy[slot.module].double() * columns
        width = group.size * slot.unit
        scores += change.narrow(0, slot.offset, width).reshape(group.size, slot.unit).sum(1)
    return scores


@torch.no_grad()
def group_importance(
    model: nn.Module, group: ChannelGroup, energy: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """One score per channel or head: how much removing it would change the model.

    With ``energy`` (:func:`input_energy` on calibration data): the consumers' output change
    when the unit is zeroed, ``sum_c E[x_c^2] * ||W[:, c]||^2`` over the unit's input channels
    ``c`` of every consumer. This sees what a BatchNorm does to a channel: a convolution followed
    by BatchNorm is scale-free, so its weight norm says little of what the channel carries (on
    EfficientNet-Lite0, zeroing the channels this score ranks lowest moved the outputs less than
    the norm's choice in 41 of 43 cases, median KL 0.075 against 0.28; on a small CNN trained
    from scratch the norm did better in 4 of 5: bench/prune_ranking.py, BENCHMARKS.md).

    Without ``energy``, or for a group whose consumers were not measured: the L2 norm of
    everything each unit would remove (producer rows and biases, consumer columns,
    BatchNorm/LayerNorm affine, q/k/v rows of a head), 2:4 masked-out weights counted as zero;
    one norm over the whole group, as OTO/GETA's group norm.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> group = build_groups(model, (torch.randn(1, 4),)).prunable()[0]
        >>> group_importance(model, group).shape
        torch.Size([8])
    """
    if energy is not None:
        scores = _output_change(model, group, energy)
        if scores is not None:
            return scores.float()
    scores = torch.zeros(group.size, dtype=torch.float64)
    for slot in group.slots:
        module = model.get_submodule(slot.module)
        for tensor, dim in _slot_weights(module, slot):
            if tensor is None:
                continue
            width = group.size * slot.unit
            part = tensor.detach().narrow(dim, slot.offset, width).movedim(dim, 0)
            part = part.reshape(group.size, slot.unit, -1).double()
            scores += part.pow(2).sum(dim=(1, 2))
    return scores.sqrt().float()
