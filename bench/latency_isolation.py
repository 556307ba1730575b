"""Do the report's latencies depend on what else was measured? Report medians against each engine
timed alone.

For each zoo model this runs the compile pipeline's stages (``deploycomp.api``: export, lower,
measure) for OpenVINO and ONNX Runtime at one batch size, then times every engine again in a
fresh process of its own, with only that engine's session loaded and the same settings. A report
median more than ``--tolerance`` away from the engine alone is flagged: something else measured in
the same run (another runtime's threads, another engine) changed it. Prints a table per model and
writes one JSON record:

    HF_HUB_OFFLINE=1 .venv/bin/python bench/latency_isolation.py \
        --models fmnist-cnn,efficientnet-lite0,minilm-l6 --out bench/results/latency_isolation.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from peers import stage

from deploycomp import zoo
from deploycomp.api import CPU_BACKENDS, MeasureConfig, choose_backends, export, lower, measure
from deploycomp.artifacts import Engine, write_json_atomic
from deploycomp.hw import resolve_target
from deploycomp.measure import collect_environment, measure_latency, pin_threads

# The batch each model is compared at: fmnist-cnn's large batch (where its OpenVINO INT8 engine
# was 1.9x slower beside ONNX Runtime than alone), the single-sample latency of the others.
MODEL_BATCH = {"fmnist-cnn": 64, "efficientnet-lite0": 1, "minilm-l6": 1}
DEFAULT_TOLERANCE = 0.05
EVAL_LIMIT = 256  # accuracy is measured (it is part of ``measure``) but not compared here


def time_alone(engine: dict[str, Any], inputs: dict[str, np.ndarray], threads: int,
               settings: dict[str, int]) -> dict[str, Any]:
    """In a fresh process: load one engine, time it alone, return its stats and machine load."""
    from deploycomp.backends import get_backend

    pinned = pin_threads(threads)
    built = Engine.from_dict(engine)
    key = f"{built.backend}-{built.variant}"
    session = get_backend(built.backend).load(built, len(pinned))
    result = measure_latency({key: session}, inputs, progress=False, **settings)
    load = result.machine_load
    return {"stats": result.stats[key].to_dict(), "machine_load": load and load.to_dict()}


def _alone_in_subprocess(engine: Engine, inputs, threads: int, settings) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")  # nothing inherited from this process
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(time_alone, engine.to_dict(), inputs, threads, settings).result()


def run_model(name: str, work_dir: Path, config: MeasureConfig, tolerance: float,
              repeats: int) -> dict:
    started = time.perf_counter()
    stage(f"load     {name}")
    spec = zoo.load(name)
    batch = MODEL_BATCH.get(name, spec.batch_sizes[0])
    spec.batch_sizes = (batch,)
    run_dir = work_dir / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    resolution = resolve_target("auto")
    plan_backend, build, skipped = choose_backends(resolution, CPU_BACKENDS)
    export(spec, resolution, plan_backend, run_dir, log=stage, progress=False)
    inputs = spec.batch_of(batch)
    engines = lower(run_dir, build, threads=config.threads, log=stage, example_inputs=inputs)
    settings = {"warmup_runs": config.warmup_runs, "block_runs": config.block_runs,
                "rounds": config.rounds}
    report: dict[str, list[float]] = {f"{e.backend}-{e.variant}": [] for e in engines}
    alone: dict[str, list[float]] = {key: [] for key in report}
    loads = []
    for repeat in range(repeats):  # report and alone alternate, so drift hits both alike
        stage(f"repeat   {repeat + 1} of {repeats}: the compile's measurement, then each alone")
        result = measure(spec, engines, config, log=stage, progress=False)
        loads.append(("report", result.machine_load and result.machine_load.to_dict()))
        for row in result.latency:
            report[f"{row.backend}-{row.variant}"].append(row.stats.median_ms)
        for engine in engines:
            key = f"{engine.backend}-{engine.variant}"
            timed = _alone_in_subprocess(engine, inputs, result.threads, settings)
            alone[key].append(timed["stats"]["median_ms"])
            loads.append((f"alone {key}", timed["machine_load"]))
    rows = []
    for key, medians in report.items():
        in_report, by_itself = float(np.median(medians)), float(np.median(alone[key]))
        rows.append({
            "engine": key, "batch_size": batch, "report_median_ms": in_report,
            "alone_median_ms": by_itself, "ratio": in_report / by_itself,
            "report_medians_ms": medians, "alone_medians_ms": alone[key],
            # how far the same engine timed alone moved between repeats: the noise floor
            "alone_spread": max(alone[key]) / min(alone[key]) - 1.0,
            "flagged": abs(in_report / by_itself - 1.0) > tolerance,
        })  # fmt: skip
    return {
        "model": name, "batch_size": batch, "skipped_backends": skipped, "rows": rows,
        "repeats": repeats, "machine_loads": loads,
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip


def print_table(record: dict, tolerance: float) -> None:
    print(f"\n== {record['model']}, batch {record['batch_size']}, median of "
          f"{record['repeats']} repeats ==")
    head = f"{'engine':<30}{'report ms':>11}{'alone ms':>11}{'ratio':>8}{'alone spread':>14}"
    print(head + "\n" + "-" * len(head))
    for r in record["rows"]:
        flag = f"  DIFFERS by more than {tolerance:.0%}" if r["flagged"] else ""
        print(f"{r['engine']:<30}{r['report_median_ms']:>11.3f}{r['alone_median_ms']:>11.3f}"
              f"{r['ratio']:>8.3f}{r['alone_spread']:>13.0%}{flag}")
    busiest = max((x for x in record["machine_loads"] if x[1]),
                  key=lambda x: x[1]["other_cpu_fraction"], default=None)
    if busiest is not None:
        print(f"busiest timing ({busiest[0]}): other processes used "
              f"{busiest[1]['other_cpu_fraction']:.0%} of the CPUs; above 10%, rerun on a quiet "
              "machine before reading the ratios")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODEL_BATCH))
    parser.add_argument("--rounds", type=int, default=MeasureConfig.rounds)
    parser.add_argument("--block-runs", type=int, default=MeasureConfig.block_runs)
    parser.add_argument("--warmup-runs", type=int, default=MeasureConfig.warmup_runs)
    parser.add_argument("--threads", type=int, default=0, help="0: every CPU allowed")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="flag report medians further than this fraction from alone")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternate the compile's measurement and the engines alone this "
                        "many times; medians over repeats are compared")
    parser.add_argument("--out", type=Path, default=Path("bench/results/latency_isolation.json"))
    parser.add_argument("--keep", type=Path, default=None, help="keep the run directories here")
    args = parser.parse_args(argv)
    # The zoo's transformers model and tokenizer are read from the local cache only.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    config = MeasureConfig(rounds=args.rounds, block_runs=args.block_runs,
                           warmup_runs=args.warmup_runs, threads=args.threads,
                           eval_limit=EVAL_LIMIT)
    work_dir = args.keep or Path(tempfile.mkdtemp(prefix="deploycomp-isolation-"))
    results = []
    try:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            results.append(run_model(name, work_dir, config, args.tolerance, args.repeats))
            print_table(results[-1], args.tolerance)
    finally:
        if args.keep is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/latency_isolation.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "measure_config": dataclasses.asdict(config),
        "tolerance": args.tolerance,
        "environment": collect_environment(),
        "models": results,
    }
    write_json_atomic(args.out, record)
    flagged = [f"{m['model']} {r['engine']}" for m in results for r in m["rows"] if r["flagged"]]
    print(f"\n{len(flagged)} engine(s) differ from alone by more than {args.tolerance:.0%}"
          + (f": {', '.join(flagged)}" if flagged else ""))
    stage(f"wrote    {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
