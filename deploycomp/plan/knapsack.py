"""The joint planner's exact solver: one option per layer, a multiple-choice knapsack.

Takes the joint planner's per-layer candidates (each layer's kept options, every one priced with
its predicted ms, stored bytes and sensitivity), the :class:`~deploycomp.plan.joint_planner.Budget`
and its limits (the ms and bytes of the layers that stay fp32 and of the whole inventory in fp32,
against which the targets are fractions); returns one option per layer, in the candidates' order.
The choice is exact and deterministic, made with ``scipy.optimize.milp`` (HiGHS, zero relative gap):
minimise the summed sensitivity under the latency and size rows or, with neither target, minimise
the predicted latency. A second pass, bounded to the first pass's optimum, breaks ties
lexicographically (latency after sensitivity, sensitivity after latency), so the same input always
gives the same plan. An unreachable budget raises naming the best fraction reachable. What the
options are and which of them pay is the planner's (:mod:`deploycomp.plan.joint_planner`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from deploycomp.errors import DeployCompError

if TYPE_CHECKING:
    from deploycomp.plan.joint_planner import Budget, Candidates, Priced

# Budget rows are tightened by HiGHS's primal feasibility tolerance (in fractions of the fp32
# totals), so a solution at the solver's tolerance still meets the budget; less where the best
# plan is closer than that to the target.
_BUDGET_SLACK = 1e-7


def solve(
    cands: list[Candidates],
    budget: Budget,
    fixed: tuple[float, int],
    fp32: tuple[float, int],
    where: str,
) -> list[Priced]:
    """The exact multiple-choice knapsack: one kept option per layer, lexicographically best.

    ``fixed`` and ``fp32`` are (ms, bytes) of the layers that stay fp32 and of the whole
    inventory in fp32; budget rows are written as fractions of the latter.

    Args:
        cands: one entry per layer the budget may compress; the solver chooses among ``kept``.
            Pass them in a fixed order (the planner sorts by layer name) for a stable plan.
        budget: the latency and/or size targets; with neither, the fastest plan is chosen.
        fixed: (ms, bytes) of the layers that stay fp32 whatever the budget.
        fp32: (ms, bytes) of the whole inventory in fp32.
        where: the backend and device, worded for error messages (``"with tensorrt on
            nvidia/a100"``).

    Returns:
        The chosen option of each layer, in ``cands`` order; empty where ``cands`` is.

    Raises:
        DeployCompError: a target cannot be met (alone, or together with the other), a size
            target was given for a model with no constant weights, or the solver stopped
            without a plan.

    Example:
        >>> picks = solve(cands, Budget(latency_target=0.8), (0.0, 0), (fp32_ms, fp32_bytes),
        ...               "with tensorrt on nvidia/a100")
        >>> len(picks) == len(cands)
        True
    """
    flat = [(i, p) for i, c in enumerate(cands) for p in c.kept]
    ms = np.array([p.ms for _, p in flat]) / fp32[0]
    size = np.array([p.bytes for _, p in flat]) / max(fp32[1], 1)
    sens = np.array([p.sensitivity for _, p in flat])
    sens = sens / max(float(sens.max(initial=0.0)), 1e-300)
    one_each = np.zeros((len(cands), len(flat)))
    for column, (i, _) in enumerate(flat):
        one_each[i, column] = 1.0
    rows = [LinearConstraint(one_each, 1.0, 1.0)] if flat else []
    latency_row = size_row = None
    if budget.latency_target is not None:
        fastest = fixed[0] + sum(min(p.ms for p in c.kept) for c in cands)
        limit = _reachable("latency", budget.latency_target, fastest, fixed[0], fp32[0], where)
        latency_row = LinearConstraint(ms[None, :], -np.inf, limit)
    if budget.size_target is not None:
        smallest = fixed[1] + sum(min(p.bytes for p in c.kept) for c in cands)
        limit = _reachable("size", budget.size_target, smallest, fixed[1], fp32[1], where)
        size_row = LinearConstraint(size[None, :], -np.inf, limit)
    if not flat:
        return []
    budget_rows = [row for row in (latency_row, size_row) if row is not None]
    primary, secondary = (sens, ms) if budget_rows else (ms, sens)
    x = _milp(primary, rows + budget_rows)
    if x is None:  # each target alone is reachable (checked above), both together are not
        reach = fixed[0] / fp32[0] + float(ms @ _milp(ms, [*rows, size_row]))
        raise DeployCompError(
            f"latency target {budget.latency_target:g} and size target {budget.size_target:g} "
            f"cannot be met together {where}: within the size target the fastest plan reaches "
            f"{reach:.3f} of the fp32 latency. Raise the latency target to at least "
            f"{math.ceil(reach * 1000) / 1000:g}, or raise the size target."
        )
    bound = float(primary @ x)
    tie = LinearConstraint(primary[None, :], -np.inf, bound + 1e-9 * (1.0 + abs(bound)))
    second = _milp(secondary, [*rows, *budget_rows, tie])
    x = second if second is not None else x
    return [flat[column][1] for column in np.flatnonzero(x > 0.5)]


def _reachable(
    what: str, target: float, best: float, fixed: float, fp32: float, where: str
) -> float:
    """The budget row's limit for the variable layers; raises naming the best reachable fraction."""
    if what == "size" and fp32 == 0:
        raise DeployCompError(
            "a size target was given, but the model has no constant weights to shrink; drop the "
            "size target."
        )
    fraction = best / fp32
    if fraction > target:
        if what == "latency":
            found = f"the fastest plan the profile allows reaches {fraction:.3f} ({best:.4g} ms of "
            found += f"{fp32:.4g} ms)"
            hint = ", or target a device or backend with faster kernels"
        else:
            found = f"the smallest plan the profile allows reaches {fraction:.3f} "
            found += f"({best / 1e6:.3g} MB of {fp32 / 1e6:.3g} MB)"
            hint = ""
        noun = "the fp32 predicted latency" if what == "latency" else "the fp32 weight bytes"
        raise DeployCompError(
            f"{what} target {target:g} of {noun} cannot be met {where}: {found}. Raise the "
            f"{what} target to at least {math.ceil(fraction * 1000) / 1000:g}"
            f"{hint}."
        )
    return target - fixed / fp32 - min(_BUDGET_SLACK, (target - fraction) / 2)


def _milp(objective: np.ndarray, constraints: list[LinearConstraint]) -> np.ndarray | None:
    """A binary solution minimising ``objective``, or None if infeasible."""
    result = milp(
        objective,
        constraints=constraints,
        integrality=np.ones_like(objective),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0.0},
    )
    if result.status == 2:
        return None
    if result.status != 0:
        raise DeployCompError(f"the knapsack solver stopped without a plan: {result.message}")
    return np.round(result.x)
