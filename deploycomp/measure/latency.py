"""Latency measurement: one timing method for every backend.

:func:`measure_latency` warms up each session, then runs ``rounds`` rounds in which every session
runs a block of ``block_runs`` consecutive timed calls; the order of the sessions rotates each
round. Blocks, not single alternating calls, so one engine does not evict the other's weights
from cache before every call; rotation and interleaving, so drift in the machine's speed hits all
engines alike; each block starts once the process's threads are idle (:func:`settle`), so one
runtime's spinning workers do not run into the next engine's block. The whole measurement runs inside :func:`~deploycomp.measure.load.monitor_load`
and is repeated when other processes were busy. A speedup is a ratio of two medians from one call.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from deploycomp.artifacts import LatencyStats, MachineLoad
from deploycomp.backends.base import Session
from deploycomp.errors import BackendError, DataError, DeployCompError
from deploycomp.measure.load import DEFAULT_MAX_OTHER_CPU_FRACTION, monitor_load

Inputs = Mapping[str, np.ndarray]


class LatencyMeasurement(NamedTuple):
    """Per-session statistics and how busy the machine was during the kept attempt."""

    stats: dict[str, LatencyStats]
    machine_load: MachineLoad | None


def pin_threads(threads: int = 0) -> list[int]:
    """Pin this thread (and the threads it creates later) to the first ``threads`` allowed CPUs.

    Call it before loading sessions: backends size and place their thread pools at load. Also
    sets torch's intra-op thread count.

    Args:
        threads: how many CPUs to use; 0 means all CPUs this process may use.

    Returns:
        The pinned CPU ids (all CPUs, unpinned, where the OS has no affinity API).

    Raises:
        DeployCompError: more threads were asked for than CPUs are available.

    Example:
        >>> pin_threads(4)
        [0, 1, 2, 3]
    """
    if hasattr(os, "sched_setaffinity"):
        allowed = sorted(os.sched_getaffinity(0))
    else:
        allowed = list(range(os.cpu_count() or 1))
    if threads < 0 or threads > len(allowed):
        raise DeployCompError(
            f"cannot pin {threads} threads: {len(allowed)} CPUs are available to this process. "
            f"Pass a thread count between 1 and {len(allowed)}, or 0 for all."
        )
    cpus = allowed[: threads or len(allowed)]
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    torch.set_num_threads(len(cpus))
    return cpus


def latency_stats(times_ns: list[int] | np.ndarray, batch_size: int) -> LatencyStats:
    """Summarize per-call times (nanoseconds) into :class:`LatencyStats` (milliseconds).

    Example:
        >>> latency_stats([1_000_000, 2_000_000, 3_000_000], batch_size=8).median_ms
        2.0
    """
    times_ms = np.asarray(times_ns, dtype=np.float64) / 1e6
    if times_ms.size == 0:
        raise DeployCompError("no timed runs to summarize; use at least one run.")
    median_ms = float(np.median(times_ms))
    return LatencyStats(
        batch_size=batch_size,
        runs=int(times_ms.size),
        median_ms=round(median_ms, 6),
        p90_ms=round(float(np.percentile(times_ms, 90)), 6),
        p99_ms=round(float(np.percentile(times_ms, 99)), 6),
        mean_ms=round(float(times_ms.mean()), 6),
        min_ms=round(float(times_ms.min()), 6),
        throughput_per_s=round(batch_size / (median_ms / 1e3), 3) if median_ms > 0 else 0.0,
    )


def _per_session_inputs(
    sessions: Mapping[str, Session], inputs: Inputs | Mapping[str, Inputs]
) -> dict[str, dict[str, np.ndarray]]:
    if inputs and all(isinstance(v, Mapping) for v in inputs.values()):
        missing = sorted(set(sessions) - set(inputs))
        if missing:
            raise DataError(
                f"no inputs for sessions {missing}; pass one inputs dict per session name "
                f"({sorted(sessions)}) or one inputs dict shared by all."
            )
        return {name: dict(inputs[name]) for name in sessions}  # type: ignore[call-overload]
    if not inputs:
        raise DataError("latency inputs are empty; pass a dict of input name -> array.")
    shared = dict(inputs)
    return {name: shared for name in sessions}  # type: ignore[misc]


def _run(name: str, call: Callable[[], object]) -> None:
    try:
        call()
    except DeployCompError:
        raise
    except Exception as exc:
        raise BackendError(f"session {name!r} failed during latency measurement: {exc}") from exc


def _bind(sessions: Mapping[str, Session], inputs: dict[str, dict[str, np.ndarray]]):
    calls = {}
    for name, session in sessions.items():
        try:
            calls[name] = session.bind(inputs[name])
        except DeployCompError:
            raise
        except Exception as exc:
            raise BackendError(f"session {name!r} failed to take its inputs: {exc}") from exc
    return calls


SETTLE_POLL_S = 0.005  # how often the process's CPU time is read while it settles
SETTLE_IDLE_FRACTION = 0.1  # below this share of one core the process counts as idle
SETTLE_MAX_S = 0.5  # a runtime that never goes idle is not waited for longer than this


def settle() -> float:
    """Wait until this process's threads stop using the CPU; return the seconds waited.

    A runtime's worker threads keep spinning after a call returns (ONNX Runtime's for up to about
    130 ms, burning 35-55 ms of CPU on two cores), so the next block, of another engine, would
    share the cores with them. Every block therefore starts once the process is idle: the
    previous block's threads do not run into it, whichever engine ran before.
    """
    start = time.perf_counter()
    while time.perf_counter() - start < SETTLE_MAX_S:
        cpu, wall = time.process_time(), time.perf_counter()
        time.sleep(SETTLE_POLL_S)
        if time.process_time() - cpu < SETTLE_IDLE_FRACTION * (time.perf_counter() - wall):
            break
    return time.perf_counter() - start


def _one_attempt(
    sessions: Mapping[str, Session],
    inputs: dict[str, dict[str, np.ndarray]],
    warmup_runs: int,
    block_runs: int,
    rounds: int,
    show_progress: bool,
) -> dict[str, list[int]]:
    names = list(sessions)
    calls = _bind(sessions, inputs)
    for name in names:
        for _ in range(warmup_runs):
            _run(name, calls[name])
    times_ns: dict[str, list[int]] = {name: [] for name in names}
    for round_index in tqdm(
        range(rounds), desc="latency", unit="round", disable=not show_progress, leave=False
    ):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            call, times = calls[name], times_ns[name]
            settle()
            for _ in range(block_runs):
                start_ns = time.perf_counter_ns()
                _run(name, call)
                times.append(time.perf_counter_ns() - start_ns)
    return times_ns


def measure_latency(
    sessions: Mapping[str, Session],
    inputs: Inputs | Mapping[str, Inputs],
    *,
    warmup_runs: int = 10,
    block_runs: int = 20,
    rounds: int = 10,
    max_other_cpu_fraction: float = DEFAULT_MAX_OTHER_CPU_FRACTION,
    max_attempts: int = 3,
    progress: bool | None = None,
) -> LatencyMeasurement:
    """Time several sessions interleaved, in one process, on the same inputs.

    Pass the sessions of one runtime, with no other runtime's sessions loaded: a runtime's worker
    threads live as long as its sessions, and ONNX Runtime's keep spinning for tens of
    milliseconds after each call, into the next session's block (``api.measure`` times one
    backend at a time for this reason).

    Args:
        sessions: name -> loaded session (e.g. ``{"fp32": ..., "compiled": ...}``).
        inputs: one inputs dict shared by all sessions, or session name -> inputs dict.
            The batch size is axis 0 of the first input.
        warmup_runs: untimed calls per session before timing.
        block_runs: consecutive timed calls per session in each round.
        rounds: rounds of blocks; each session gets ``rounds * block_runs`` timed calls.
        max_other_cpu_fraction: an attempt during which other processes used more of the CPUs
            than this is repeated.
        max_attempts: total attempts at most; the attempt with the lowest load is kept.
        progress: show a progress bar over rounds; by default only when stderr is a terminal.

    Returns:
        :class:`LatencyMeasurement`: per-session :class:`LatencyStats` and the
        :class:`MachineLoad` of the kept attempt (``None`` where load cannot be read).

    Example:
        >>> result = measure_latency({"fp32": base, "compiled": fast}, batch, rounds=20)
        >>> speedup = result.stats["fp32"].median_ms / result.stats["compiled"].median_ms
    """
    if not sessions:
        raise DeployCompError("no sessions to measure; pass at least one.")
    if warmup_runs < 0 or block_runs < 1 or rounds < 1 or max_attempts < 1:
        raise DeployCompError(
            f"invalid latency settings: warmup_runs={warmup_runs!r}, block_runs={block_runs!r}, "
            f"rounds={rounds!r}, max_attempts={max_attempts!r}; expected warmup_runs >= 0 and "
            "the others >= 1."
        )
    per_session = _per_session_inputs(sessions, inputs)
    show_progress = sys.stderr.isatty() if progress is None else progress
    attempts: list[tuple[dict[str, list[int]], MachineLoad | None]] = []
    while len(attempts) < max_attempts:
        with monitor_load(max_other_cpu_fraction) as window:
            times_ns = _one_attempt(
                sessions, per_session, warmup_runs, block_runs, rounds, show_progress
            )
        attempts.append((times_ns, window.result))
        if window.result is None or window.result.idle:
            break
    times_ns, load = min(attempts, key=lambda a: a[1].other_cpu_fraction if a[1] else 0.0)
    stats = {
        name: latency_stats(times_ns[name], int(next(iter(per_session[name].values())).shape[0]))
        for name in sessions
    }
    if load is not None:
        load = dataclasses.replace(load, attempts=len(attempts))
    return LatencyMeasurement(stats=stats, machine_load=load)
