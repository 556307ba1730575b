"""The pipeline, one public function per stage, and ``compile_model`` that runs them all.

Stages: :func:`resolve` (model + target), :func:`export` (fp32 ONNX, inventory, calibration, plan,
QDQ ONNX, checks), :func:`lower` (engines), :func:`measure` (latency and accuracy), and the report
(``deploycomp.report.write_report``). Everything is written into a temporary directory beside the
output directory and renamed into place when the run succeeds, so a failed run leaves nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from deploycomp._version import __version__
from deploycomp.artifacts import (
    AccuracyRow,
    Engine,
    ExportedModel,
    LatencyRow,
    MeasurementResult,
    TensorSpec,
    write_json_atomic,
)
from deploycomp.compress.config import CompressConfig, check_prune_amount
from deploycomp.errors import AccuracyGuardError, BackendError
from deploycomp.export.calibrate import calibrate, clip_input_outliers
from deploycomp.export.check import check_exported
from deploycomp.export.onnx_export import fp32_model, torch_outputs
from deploycomp.export.qdq import LayerQuant, activation_sites, insert_qdq, residual_adds
from deploycomp.export.smooth import channel_statistics, choose_alphas, smooth, smoothable_sites
from deploycomp.hw import TargetResolution, describe_host, resolve_target
from deploycomp.measure.guard import DEFAULT_GUARD, AccuracyGuard, guard_misses
from deploycomp.measure.memory import check_batch_memory
from deploycomp.modelspec import ModelSpec
from deploycomp.plan.inventory import build_inventory
from deploycomp.plan.planner import plan_int8
from deploycomp.rundir import RunDirectory
from deploycomp.validate import check_batch_sizes, validate_spec

Log = Callable[[str], None]
CPU_BACKENDS = ("openvino", "onnxruntime")


@dataclasses.dataclass(frozen=True)
class MeasureConfig:
    """How long to measure. The defaults suit a report; tests use fewer rounds."""

    rounds: int = 10
    block_runs: int = 20
    warmup_runs: int = 10
    threads: int = 0  # 0: every CPU this process may use
    eval_limit: int | None = None  # samples per eval set


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"deploycomp": __version__}
    for lib in ("torch", "onnx", "onnxruntime", "openvino", "numpy"):
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            pass
    return out


def choose_backends(
    resolution: TargetResolution, requested: Sequence[str] | None
) -> tuple[str, list[str], dict[str, str]]:
    """(backend the plan is for, backends to build here, backends skipped -> why)."""
    from deploycomp.backends import availability_table, get_backend

    avail = dict(availability_table())
    profile = resolution.profile
    if requested:
        for name in requested:
            get_backend(name)  # unknown names fail here with the known ones listed
        wanted = list(dict.fromkeys(requested))
    else:
        wanted = list(profile.backends)
        if not resolution.is_host:  # cross-compiling: also run the engines this host can run
            wanted += [b for b in CPU_BACKENDS if b not in wanted]
    plan_backend = next((b for b in wanted if b in profile.backends), wanted[0])
    build, skipped = [], {}
    for name in wanted:
        if name not in avail:
            skipped[name] = "not a backend deploycomp has yet"
        elif not avail[name].available:
            skipped[name] = avail[name].reason
        elif name not in CPU_BACKENDS and profile.kind == "cpu":
            skipped[name] = f"{name} does not target CPUs"
        else:
            build.append(name)
    if not build:
        details = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        runnable = [n for n, a in avail.items() if a.available and n in CPU_BACKENDS]
        fix = (f"pass --backend {' or --backend '.join(runnable)} to build what runs here"
               if runnable else "install a backend that runs here (deploycomp backends)")
        if not resolution.is_host:
            fix += f", or compile on a machine with {' or '.join(wanted)}"
        raise BackendError(f"none of the backends {wanted} can build an engine here "
                           f"({details}); {fix}.")
    return plan_backend, build, skipped


def export(
    spec: ModelSpec,
    resolution: TargetResolution,
    plan_backend: str,
    run_dir: Path,
    *,
    seed: int = 0,
    log: Log = print,
    progress: bool = True,
    compress: CompressConfig | None = None,
) -> ExportedModel:
    """fp32 ONNX -> inventory -> calibration -> plan -> QDQ ONNX -> checks. Writes plan.json,
    model_fp32.onnx, model.onnx and exported.json into ``run_dir``.

    With ``compress``, the plan comes from the joint planner under its budget and the QDQ model
    from the trained student (:mod:`deploycomp.compress.stage`; also writes compression.json);
    without it, from post-training INT8 quantization.
    """
    fp32_path, qdq_path = run_dir / "model_fp32.onnx", run_dir / "model.onnx"
    if compress is not None:
        from deploycomp.backends import availability_table
        from deploycomp.compress.stage import compress_and_export

        runs_here = dict(availability_table()).get(plan_backend)
        plan, record = compress_and_export(
            spec, resolution.profile, plan_backend, run_dir, compress, seed=seed, log=log,
            progress=progress,
            measure_options=(compress.measure_options and resolution.is_host
                             and runs_here is not None and runs_here.available),
        )
        names = spec.input_names
        checks = check_exported(  # the trained student departs from the original on purpose:
            lambda b: torch_outputs(spec.model, b, names), str(fp32_path), str(qdq_path),
            spec.calibration[:2], floors=False,  # its export is held to the student
        )
        checks.update(record["export_checks"])
        return _exported(onnx.load(str(qdq_path)), checks,
                         sum(1 for d in plan.layers if d.weight != "fp32"), run_dir)
    fp32 = fp32_model(spec, fp32_path, log)
    calibration = clip_input_outliers(spec.calibration, seed, log)
    batch_size = spec.batch_sizes[0]
    layers = build_inventory(fp32, spec.dims(batch_size))
    eligible = [layer for layer in layers if layer.eligible and layer.kind != "embedding"]
    sites = activation_sites(fp32, {layer.node for layer in eligible})
    source = fp32
    groups = smoothable_sites(eligible, sites)
    alphas: dict[str, float] = {}
    if groups:
        stats = channel_statistics(fp32, list(groups), calibration, seed=seed)
        alphas = choose_alphas(fp32, groups, stats)
        log(f"smooth   {len(alphas)} of {len(groups)} linear-layer input sites (SmoothQuant, "
            "strength chosen per site by the INT8 product error)")
        source, _ = smooth(fp32, groups, stats, alphas)
        sites = activation_sites(source, {layer.node for layer in eligible})
    adds = residual_adds(source, {layer.node for layer in eligible})
    tensors = list(dict.fromkeys([*sites.values(), *(i for a in adds for i in a.input)]))
    log(f"calibrate {len(tensors)} activation tensors on "
        f"{sum(next(iter(b.values())).shape[0] for b in spec.calibration)} samples")
    ranges = calibrate(source, tensors, calibration, seed=seed, progress=progress, log=log)
    plan = plan_int8(layers, sites, ranges, resolution.profile, plan_backend,
                     model_name=spec.name, batch_size=batch_size, seed=seed,
                     smoothed={la.node: alphas[site] for site in alphas
                               for la in groups[site]},
                     residual_adds=adds)
    plan.save(run_dir / "plan.json")
    quantized = {d.onnx_node: d for d in plan.layers if d.kind != "add" and d.weight != "fp32"}
    add_schemes = {
        d.onnx_node: dict(zip(next(a.input for a in adds if a.name == d.onnx_node),
                              d.activation.split(",")))
        for d in plan.layers if d.kind == "add" and d.activation != "fp32"
    }
    by_node = {layer.node: layer for layer in layers}
    qdq = insert_qdq(source,
                     {n: LayerQuant(by_node[n], d.activation) for n, d in quantized.items()},
                     ranges, add_schemes)
    onnx.checker.check_model(qdq)
    onnx.save(qdq, str(qdq_path))
    log(f"plan     {len(quantized)}/{len(layers)} layers int8 for {plan_backend} on "
        f"{resolution.profile.id}; checking the QDQ model against the torch model")
    names = spec.input_names
    checks = check_exported(
        lambda b: torch_outputs(spec.model, b, names), str(fp32_path), str(qdq_path),
        calibration[:2],
    )
    return _exported(qdq, checks, len(quantized), run_dir)


def _exported(qdq: onnx.ModelProto, checks: dict[str, float], quantized: int,
              run_dir: Path) -> ExportedModel:
    exported = ExportedModel(
        path="model.onnx",
        baseline_path="model_fp32.onnx",
        opset=next(o.version for o in qdq.opset_import if o.domain in ("", "ai.onnx")),
        inputs=tuple(_tensor_spec(v) for v in qdq.graph.input
                     if v.name not in {i.name for i in qdq.graph.initializer}),
        outputs=tuple(_tensor_spec(v) for v in qdq.graph.output),
        checks=checks,
        quantized_nodes=quantized,
        versions=_versions(),
    )
    exported.save(run_dir / "exported.json")
    return exported


def _tensor_spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    t = vi.type.tensor_type
    shape = tuple(d.dim_param or d.dim_value for d in t.shape.dim)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
    return TensorSpec(vi.name, shape, dtype)


def engine_variants(backend: str) -> tuple[str, ...]:
    # OpenVINO lowers fp32 models to bf16 by default where the CPU has bf16 units: its default
    # is a third engine, distinct from the true fp32 baseline.
    return ("compiled", "fp32", "default_precision") if backend == "openvino" else ("compiled", "fp32")


def lower(
    run_dir: Path,
    backends: Sequence[str],
    *,
    threads: int = 0,
    log: Log = print,
    example_inputs: Mapping[str, np.ndarray] | None = None,
) -> list[Engine]:
    """Build every variant of every backend from the run directory's ONNX files.

    ``example_inputs`` (the largest latency batch) fixes the shapes of backends that build for
    static shapes (the torch backend) and is what their kernel choice is timed on.
    """
    from deploycomp.backends import BuildConfig, get_backend

    extra: dict[str, Any] = {}
    if example_inputs:
        extra = {
            "example_inputs": dict(example_inputs),
            "input_shapes": {n: list(a.shape) for n, a in example_inputs.items()},
        }

    engines = []
    for name in backends:
        for variant in engine_variants(name):
            source = run_dir / ("model.onnx" if variant == "compiled" else "model_fp32.onnx")
            log(f"lower    {name} {variant} engine")
            backend = get_backend(name)
            device = backend.default_device()
            engine = backend.build(
                source, run_dir / "engines" / f"{name}-{variant}",
                BuildConfig(variant=variant, threads=threads, device=device, extra=extra),
            )
            engines.append(engine)
    return engines


def _measure_backend(
    spec: ModelSpec,
    engines: Sequence[Engine],
    config: MeasureConfig,
    threads: int,
    references: Callable[[], Sequence[tuple[Any, np.ndarray]]],
    host: str,
    *,
    log: Log,
    progress: bool,
) -> tuple[dict[tuple[int, str], LatencyRow], dict[tuple[int, str], AccuracyRow], list[Any]]:
    """Load one backend's engines, time them at every batch size, evaluate them, release them.

    A runtime's worker threads live as long as its sessions, and ONNX Runtime's spin for tens of
    milliseconds after each call, so an engine timed while another runtime's sessions are loaded
    shares the cores with their threads (OpenVINO INT8 at batch 64 on 2 cores: 2.2 ms beside
    ONNX Runtime, 1.2 ms alone; unevenly, by which engine's block follows theirs). Within the
    backend the engines, its fp32 baseline among them, are timed interleaved. ``references``
    gives (eval set, fp32 torch outputs), computed when first asked for, after this timing.

    Returns:
        Latency rows by (batch size, engine key), accuracy rows by (eval set index, engine key),
        and the machine load of each timing.
    """
    from deploycomp.backends import get_backend
    from deploycomp.measure.accuracy import accuracy_row, evaluate
    from deploycomp.measure.latency import measure_latency

    by_key = {f"{e.backend}-{e.variant}": e for e in engines}
    sessions = {key: get_backend(e.backend).load(e, threads) for key, e in by_key.items()}
    backend = engines[0].backend
    latency, accuracy, loads = {}, {}, []
    for batch_size in spec.batch_sizes:
        log(f"measure  {backend} latency at batch {batch_size}: {len(sessions)} engines, "
            "interleaved")
        result = measure_latency(
            sessions, spec.batch_of(batch_size), warmup_runs=config.warmup_runs,
            block_runs=config.block_runs, rounds=config.rounds, progress=progress,
        )
        loads.append(result.machine_load)
        for key, stats in result.stats.items():
            e = by_key[key]
            latency[(batch_size, key)] = LatencyRow(e.backend, e.variant, e.precision, host, stats)
    for index, (eval_set, ref_logits) in enumerate(references()):
        log(f"measure  {backend} accuracy on {eval_set.name} ({eval_set.num_samples} samples)")
        for key, session in sessions.items():
            e = by_key[key]
            logits, top1 = evaluate(session.run, eval_set, progress=progress)
            accuracy[(index, key)] = accuracy_row(e.backend, e.variant, eval_set, logits, top1,
                                                  ref_logits)
    return latency, accuracy, loads


def measure(
    spec: ModelSpec,
    engines: Sequence[Engine],
    config: MeasureConfig,
    *,
    log: Log = print,
    progress: bool = True,
) -> MeasurementResult:
    """Latency (interleaved blocks at each batch size) and accuracy on the eval sets, one backend
    at a time: only that backend's sessions are loaded while its engines are timed (see
    ``_measure_backend``), so every ratio compares engines of one backend timed together."""
    import gc

    from deploycomp.measure.accuracy import accuracy_row, evaluate
    from deploycomp.measure.environment import collect_environment
    from deploycomp.measure.latency import pin_threads

    pinned = pin_threads(config.threads)
    names = spec.input_names
    references, torch_rows = [], []

    def reference_outputs() -> list[tuple[Any, np.ndarray]]:
        # Once, after the first timing: torch's threads also spin for milliseconds after a call.
        for eval_set in spec.eval_sets[len(references):]:
            if config.eval_limit is not None:
                eval_set = _limit(eval_set, config.eval_limit)
            log(f"measure  torch fp32 reference on {eval_set.name} "
                f"({eval_set.num_samples} samples)")
            ref_logits, ref_top1 = evaluate(
                lambda b: [torch_outputs(spec.model, b, names)], eval_set, progress=progress
            )
            references.append((eval_set, ref_logits))
            torch_rows.append(accuracy_row("torch", "fp32", eval_set, ref_logits, ref_top1,
                                           ref_logits))
        return references

    by_backend: dict[str, list[Engine]] = {}
    for e in engines:
        by_backend.setdefault(e.backend, []).append(e)
    host = describe_host()
    latency, accuracy, loads = {}, {}, []
    for group in by_backend.values():
        rows = _measure_backend(spec, group, config, len(pinned), reference_outputs, host,
                                log=log, progress=progress)
        latency.update(rows[0])
        accuracy.update(rows[1])
        loads += rows[2]
        del rows
        gc.collect()  # a session held in a reference cycle would keep its threads into the next
    reference_outputs()  # (already computed unless there were no engines)
    keys = [f"{e.backend}-{e.variant}" for e in engines]
    return MeasurementResult(
        latency=tuple(latency[(b, key)] for b in spec.batch_sizes for key in keys),
        accuracy=tuple(row for i, torch_row in enumerate(torch_rows)
                       for row in (torch_row, *(accuracy[(i, key)] for key in keys))),
        machine_load=max((m for m in loads if m is not None),
                         key=lambda m: m.other_cpu_fraction, default=None),
        threads=len(pinned),
        pinned_cpus=tuple(pinned),
        environment=collect_environment(),
    )


def _limit(eval_set, limit: int):
    from deploycomp.modelspec import EvalSet

    batches, count = [], 0
    for batch in eval_set.batches:
        if count >= limit:
            break
        take = min(limit - count, next(iter(batch.values())).shape[0])
        batches.append({k: v[:take] for k, v in batch.items()})
        count += take
    labels = None if eval_set.labels is None else np.asarray(eval_set.labels)[:count]
    return EvalSet(eval_set.name, batches, labels, eval_set.metric, eval_set.description)


def compile_model(
    model: str | ModelSpec,
    *,
    target: str = "auto",
    backends: Sequence[str] | None = None,
    out_dir: str | Path = "deploycomp-out",
    data: str | None = None,
    batch_sizes: Sequence[int] | None = None,
    seed: int = 0,
    measure_config: MeasureConfig | None = None,
    log: Log = print,
    progress: bool = True,
    command: str = "",
    compress: CompressConfig | None = None,
    prune: float | str | None = None,
    prune_steps: int | None = None,
    prune_lr: float | None = None,
    guard: AccuracyGuard | None = DEFAULT_GUARD,
) -> dict[str, Any]:
    """Compile ``model`` for ``target``: plan, quantize, export, lower, measure, report.

    Args:
        model: a zoo name, an entrypoint ("file.py:function"), an .onnx path, or a ModelSpec.
        target: a hardware profile id (``deploycomp targets``), a .toml path, or "auto".
        backends: backend names to build; default: the target's preferred backends.
        out_dir: the run directory (replaced if it holds an earlier run).
        data: an .npz of real inputs, required for an .onnx model.
        batch_sizes: latency batch sizes (default: the model's, e.g. 1 and 64).
        seed: seeds calibration sampling and training; recorded in plan.json.
        compress: plan joint 2:4 + INT8/INT4 compression under a budget and train it (a torch
            model only); None: post-training INT8.
        prune: structured pruning (a torch model only): keep this fraction of every prunable
            channel group, or "auto" (with ``compress`` and a latency target: per-group amounts
            chosen by the planner); None: no pruning. With ``compress`` the units are trained
            to zero inside the joint loop, with the quantizers; without it, pruning is trained
            with distillation before post-training INT8. The fp32 baseline engine and the
            accuracy reference stay the unpruned model.
        prune_steps: training steps of pruning before post-training INT8.
        prune_lr: AdamW learning rate of pruning before post-training INT8.
        guard: what the compiled engines must keep of the fp32 model's accuracy
            (:class:`~deploycomp.measure.guard.AccuracyGuard`); None: no guard.

    Returns:
        The report (the content of report.json).

    Raises:
        AccuracyGuardError: a compiled engine missed ``guard``; the run directory was written
            and the error carries the report.

    Example:
        >>> report = compile_model("fmnist-cnn", target="auto", out_dir="out")
        >>> report["summary"]
    """
    from deploycomp.report import write_report
    from deploycomp.sources import load_model

    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out_dir = Path(out_dir)
    stage_seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stage_seconds[stage] = round(now - clock, 3)
        clock = now

    resolution = resolve_target(target)
    log(f"target   {resolution.profile.id}: {resolution.reason}")
    plan_backend, build, skipped = choose_backends(resolution, backends)
    with RunDirectory(out_dir) as run:
        tmp = run.path
        spec = validate_spec(model) if isinstance(model, ModelSpec) else load_model(model, data)
        if batch_sizes:
            spec.batch_sizes = check_batch_sizes(tuple(batch_sizes))
        check_batch_memory(spec)
        lap("load")
        original = spec
        if prune is not None and compress is not None:  # pruned inside the joint loop
            compress = dataclasses.replace(compress, prune=prune)
        elif prune is not None:
            from deploycomp.prune.stage import DEFAULT_LR, DEFAULT_STEPS, prune_spec
            from deploycomp.report.load import PRUNING_FILE

            check_prune_amount(prune, latency_target=None)
            log(f"prune    keep {prune:.0%} of every channel group, with distillation")
            spec, record = prune_spec(
                spec, resolution.profile, prune,
                steps=DEFAULT_STEPS if prune_steps is None else prune_steps,
                lr=DEFAULT_LR if prune_lr is None else prune_lr, seed=seed, progress=progress,
            )  # fmt: skip
            write_json_atomic(tmp / PRUNING_FILE, record)
            log(f"prune    {record['params_before']} -> {record['params_after']} parameters")
            lap("prune")
        notes = [f"{name} engine not built: {why}" for name, why in skipped.items()]
        if not resolution.is_host:
            notes.append(
                f"cross-compiled for {resolution.profile.id}: latencies were measured on this "
                f"host ({describe_host()}), not on the target"
            )
        write_json_atomic(tmp / "target.json", {
            "profile": resolution.profile.to_dict(), "reason": resolution.reason,
            "is_host": resolution.is_host, "host": describe_host(),
            "unavailable_backends": skipped, "plan_backend": plan_backend,
        })
        export(spec, resolution, plan_backend, tmp, seed=seed, log=log, progress=progress,
               compress=compress)
        if spec is not original:  # the fp32 baseline is the model as given, not the pruned one
            fp32_model(original, tmp / "model_fp32.onnx", log)
        lap("export")
        config = measure_config or MeasureConfig()
        engines = lower(
            tmp, build, threads=config.threads, log=log,
            example_inputs=spec.batch_of(max(spec.batch_sizes)),
        )  # fmt: skip
        lap("lower")
        result = measure(original, engines, config, log=log, progress=progress)
        result.save(tmp / "measurement.json")
        lap("measure")
        for e in engines:  # engine paths are stored relative to the run directory
            rel = dataclasses.replace(e, path=str(Path(e.path).relative_to(tmp)))
            rel.save(Path(e.path) / "engine.json")
        write_json_atomic(tmp / "run.json", {
            "model": spec.name, "model_description": spec.description, "command": command,
            "deploycomp_version": __version__, "seed": seed, "started": started,
            "target": resolution.profile.id, "stage_seconds": stage_seconds, "notes": notes,
        })
        report = json.loads(write_report(tmp)["json"].read_text())
        run.commit()
    misses = guard_misses(result.accuracy, guard) if guard is not None else []
    if misses:
        raise AccuracyGuardError(
            f"the compiled model lost too much accuracy: {'; '.join(misses)}. Train longer "
            "(--steps, --prune-steps), loosen --latency-target/--size-target or prune less; the report is in "
            f"{str(out_dir)!r}; --max-accuracy-drop sets the allowed drop, --no-accuracy-guard "
            "accepts it.", report)
    return report
