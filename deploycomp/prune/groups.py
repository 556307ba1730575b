"""The data the pruning graph hands out: channel slots, channel groups and the graph itself.

A :class:`ChannelGroup` is a frozen record of coupled :class:`ChannelSlot` s (module name, role,
offset, unit); :func:`expand_indices` turns the units a caller keeps into the module indices that
survive along one slot's axis.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from deploycomp.errors import DeployCompError

ROLES = ("out", "in", "bn", "ln", "depthwise", "head")


@dataclasses.dataclass(frozen=True)
class ChannelSlot:
    """The channels one module contributes to a group.

    Group channel ``i`` is the module's channels ``offset + i * unit`` to ``offset + (i + 1) *
    unit - 1`` along the axis the role names. ``unit`` is the head size for heads and for the
    input columns of a projection reading heads, ``H * W`` for a Linear reading a flattened
    ``C x H x W`` map, else 1; ``offset`` is nonzero for the input of a channel concatenation.

    Roles: ``out`` (Linear rows / Conv output channels, and the bias), ``in`` (Linear columns /
    Conv input channels), ``bn`` (BatchNorm affine and running statistics), ``ln`` (LayerNorm
    affine), ``depthwise`` (a depthwise Conv's channels, input and output alike), ``head`` (the
    q/k/v rows of an attention module, in whole heads).
    """

    module: str
    role: str
    offset: int = 0
    unit: int = 1


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together; ``size`` units (channels or heads) of them.

    ``zero_invariant`` is True when zeroing every non-``in`` slot of a unit (weights, biases,
    BatchNorm/LayerNorm affine) leaves the model computing exactly what the model with that unit
    physically removed computes; a LayerNorm over the channels or an op with ``f(0) != 0`` on the
    way (sigmoid, adding a constant) makes it False.
    """

    size: int
    slots: tuple[ChannelSlot, ...]
    unit: str = "channel"
    prunable: bool = True
    reason: str = ""
    zero_invariant: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PruneGraph:
    """Every channel group of a model, and why the refused ones cannot be pruned.

    ``refused`` maps a module or fx node name to a reason; a module is listed when the group of
    its output channels is refused.
    """

    groups: tuple[ChannelGroup, ...]
    refused: dict[str, str]

    def prunable(self) -> tuple[ChannelGroup, ...]:
        return tuple(group for group in self.groups if group.prunable)


def expand_indices(slot: ChannelSlot, keep: list[int], size: int, dim_size: int) -> list[int]:
    """The module indices along ``slot``'s axis that survive keeping units ``keep`` of ``size``."""
    end = slot.offset + size * slot.unit
    if end > dim_size:
        raise DeployCompError(
            f"slot {slot!r} covers channels up to {end} but the module has {dim_size}; was the "
            f"graph built for another model or already pruned?"
        )
    kept = [slot.offset + i * slot.unit + j for i in keep for j in range(slot.unit)]
    return [*range(slot.offset), *kept, *range(end, dim_size)]


def units_of(slot: ChannelSlot, unit: int) -> range:
    """The module indices of group unit ``unit`` in ``slot``."""
    start = slot.offset + unit * slot.unit
    return range(start, start + slot.unit)
