"""The on-target sweep (``deploycomp calibrate-target``): measured layer timings for a profile.

Takes a hardware profile, a model's layer inventory and the backends this machine runs; for each
distinct linear-layer and embedding shape and each option the profile accelerates on a backend, it
builds a one-layer ONNX model with the project's QDQ writer, lowers it with the project's backend
and times every option of that shape interleaved with the project's latency measurement. The median
latencies become ``MeasuredEntry`` rows, which
:func:`~deploycomp.hw.measured_toml.write_measured_profile` writes into a copy of the profile's
TOML as its ``[measured]`` table, so the planner's cost model prices those layers with numbers
measured here instead of roofline predictions. :func:`calibrate_target` runs both on a model.
"""

from __future__ import annotations

import datetime
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tqdm.auto import tqdm

from deploycomp.errors import BackendError, DeployCompError, ExportError
from deploycomp.export.calibrate import TensorRange, calibrate
from deploycomp.export.onnx_export import OPSET, fp32_model
from deploycomp.export.qdq import LayerQuant, insert_qdq
from deploycomp.hw.detect import describe_host, resolve_target
from deploycomp.hw.measured_toml import check_out_path, write_measured_profile
from deploycomp.hw.profile import FLOAT_SCHEMES, HardwareProfile, MeasuredEntry
from deploycomp.modelspec import ModelSpec
from deploycomp.plan.inventory import Layer, build_inventory
from deploycomp.plan.options import (
    ACT_INT8,
    ACT_UINT8,
    BASELINE,
    FP32,
    SPARSE_2_4,
    WEIGHT_INT4,
    WEIGHT_INT8,
    Option,
)

if TYPE_CHECKING:
    from deploycomp.backends.base import Session

Log = Callable[[str], None]
SWEPT_OP_KINDS = ("linear", "embedding")
# Every option the sweep knows how to build; each is timed where the profile accelerates it.
CANDIDATE_OPTIONS = (
    BASELINE,
    Option(WEIGHT_INT8, ACT_INT8),
    Option(WEIGHT_INT8, ACT_UINT8),
    Option(WEIGHT_INT8, FP32),
    Option(WEIGHT_INT4, FP32),
    Option(FP32, FP32, SPARSE_2_4),
    Option(WEIGHT_INT8, ACT_INT8, SPARSE_2_4),
)
# Timed calls per option and round are cut so that one block of the slowest option of a shape
# stays near this budget (an INT4 embedding table that ONNX Runtime dequantizes on every call
# takes ~20 ms a call), but never below MIN_BLOCK_RUNS.
BLOCK_BUDGET_MS = 50.0
MIN_BLOCK_RUNS = 3
_INPUT = "x"


def options_to_time(hw_profile: HardwareProfile, backend: str, op_kind: str) -> list[Option]:
    """The options of one op kind worth timing on ``backend``: fp32 and what the profile accelerates.

    Example:
        >>> [o.key for o in options_to_time(load_profile("intel/xeon-icx"), "onnxruntime", "linear")]
        ['fp32', 'int8', 'int8/u8', 'int4 w-only']
    """
    return [
        o
        for o in CANDIDATE_OPTIONS
        if o.is_fp32 or hw_profile.accelerates(backend, op_kind, o.weight, o.activation, o.sparsity)
    ]


