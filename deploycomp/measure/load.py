"""How busy the machine was with other work while something was measured.

:func:`monitor_load` is a context manager: it reads the machine-wide busy CPU time from
``/proc/stat`` and this process's own CPU time at the start and end of a window, and reports the
CPU time of other processes as a fraction of the window's capacity (wall time x CPUs), with the
1-minute load average. Linux only: elsewhere the result is ``None``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from pathlib import Path

from deploycomp.artifacts import MachineLoad

PROC_STAT = Path("/proc/stat")
PROC_LOADAVG = Path("/proc/loadavg")
DEFAULT_MAX_OTHER_CPU_FRACTION = 0.10


@dataclasses.dataclass
class LoadWindow:
    """Filled in when the ``monitor_load`` block exits; ``result`` is None off Linux."""

    result: MachineLoad | None = None


def _busy_seconds() -> float | None:
    """Machine-wide non-idle CPU time since boot, all CPUs together."""
    try:
        fields = PROC_STAT.read_text().splitlines()[0].split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is already
    # counted in user, and idle and iowait are not busy.
    values = [int(v) for v in fields[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    times = os.times()  # all threads of this process
    return times.user + times.system


def _loadavg_1m() -> float:
    try:
        return float(PROC_LOADAVG.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


@contextlib.contextmanager
def monitor_load(
    max_other_cpu_fraction: float = DEFAULT_MAX_OTHER_CPU_FRACTION,
) -> Iterator[LoadWindow]:
    """Measure the CPU use of other processes during the ``with`` block.

    Args:
        max_other_cpu_fraction: above this fraction the window is not ``idle``.

    Yields:
        A :class:`LoadWindow` whose ``result`` (a :class:`MachineLoad` with ``attempts=1``) is
        set when the block exits; ``None`` where ``/proc/stat`` does not exist.

    Example:
        >>> with monitor_load() as window:
        ...     run_benchmark()
        >>> window.result.other_cpu_fraction
        0.01
    """
    window = LoadWindow()
    busy_start, own_start, wall_start = _busy_seconds(), _own_seconds(), time.perf_counter()
    yield window
    busy_end, own_end, wall_end = _busy_seconds(), _own_seconds(), time.perf_counter()
    if busy_start is None or busy_end is None:
        return
    wall_seconds = max(wall_end - wall_start, 1e-9)
    other_seconds = (busy_end - busy_start) - (own_end - own_start)
    fraction = other_seconds / (wall_seconds * (os.cpu_count() or 1))
    fraction = min(max(fraction, 0.0), 1.0)
    window.result = MachineLoad(
        other_cpu_fraction=round(fraction, 4),
        loadavg_1m=_loadavg_1m(),
        attempts=1,
        idle=fraction <= max_other_cpu_fraction,
    )
