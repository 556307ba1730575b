"""Calibration: run the fp32 ONNX graph on real batches and record activation ranges.

Takes the fp32 graph and the tensors to quantize; exposes those tensors as extra graph outputs, runs
them in ONNX Runtime on the CPU, and returns, per tensor, the observed min/max and a clipping value
chosen to minimise the squared quantization error on a bounded random sample of the values.

The data is checked first: a NaN or infinity in a calibration input is refused, and a finite value
so extreme that it would swamp a tensor's range (see :func:`robust_range`) is clipped, with a note.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import onnx
from tqdm.auto import tqdm

from deploycomp.errors import DataError
from deploycomp.kernels.quantize import best_clip
from deploycomp.modelspec import Batch

SAMPLES_PER_BATCH = 8192
# A value more than 10**OUTLIER_ORDERS times the bulk of a tensor's values (their
# OUTLIER_PERCENTILE-th percentile of |x|) is an outlier the range leaves out (see robust_range).
OUTLIER_ORDERS = 4
OUTLIER_PERCENTILE = 99.99

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class TensorRange:
    min: float
    max: float
    clip: float  # symmetric clipping value for |x| (or for x when min >= 0)

    @property
    def non_negative(self) -> bool:
        return self.min >= 0.0


@dataclasses.dataclass
class _Observed:
    """Per batch the exact extremes of one tensor, and a bounded random sample of its values."""

    mins: list[float] = dataclasses.field(default_factory=list)
    maxs: list[float] = dataclasses.field(default_factory=list)
    samples: list[np.ndarray] = dataclasses.field(default_factory=list)

    def add(self, value: np.ndarray, rng: np.random.Generator) -> None:
        flat = np.asarray(value, dtype=np.float32).ravel()
        if flat.size == 0:
            return
        self.mins.append(float(flat.min()))
        self.maxs.append(float(flat.max()))
        take = min(SAMPLES_PER_BATCH, flat.size)
        self.samples.append(flat[rng.choice(flat.size, take, replace=False)])

    def sample(self) -> np.ndarray:
        return np.concatenate(self.samples) if self.samples else np.zeros(0, np.float32)


def robust_range(
    batch_mins: Sequence[float], batch_maxs: Sequence[float], sample: np.ndarray
) -> tuple[float, float, bool]:
    """A tensor's calibration range: the plain min/max over the batches, without outliers.

    Why: one corrupt value (say 3e38 in one element of one batch) would otherwise set a scale
    that rounds every ordinary value of the tensor to zero, and the quantized model would output
    nonsense. On ordinary data the range must stay exactly the plain min/max, so the rule only
    drops what is absurd: a batch extreme that is non-finite, or more than ``10**OUTLIER_ORDERS``
    times the bulk of the values (the ``OUTLIER_PERCENTILE``-th percentile of the non-zero |x| in
    the random sample, which a handful of outliers cannot move; zeros say nothing about the
    scale). The sampled values within that bound stand in for a batch whose extreme was dropped.

    Returns:
        ``(min, max, clipped)``; ``clipped`` says an extreme was dropped. ``(0, 0, ...)`` when
        nothing finite was observed (clipped unless nothing was observed at all).
    """
    finite = sample[np.isfinite(sample)]
    magnitudes = np.abs(finite[finite != 0])
    bound = np.inf
    if magnitudes.size:
        bulk = float(np.percentile(magnitudes, OUTLIER_PERCENTILE, method="lower"))
        bound = bulk * 10.0**OUTLIER_ORDERS
    lows = [v for v in batch_mins if np.isfinite(v) and v >= -bound]
    highs = [v for v in batch_maxs if np.isfinite(v) and v <= bound]
    clipped = len(lows) < len(batch_mins) or len(highs) < len(batch_maxs)
    inside = finite[np.abs(finite) <= bound] if clipped else np.zeros(0, np.float32)
    lows += [float(inside.min())] if inside.size else []
    highs += [float(inside.max())] if inside.size else []
    if not lows or not highs:
        return 0.0, 0.0, bool(batch_mins)
    return min(lows), max(highs), clipped


def check_calibration_data(batches: Sequence[Batch]) -> None:
    """Refuse calibration batches holding NaN or infinity: no range can be taken from them.

    :func:`~deploycomp.validate.validate_spec` refuses them too; this guards callers that pass
    batches straight in (a ``ModelSpec`` object, the sweep, the compression stage).

    Raises:
        DataError: naming the first batch and input with non-finite values, and how many.
    """
    for index, batch in enumerate(batches):
        for name, value in batch.items():
            array = np.asarray(value)
            if array.dtype.kind not in "fc":
                continue
            bad = ~np.isfinite(array)
            count = int(bad.sum())
            if count:
                sample = int(np.argwhere(bad)[0][0]) if array.ndim else 0
                raise DataError(
                    f"calibration[{index}][{name!r}] contains {count} NaN or infinite values "
                    f"(the first in sample {sample}); calibration data must be finite. Clean or "
                    "drop those samples."
                )


def _clip_note(name: str, observed: _Observed, lo: float, hi: float) -> str:
    return (
        f"calibrate: clipped the range of {name!r}: observed [{np.min(observed.mins):.4g}, "
        f"{np.max(observed.maxs):.4g}], used [{lo:.4g}, {hi:.4g}] (values beyond "
        f"10^{OUTLIER_ORDERS} times the bulk of the tensor are treated as outliers)"
    )


def clip_input_outliers(batches: Sequence[Batch], seed: int = 0,
                        log: Log | None = print) -> list[Batch]:
    """``batches`` with the outliers of every float input (see :func:`robust_range`) clipped to
    the input's robust range, so that one absurd input value cannot overflow every activation
    downstream of it while calibrating. Each clipped input is noted once through ``log``.

    Raises:
        DataError: an input holds NaN or infinity (:func:`check_calibration_data`).
    """
    check_calibration_data(batches)
    rng = np.random.default_rng([seed, 1])
    names = [n for n, v in batches[0].items() if np.asarray(v).dtype.kind == "f"] if batches else []
    out = [dict(b) for b in batches]
    for name in names:
        observed = _Observed()
        for batch in batches:
            observed.add(batch[name], rng)
        lo, hi, clipped = robust_range(observed.mins, observed.maxs, observed.sample())
        if not clipped:
            continue
        if log is not None:
            log(_clip_note(name, observed, lo, hi))
        for batch in out:
            value = np.asarray(batch[name])
            batch[name] = np.clip(value, lo, hi).astype(value.dtype, copy=False)
    return out


def probe_session(model: onnx.ModelProto, wanted: Sequence[str] = ()):
    """An ONNX Runtime session running ``model`` as written, with ``wanted`` tensors as extra
    outputs: graph optimizations off, so every Q/DQ and operator runs in float as the graph says
    (fused integer kernels round differently, and on x86 CPUs without VNNI they saturate)."""
    import onnxruntime as ort  # the calibration engine; a core dependency

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in wanted:
        if name not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def calibrate(
    model: onnx.ModelProto,
    tensor_names: Sequence[str],
    batches: Sequence[Batch],
    seed: int = 0,
    progress: bool = True,
    method: str = "minmax",
    log: Log | None = print,
) -> dict[str, TensorRange]:
    """Observe ``tensor_names`` of ``model`` over ``batches``.

    ``method`` picks the clipping value: "minmax" (the observed range; measured best on the zoo,
    e.g. MiniLM-L6 cosine to fp32 0.998 against 0.996 with "mse") or "mse" (minimise the squared
    quantization error on the sample, clipping rare outliers). Either way the range leaves out
    absurd outliers (:func:`robust_range`): float inputs are clipped to their robust range before
    the graph runs, and every clipped range is noted through ``log`` on one line.

    Returns:
        tensor name -> TensorRange. Unsigned (non-negative) tensors get a clip chosen for 255
        levels, signed ones for 127.

    Raises:
        DataError: a calibration input holds NaN or infinity.
    """
    if method not in ("minmax", "mse"):
        raise ValueError(f"unknown calibration method {method!r}; expected 'minmax' or 'mse'")
    batches = clip_input_outliers(batches, seed, log)
    inputs = {i.name for i in model.graph.input}
    wanted = list(dict.fromkeys(tensor_names))
    session = probe_session(model, wanted)
    rng = np.random.default_rng(seed)
    observed = {n: _Observed() for n in wanted}
    for batch in tqdm(batches, desc="calibrating", unit="batch", disable=not progress, leave=False):
        for name, value in zip(wanted, session.run(wanted, batch)):
            observed[name].add(value, rng)
    ranges = {}
    for name in wanted:
        obs = observed[name]
        sample = obs.sample()
        lo, hi, clipped = robust_range(obs.mins, obs.maxs, sample)
        if clipped and log is not None and name not in inputs:
            log(_clip_note(name, obs, lo, hi))
        unsigned = lo >= 0.0
        abs_max = hi if unsigned else max(abs(lo), abs(hi))
        kept = np.abs(sample[np.isfinite(sample)])
        kept = kept[kept <= abs_max]
        clip = best_clip(kept, abs_max, 255 if unsigned else 127) if method == "mse" else abs_max
        ranges[name] = TensorRange(min=lo, max=hi, clip=clip)
    return ranges