def one_layer_model(
    op_kind: str, shape: tuple[int, ...], seed: int = 0
) -> tuple[onnx.ModelProto, np.ndarray]:
    """An fp32 ONNX model of one layer with the shape key ``shape``, and an input for it.

    ``linear`` (M, K, N): ``x[M, K] @ W[K, N]``; ``embedding`` (rows, vocab, hidden): a Gather of
    ``rows`` random indices from a ``[vocab, hidden]`` table. Weights are seeded normal values.
    """
    rng = np.random.default_rng(seed)
    rows, size_in, size_out = shape
    weight = (rng.standard_normal((size_in, size_out)) / math.sqrt(size_in)).astype(np.float32)
    if op_kind == "linear":
        x = rng.standard_normal((rows, size_in)).astype(np.float32)
        node = helper.make_node("MatMul", [_INPUT, "weight"], ["y"], name="layer/MatMul")
        x_type = TensorProto.FLOAT
    elif op_kind == "embedding":
        x = rng.integers(0, size_in, size=rows, dtype=np.int64)
        node = helper.make_node("Gather", ["weight", _INPUT], ["y"], name="layer/Gather", axis=0)
        x_type = TensorProto.INT64
    else:
        raise ValueError(f"no one-layer model for op kind {op_kind!r}; expected {SWEPT_OP_KINDS}")
    graph = helper.make_graph(
        [node],
        op_kind,
        [helper.make_tensor_value_info(_INPUT, x_type, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, size_out])],
        [numpy_helper.from_array(weight, "weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # what the torch exporter writes at opset 17
    return model, x


def _pruned_2_4(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a one-layer MatMul model with its ``[K, N]`` weight pruned 2:4 along K (the
    reduction axis, groups of 4 consecutive inputs per output), as training would leave it."""
    import torch

    from deploycomp.kernels.sparsity import apply_2_4

    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    (init,) = [i for i in pruned.graph.initializer if i.name == "weight"]
    weight = torch.from_numpy(numpy_helper.to_array(init).copy())
    init.CopyFrom(numpy_helper.from_array(apply_2_4(weight.t()).t().contiguous().numpy(), "weight"))
    return pruned


def _shape_models(
    op_kind: str, shape: tuple[int, ...], options: Sequence[Option], folder: Path, seed: int
) -> tuple[dict[Option, Path], dict[Option, dict[str, np.ndarray]], dict[Option, str]]:
    """Write the one-layer model of every option of one shape; (paths, inputs, skipped)."""
    fp32, x = one_layer_model(op_kind, shape, seed)
    (layer,) = build_inventory(fp32, {})
    if (layer.kind, layer.shape_key) != (op_kind, shape):
        raise DeployCompError(
            f"the one-layer model built for {op_kind} {shape} inventories as {layer.kind} "
            f"{layer.shape_key}; the sweep and the inventory disagree on shape keys (a bug)."
        )
    paths, inputs, skipped = {}, {}, {}
    for index, option in enumerate(options):
        # uint8 activations need a non-negative tensor (a ReLU/GELU output); the kernel's
        # speed does not depend on the values.
        batch = {_INPUT: np.abs(x) if option.activation == ACT_UINT8 else x}
        model = _pruned_2_4(fp32) if option.sparsity == SPARSE_2_4 else fp32
        if (option.weight, option.activation) != (FP32, FP32):  # a quantized option
            ranges: dict[str, TensorRange] = {}
            if option.activation not in FLOAT_SCHEMES:
                ranges = calibrate(model, [_INPUT], [batch], seed=seed, progress=False)
            quant = LayerQuant(layer, option.activation, weight=option.weight)
            try:
                model = insert_qdq(model, {layer.node: quant}, ranges)
            except ExportError as exc:
                skipped[option] = f"the QDQ writer cannot write it ({exc})"
                continue
        paths[option] = folder / f"{index}.onnx"
        onnx.save(model, str(paths[option]))
        inputs[option] = batch
    return paths, inputs, skipped


def _call_ms(session: Session, inputs: dict[str, np.ndarray]) -> float:
    """Milliseconds of one call, after a first call that may initialize lazily."""
    try:
        call = session.bind(inputs)
        call()
        start_ns = time.perf_counter_ns()
        call()
    except Exception as exc:
        raise BackendError(f"a one-layer engine of the sweep failed to run: {exc}") from exc
    return max(time.perf_counter_ns() - start_ns, 1) / 1e6


def _time_options(
    backend_name: str,
    paths: dict[Option, Path],
    inputs: dict[Option, dict[str, np.ndarray]],
    threads: int,
    measure: dict[str, int],
) -> tuple[dict[Option, float], str, str]:
    """Build, load and time the one-layer models of one shape, interleaved.

    Returns:
        (median ms per option, backend version, a note if other processes loaded the machine).
    """
    from deploycomp.backends import BuildConfig, get_backend
    from deploycomp.measure.latency import measure_latency

    backend = get_backend(backend_name)
    sessions, version = {}, ""
    for option, path in paths.items():
        variant = "fp32" if option.is_fp32 else "compiled"
        # a 2:4 option is timed on its sparse kernel (a backend that picks kernels by timing
        # would otherwise report min(dense, sparse) under the sparse option's name)
        extra = {"force_sparse": True} if option.sparsity == SPARSE_2_4 else {}
        config = BuildConfig(variant, threads, backend.default_device(), extra)
        engine = backend.build(path, path.with_suffix(""), config)
        sessions[option.key] = backend.load(engine, threads)
        version = engine.backend_version
    by_key = {o.key: inputs[o] for o in paths}
    slowest_ms = max(_call_ms(sessions[key], by_key[key]) for key in sessions)
    runs = max(MIN_BLOCK_RUNS, min(measure["block_runs"], int(BLOCK_BUDGET_MS / slowest_ms)))
    result = measure_latency(
        sessions,
        by_key,
        warmup_runs=min(measure["warmup_runs"], runs),
        block_runs=runs,
        rounds=measure["rounds"],
        progress=False,
    )
    medians = {o: result.stats[o.key].median_ms for o in paths}
    load = result.machine_load
    busy = (
        ""
        if load is None or load.idle
        else f"; other processes used {load.other_cpu_fraction:.0%} of the CPUs"
    )
    return medians, version or "unknown", busy


def _distinct_shapes(layers: Sequence[Layer]) -> tuple[list[tuple[str, tuple[int, ...]]], int]:
    """Distinct (op kind, shape key) of the swept layers, and how many have an unknown shape."""
    swept = [
        (layer.kind, tuple(int(d) for d in layer.shape_key))
        for layer in layers
        if layer.eligible and layer.kind in SWEPT_OP_KINDS and layer.weight is not None
    ]
    known = [(kind, key) for kind, key in swept if key and all(d > 0 for d in key)]
    return list(dict.fromkeys(known)), len(swept) - len(known)


def sweep(
    hw_profile: HardwareProfile,
    layers: Sequence[Layer],
    backends: Sequence[str],
    *,
    threads: int = 0,
    rounds: int = 10,
    block_runs: int = 20,
    warmup_runs: int = 10,
    seed: int = 0,
    progress: bool = True,
    log: Log = print,
) -> list[MeasuredEntry]:
    """Time every accelerated option of every distinct linear and embedding shape per backend.

    Each (op kind, ``layer.shape_key``) is timed once, as a one-layer model (a MatMul, or a
    Gather for an embedding, with a seeded random weight) written by the QDQ writer the compiler
    uses and lowered by the backend the compiler uses; the options of one shape are measured
    interleaved, on pinned threads (this process stays pinned, as after ``api.measure``). The
    latency is that of one call of the one-layer engine, so it includes the backend's per-call
    overhead. An option the writer cannot write is logged and skipped. Convolutions are not swept.

    Args:
        hw_profile: The profile whose capabilities decide the options per backend.
        layers: The model's inventory (``build_inventory``) at the batch size to plan for.
        backends: Backend names to time on (they must run here).
        threads: CPUs to pin and run on; 0 for all this process may use.
        rounds: Rounds of interleaved blocks (see ``measure_latency``).
        block_runs: Timed calls per option in each round, at most (fewer for slow options:
            see ``BLOCK_BUDGET_MS``).
        warmup_runs: Untimed calls per option first, at most as many as ``block_runs``.
        seed: Seeds the weights and inputs.
        progress: Show a progress bar over (backend, shape) pairs.
        log: Receives one line per timed shape.

    Returns:
        One entry per (backend, shape, option) timed; latency = the median, in milliseconds.

    Raises:
        DeployCompError: No linear or embedding layer to time. BackendError: A backend is unknown,
            unavailable here, or failed to build or run a model.

    Example:
        >>> entries = sweep(load_profile("intel/xeon-icx"), layers, ["onnxruntime"])
        >>> entries[0].shape, entries[0].latency_ms
        ((64, 384, 384), 0.052)
    """
    from deploycomp.measure.latency import pin_threads

    shapes, unknown = _distinct_shapes(layers)
    if unknown:
        log(f"sweep    {unknown} layers not timed: their shapes are unknown at this batch size")
    if not shapes:
        raise DeployCompError(
            f"none of the {len(layers)} layers is a {' or '.join(SWEPT_OP_KINDS)} layer with a "
            "constant weight and a known shape; the sweep times only those. Pass a model that "
            "has some."
        )
    threads = len(pin_threads(threads))
    measure = {"rounds": rounds, "block_runs": block_runs, "warmup_runs": warmup_runs}
    device, today = describe_host(), datetime.date.today().isoformat()
    entries: list[MeasuredEntry] = []
    work = [(b, kind, shape) for b in backends for kind, shape in shapes]
    with tempfile.TemporaryDirectory(prefix="deploycomp-sweep-") as tmp:
        bar = tqdm(work, desc="sweep", unit="shape", disable=not progress)
        for index, (backend, op_kind, shape) in enumerate(bar):
            folder = Path(tmp) / str(index)
            folder.mkdir()
            options = options_to_time(hw_profile, backend, op_kind)
            paths, inputs, skipped = _shape_models(op_kind, shape, options, folder, seed)
            medians, version, busy = _time_options(backend, paths, inputs, threads, measure)
            shutil.rmtree(folder)
            entries += [
                MeasuredEntry(device, backend, version, today, op_kind, shape, option.weight,
                              option.activation, option.sparsity, latency_ms)
                for option, latency_ms in medians.items()
            ]  # fmt: skip
            timed = ", ".join(f"{o.key} {ms:.4f} ms" for o, ms in medians.items())
            log(f"sweep    {backend} {op_kind} {shape}: {timed}{busy}")
            for option, why in skipped.items():
                log(f"sweep    {backend} {op_kind} {shape}: {option.key} not timed: {why}")
    return entries


def calibrate_target(
    target: str,
    model: str | ModelSpec,
    out_path: str | Path,
    *,
    backends: Sequence[str] | None = None,
    batch_size: int | None = None,
    threads: int = 0,
    progress: bool = True,
    log: Log = print,
) -> Path:
    """Time ``model``'s layer shapes on this machine and write them into a local hardware profile.

    The profile written is ``target``'s with a ``[measured]`` table of this machine's timings;
    pass it back as ``--target my-cpu.toml`` and the planner prices those layers by measurement.

    Args:
        target: ``"auto"``, a packaged profile id, or a ``.toml`` path (e.g. an earlier output).
        model: A zoo name, an entrypoint or a ModelSpec (for an ``.onnx`` file, pass
            ``deploycomp.sources.load_model(path, data)``: its input shapes come from the data).
        out_path: The ``.toml`` file to write, in an existing folder; replaced if it exists.
        backends: Backends to time; default: the profile's backends this machine can run.
        batch_size: The batch size whose layer shapes are timed; default: the model's first.
        threads: CPUs to pin and run on; 0 for all.

    Returns:
        The path written.

    Raises:
        DeployCompError: Any stage failed (profile, model, backend, output path); nothing is
            written then.

    Example:
        >>> calibrate_target("auto", "minilm-l6", "my-cpu.toml")
        PosixPath('my-cpu.toml')
    """
    out = check_out_path(out_path)
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise DeployCompError(f"batch size {batch_size!r} is not a positive integer; pass e.g. 1.")
    # The pipeline layer above hw/: imported here so that importing hw/ does not import it.
    from deploycomp.api import choose_backends
    from deploycomp.sources import load_model

    resolution = resolve_target(target)
    hw_profile = resolution.profile
    log(f"target   {hw_profile.id}: {resolution.reason}")
    if not resolution.is_host:
        log(
            f"warning  the timings are of this machine ({describe_host()}), not of "
            f"{hw_profile.name}; the profile written says so in each entry"
        )
    _, build, skipped = choose_backends(resolution, backends)
    for name in [b for b in build if b not in hw_profile.backends]:
        build.remove(name)
        skipped[name] = f"{hw_profile.id} lists no capabilities for it"
    if not build:
        raise BackendError(
            f"no backend to time: {hw_profile.id} lists {list(hw_profile.backends)} and none "
            f"of them runs here ({'; '.join(f'{k}: {v}' for k, v in skipped.items())}). "
            "Install one of them (pip install onnxruntime openvino)."
        )
    for name, why in skipped.items():
        log(f"skip     {name}: {why}")
    spec = model if isinstance(model, ModelSpec) else load_model(model)
    batch = batch_size or spec.batch_sizes[0]
    with tempfile.TemporaryDirectory(prefix="deploycomp-calibrate-") as tmp:
        fp32_path = Path(tmp) / "model_fp32.onnx"
        fp32 = fp32_model(spec, fp32_path, log)
    layers = build_inventory(fp32, spec.dims(batch))
    log(f"sweep    {spec.name} at batch {batch} on {', '.join(build)}")
    entries = sweep(hw_profile, layers, build, threads=threads, progress=progress, log=log)
    path = write_measured_profile(hw_profile, entries, out)
    log(f"wrote    {len(entries)} timings to {path}")
    return path
