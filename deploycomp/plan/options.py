"""One compression option of one layer, and the key every stage uses to name it.

An :class:`Option` is a (weight scheme, activation scheme, sparsity) triple, the same three fields a
:class:`~deploycomp.artifacts.LayerDecision` carries. The planner enumerates the options a target
accelerates for each layer, the sensitivity pass scores each option, the cost model prices it, and
the plan records the chosen one. ``Option.key`` is the string those stages exchange (sensitivity
tables, reasons, the report).
"""

from __future__ import annotations

import dataclasses

FP32 = "fp32"
WEIGHT_INT8 = "int8_sym_per_channel"
WEIGHT_INT4 = "int4_sym_group128"  # the group size every profile's INT4 kernels share
ACT_INT8 = "int8_sym_per_tensor"
ACT_UINT8 = "uint8_per_tensor"
SPARSE_2_4 = "2:4"


@dataclasses.dataclass(frozen=True, order=True)
class Option:
    """How one layer is compressed: weight scheme, activation (input) scheme, sparsity."""

    weight: str = FP32
    activation: str = FP32
    sparsity: str = "none"

    @property
    def key(self) -> str:
        """Short, stable name: 'fp32', 'int8', 'uint8' (int8 weight, uint8 input), 'int4 w-only',
        '2:4', '2:4+int8', ...; the sparsity prefix, then the precision."""
        if self.weight == FP32:
            precision = FP32
        elif self.activation == FP32:
            precision = f"{self.weight.split('_')[0]} w-only"
        elif self.activation == ACT_UINT8:
            precision = f"{self.weight.split('_')[0]}/u8"
        else:
            precision = self.weight.split("_")[0]
        if self.sparsity == "none":
            return precision
        return self.sparsity if precision == FP32 else f"{self.sparsity}+{precision}"

    @property
    def is_fp32(self) -> bool:
        return (self.weight, self.activation, self.sparsity) == (FP32, FP32, "none")


BASELINE = Option()
