"""Structured pruning: find the channel groups of a model and remove chosen channels physically.

:func:`build_groups` returns the :class:`PruneGraph` of a model; :func:`prune_group` slices one
group's members to the kept channels; :func:`group_importance` scores each channel (or head).
"""

from deploycomp.prune.apply import group_importance, prune_group
from deploycomp.prune.attention import AttentionSpec, register_attention
from deploycomp.prune.graph import build_groups
from deploycomp.prune.groups import ChannelGroup, ChannelSlot, PruneGraph

__all__ = [
    "AttentionSpec",
    "ChannelGroup",
    "ChannelSlot",
    "PruneGraph",
    "build_groups",
    "group_importance",
    "prune_group",
    "register_attention",
]
