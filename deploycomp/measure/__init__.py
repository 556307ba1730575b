"""Measuring engines on this machine: latency (interleaved blocks, pinned threads, machine load
recorded), accuracy (task metric and agreement with the fp32 model) and the environment the
numbers were taken in.
"""

from deploycomp.measure.accuracy import accuracy_row, compare_outputs, evaluate, sqnr_db
from deploycomp.measure.environment import collect_environment
from deploycomp.measure.latency import (
    LatencyMeasurement,
    latency_stats,
    measure_latency,
    pin_threads,
)
from deploycomp.measure.load import monitor_load

__all__ = [
    "LatencyMeasurement",
    "accuracy_row",
    "collect_environment",
    "compare_outputs",
    "evaluate",
    "latency_stats",
    "measure_latency",
    "monitor_load",
    "pin_threads",
    "sqnr_db",
]
