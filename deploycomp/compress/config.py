"""What the user asks of compression: the budget, the training length and the mode."""

from __future__ import annotations

import dataclasses

from deploycomp.compress.sequential import MODES
from deploycomp.errors import DeployCompError
from deploycomp.plan.joint_planner import Budget


def check_prune_amount(prune: float | str, latency_target: float | None) -> None:
    """Refuse a ``--prune`` that is neither a fraction in (0, 1] nor "auto", and "auto" without
    the latency target it plans for."""
    auto = prune == "auto"
    if not auto and (isinstance(prune, (bool, str)) or not 0 < float(prune) <= 1):
        raise DeployCompError(
            f"--prune {prune!r}: expected the fraction of channels to keep in (0, 1] (e.g. 50%) "
            "or 'auto' (amounts chosen under --latency-target)"
        )
    if auto and latency_target is None:
        raise DeployCompError(
            "--prune auto chooses each group's amount to meet --latency-target, and none was "
            "given; pass --latency-target (e.g. 25%), or a fixed fraction (--prune 50%)"
        )


@dataclasses.dataclass(frozen=True)
class CompressConfig:
    """What the user asked of compression.

    Attributes:
        budget: latency / size targets and the accuracy drop allowed.
        epochs: passes over the spec's training data (its calibration data when it has none).
        steps: optimizer steps; overrides ``epochs`` when set.
        mode: "joint" (masks and quantizers trained together) or "sequential" (prune and
            recover, then quantize, on the same plan and steps).
        compare_sequential: also train the other mode on the same plan, data and steps, and
            report both.
        max_rounds: training rounds at most, the first included (back-offs are the rest).
        lr: learning rate of the weights (quantizer steps learn 10x faster).
        measure_options: when the target is this machine, time each layer option on the plan's
            backend before planning, and plan with the measured latencies.
        checkpoint_dir: write training checkpoints here; a later compile of the same model
            weights, target profile, budget, pruning, training length, mode, seed, data and
            deploycomp version resumes from them (their file names carry a key of those).
        resume: resume from a matching checkpoint in ``checkpoint_dir``; False (--no-resume)
            ignores it and overwrites it.
        prune: structured channel pruning trained inside the joint loop: a fraction of every
            channel group to keep, or "auto" for per-group amounts chosen under the latency
            target; None: no pruning.
    """

    budget: Budget = dataclasses.field(default_factory=Budget)
    epochs: float = 1.0
    steps: int | None = None
    mode: str = "joint"
    compare_sequential: bool = False
    max_rounds: int = 3
    lr: float = 1e-4
    measure_options: bool = True
    checkpoint_dir: str | None = None
    resume: bool = True
    prune: float | str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise DeployCompError(
                f"unknown compression mode {self.mode!r}; expected one of {MODES}"
            )
        if self.steps is not None and (isinstance(self.steps, bool) or self.steps <= 0):
            raise DeployCompError(f"--steps must be a positive integer, got {self.steps!r}")
        if not self.epochs > 0:
            raise DeployCompError(f"--epochs must be > 0, got {self.epochs!r}")
        if isinstance(self.max_rounds, bool) or not 1 <= self.max_rounds <= 10:
            raise DeployCompError(
                f"max_rounds must be an integer in [1, 10], got {self.max_rounds!r}"
            )
        if not isinstance(self.resume, bool):
            raise DeployCompError(f"resume must be True or False, got {self.resume!r}")
        if self.prune is not None:
            check_prune_amount(self.prune, self.budget.latency_target)
            if self.mode != "joint" or self.compare_sequential:
                raise DeployCompError(
                    "--prune trains inside the joint compression loop; drop --mode sequential "
                    "and --compare-sequential, or compile without --prune"
                )
