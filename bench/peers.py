"""deploycomp's INT8 against two peer quantizers, measured in one process per model.

For each zoo model this exports deploycomp's QDQ model (planned for OpenVINO) and, from the same
fp32 ONNX and the same calibration batches, ONNX Runtime's ``quantize_static`` (QDQ, per-channel)
and NNCF's post-training quantization (OpenVINO IR). Every engine is loaded at once; latency is
timed per backend with interleaved blocks (``deploycomp.measure.measure_latency``) at batch 1 and
the model's larger batch, and accuracy on the model's full eval sets. Results go to one JSON file;
a table per model and the targets (PASS/FAIL) are printed.

    .venv/bin/python bench/peers.py --models fmnist-cnn,efficientnet-lite0,minilm-l6 \
        --out bench/results/peers.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from peer_quantizers import load_openvino_ir, quantize_with_nncf, quantize_with_onnxruntime

from deploycomp import zoo
from deploycomp.api import export
from deploycomp.artifacts import write_json_atomic
from deploycomp.backends import BuildConfig, get_backend
from deploycomp.export.onnx_export import torch_outputs
from deploycomp.hw import resolve_target
from deploycomp.measure import (
    accuracy_row,
    collect_environment,
    evaluate,
    measure_latency,
    pin_threads,
)

# (rounds, block_runs) per model and batch kind: enough timed calls for stable medians on 2 cores.
LATENCY_SETTINGS = {
    "fmnist-cnn": {"small": (15, 20), "large": (15, 20)},
    "efficientnet-lite0": {"small": (15, 10), "large": (8, 3)},
    "minilm-l6": {"small": (15, 20), "large": (10, 5)},
}
DEFAULT_SETTINGS = {"small": (15, 20), "large": (8, 5)}
WARMUP_RUNS = 5

OPENVINO, ONNXRUNTIME = "openvino", "onnxruntime"
BASELINE, DEFAULT, OURS, ORT_PEER, NNCF_PEER = (
    "fp32",
    "default_precision",
    "deploycomp_int8",
    "ort_int8",
    "nncf_int8",
)


def stage(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


# ---- engines -------------------------------------------------------------------------------------


def build_engines(
    run_dir: Path, peer_a: dict | None, peer_b: dict | None, threads: int
) -> tuple[dict[str, dict[str, Any]], dict[str, dict]]:
    """Build and load every engine: {backend: {engine: session}} and {key: build record}."""
    sources = {BASELINE: run_dir / "model_fp32.onnx", OURS: run_dir / "model.onnx"}
    plan = {
        OPENVINO: [
            (BASELINE, "fp32", sources[BASELINE]),
            (DEFAULT, "default_precision", sources[BASELINE]),
            (OURS, "compiled", sources[OURS]),
        ],
        ONNXRUNTIME: [(BASELINE, "fp32", sources[BASELINE]), (OURS, "compiled", sources[OURS])],
    }
    if peer_a is not None:
        plan[OPENVINO].append((ORT_PEER, "compiled", peer_a["path"]))
        plan[ONNXRUNTIME].append((ORT_PEER, "compiled", peer_a["path"]))
    sessions: dict[str, dict[str, Any]] = {OPENVINO: {}, ONNXRUNTIME: {}}
    records: dict[str, dict] = {}
    for backend, entries in plan.items():
        for name, variant, source in entries:
            stage(f"build    {backend}/{name} from {source.name}")
            engine = get_backend(backend).build(
                source,
                run_dir / "engines" / f"{backend}-{name}",
                BuildConfig(variant=variant, threads=threads),
            )
            sessions[backend][name] = get_backend(backend).load(engine, threads)
            records[f"{backend}/{name}"] = {
                "variant": variant,
                "source": source.name,
                "precision": engine.precision,
                "build_config": engine.build_config,
                "notes": list(engine.notes),
            }
    if peer_b is not None:
        stage(f"load     {OPENVINO}/{NNCF_PEER} from the NNCF IR")
        sessions[OPENVINO][NNCF_PEER] = load_openvino_ir(peer_b["path"], threads)
        from deploycomp.backends.openvino import _compile_config

        records[f"{OPENVINO}/{NNCF_PEER}"] = {
            "variant": "compiled",
            "source": "NNCF IR (model.xml)",
            "precision": "int8",
            "build_config": _compile_config("compiled", threads),
            "notes": [],
        }
    order = [BASELINE, DEFAULT, OURS, ORT_PEER, NNCF_PEER]
    return {
        b: dict(sorted(s.items(), key=lambda kv: order.index(kv[0]))) for b, s in sessions.items()
    }, records


# ---- measurement ---------------------------------------------------------------------------------


def measure_all_latency(spec, sessions: dict, batch_sizes: list[int], max_attempts: int) -> list:
    settings = LATENCY_SETTINGS.get(spec.name, DEFAULT_SETTINGS)
    rows = []
    for batch_size in batch_sizes:
        rounds, block_runs = settings["small" if batch_size == 1 else "large"]
        inputs = spec.batch_of(batch_size)
        for backend, group in sessions.items():
            stage(
                f"latency  {backend} batch {batch_size}: {len(group)} engines interleaved, "
                f"{rounds} rounds x {block_runs} runs"
            )
            result = measure_latency(
                group,
                inputs,
                warmup_runs=WARMUP_RUNS,
                block_runs=block_runs,
                rounds=rounds,
                max_attempts=max_attempts,
                progress=True,
            )
            load = result.machine_load.to_dict() if result.machine_load else None
            for name, stats in result.stats.items():
                rows.append(
                    {
                        "backend": backend,
                        "engine": name,
                        **stats.to_dict(),
                        "rounds": rounds,
                        "block_runs": block_runs,
                        "machine_load": load,
                    }
                )
    return rows


def measure_all_accuracy(spec, sessions: dict) -> list:
    rows = []
    for eval_set in spec.eval_sets:
        stage(f"accuracy {eval_set.name} ({eval_set.num_samples} samples): torch fp32 reference")
        ref, ref_top1 = evaluate(
            lambda b: [torch_outputs(spec.model, b, spec.input_names)], eval_set, progress=True
        )
        rows.append(
            {
                "engine": "torch_fp32",
                **accuracy_row("torch", "fp32", eval_set, ref, ref_top1, ref).to_dict(),
            }
        )
        for backend, group in sessions.items():
            for name, session in group.items():
                logits, top1 = evaluate(session.run, eval_set, progress=True)
                rows.append(
                    {
                        "engine": name,
                        **accuracy_row(backend, name, eval_set, logits, top1, ref).to_dict(),
                    }
                )
    return rows


# ---- targets and tables --------------------------------------------------------------------------


def _median(latency: list, backend: str, engine: str, batch: int) -> float | None:
    return next(
        (
            r["median_ms"]
            for r in latency
            if r["backend"] == backend and r["engine"] == engine and r["batch_size"] == batch
        ),
        None,
    )


def _acc(accuracy: list, backend: str, engine: str, eval_set: str) -> dict | None:
    return next(
        (
            r
            for r in accuracy
            if r["backend"] == backend and r["engine"] == engine and r["eval_set"] == eval_set
        ),
        None,
    )


def _check(name: str, passed: bool, detail: str) -> dict:
    return {"target": name, "result": "PASS" if passed else "FAIL", "detail": detail}


def evaluate_targets(model: str, latency: list, accuracy: list, batches: list[int]) -> list:
    checks = []
    for batch in batches:
        ours, fp32 = (
            _median(latency, OPENVINO, OURS, batch),
            _median(latency, OPENVINO, BASELINE, batch),
        )
        checks.append(
            _check(
                f"openvino b{batch}: deploycomp INT8 >= 2.0x true fp32",
                fp32 / ours >= 2.0,
                f"{fp32 / ours:.2f}x ({ours:.3f} vs {fp32:.3f} ms)",
            )
        )
        peers = {p: _median(latency, OPENVINO, p, batch) for p in (ORT_PEER, NNCF_PEER)}
        peers = {p: v for p, v in peers.items() if v is not None}
        if peers:
            best = min(peers, key=peers.get)
            checks.append(
                _check(
                    f"openvino b{batch}: deploycomp INT8 within 5% of the best peer",
                    ours <= 1.05 * peers[best],
                    f"{ours / peers[best]:.3f}x the best peer ({best} {peers[best]:.3f} ms)",
                )
            )
        ort_ours, ort_peer = (_median(latency, ONNXRUNTIME, e, batch) for e in (OURS, ORT_PEER))
        if ort_peer is not None:
            checks.append(
                _check(
                    f"onnxruntime b{batch}: deploycomp INT8 no slower than ORT INT8",
                    ort_ours <= ort_peer,
                    f"{ort_ours:.3f} vs {ort_peer:.3f} ms ({ort_ours / ort_peer:.3f}x)",
                )
            )
    ref = {r["eval_set"]: r for r in accuracy if r["backend"] == "torch"}
    for backend in (OPENVINO, ONNXRUNTIME):
        for eval_set, r0 in ref.items():
            row = _acc(accuracy, backend, OURS, eval_set)
            if model == "fmnist-cnn":
                drop = 100 * (r0["value"] - row["value"])
                checks.append(
                    _check(
                        f"{backend}: fmnist INT8 drop <= 0.3 points",
                        drop <= 0.3,
                        f"{100 * row['value']:.2f}% vs fp32 {100 * r0['value']:.2f}%"
                        f" (drop {drop:.2f})",
                    )
                )
            elif model == "minilm-l6":
                drop = 100 * (r0["value"] - row["value"])
                ok = drop <= 0.5 and (row["cosine"] or 0) >= 0.995 and row["finite"]
                checks.append(
                    _check(
                        f"{backend}: minilm drop <= 0.5, cosine >= 0.995, finite",
                        ok,
                        f"drop {drop:.2f} points, cosine {row['cosine']:.4f}, "
                        f"finite {row['finite']}",
                    )
                )
            elif model == "efficientnet-lite0" and r0["value"] is not None:
                correct = round(row["value"] * row["num_samples"])
                checks.append(
                    _check(
                        f"{backend}: efficientnet >= 17/20 photos",
                        correct >= 17,
                        f"{correct}/{row['num_samples']}",
                    )
                )
            elif model == "efficientnet-lite0":
                peer_rows = [_acc(accuracy, backend, p, eval_set) for p in (ORT_PEER, NNCF_PEER)]
                peer_rows = [p for p in peer_rows if p is not None]
                best = max(p["top1_agreement"] for p in peer_rows)
                checks.append(
                    _check(
                        f"{backend}: efficientnet agreement >= the better peer",
                        row["top1_agreement"] >= best,
                        f"{row['top1_agreement']:.3f} vs best peer {best:.3f}",
                    )
                )
    return checks


def print_tables(model: str, latency: list, accuracy: list, checks: list) -> None:
    print(f"\n== {model} ==")
    head = (
        f"{'engine':<18}{'backend':<13}{'batch':>6}{'median ms':>11}{'p90 ms':>10}"
        f"{'vs fp32':>9}{'vs default':>11}  accuracy"
    )
    print(head + "\n" + "-" * len(head))
    for r in latency:
        fp32 = _median(latency, r["backend"], BASELINE, r["batch_size"])
        default = _median(latency, r["backend"], DEFAULT, r["batch_size"])
        vs_default = f"{default / r['median_ms']:.2f}x" if default else "-"
        acc = "; ".join(
            _format_acc(a)
            for a in accuracy
            if a["backend"] == r["backend"] and a["engine"] == r["engine"]
        )
        print(
            f"{r['engine']:<18}{r['backend']:<13}{r['batch_size']:>6}{r['median_ms']:>11.3f}"
            f"{r['p90_ms']:>10.3f}{fp32 / r['median_ms']:>8.2f}x{vs_default:>11}  {acc}"
        )
    for r in latency:
        if r["engine"] == BASELINE and r["machine_load"]:
            load = r["machine_load"]
            print(
                f"machine load, {r['backend']} b{r['batch_size']}: other processes "
                f"{100 * load['other_cpu_fraction']:.0f}% of the CPUs, loadavg "
                f"{load['loadavg_1m']:.2f}, {load['attempts']} attempt(s)"
            )
    for a in accuracy:
        if a["backend"] == "torch":
            print(f"torch fp32 reference: {_format_acc(a)}")
    for c in checks:
        print(f"  {c['result']}  {c['target']}: {c['detail']}")


def _format_acc(a: dict) -> str:
    parts = [a["eval_set"]]
    if a["value"] is not None:
        parts.append(f"top1 {100 * a['value']:.2f}%")
    parts.append(f"agree {100 * a['top1_agreement']:.1f}%")
    if a["cosine"] is not None:
        parts.append(f"cos {a['cosine']:.4f}")
    if not a["finite"]:
        parts.append("NOT FINITE")
    return " ".join(parts)


# ---- driver --------------------------------------------------------------------------------------


def run_model(name: str, work_dir: Path, threads: int, max_attempts: int) -> dict:
    started = time.perf_counter()
    stage(f"load     {name}")
    spec = zoo.load(name)
    batch_sizes = list(spec.batch_sizes)
    run_dir = work_dir / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    resolution = resolve_target("auto")
    export(spec, resolution, OPENVINO, run_dir, log=stage, progress=True)
    calibration = [dict(b) for b in spec.calibration]
    samples = sum(len(next(iter(b.values()))) for b in calibration)
    stage(f"peer A   onnxruntime quantize_static on {samples} calibration samples")
    peer_a = quantize_with_onnxruntime(run_dir / "model_fp32.onnx", calibration, run_dir)
    peer_b, skipped = None, {}
    if importlib.util.find_spec("nncf") is None:
        skipped[NNCF_PEER] = "nncf is not installed (pip install nncf): peer B skipped"
        stage(f"peer B   skipped: {skipped[NNCF_PEER]}")
    else:
        stage(f"peer B   nncf.quantize on {samples} calibration samples")
        nncf_dir = run_dir / "nncf"
        nncf_dir.mkdir()
        peer_b = quantize_with_nncf(run_dir / "model_fp32.onnx", calibration, name, nncf_dir)
    sessions, records = build_engines(run_dir, peer_a, peer_b, threads)
    latency = measure_all_latency(spec, sessions, batch_sizes, max_attempts)
    accuracy = measure_all_accuracy(spec, sessions)
    checks = evaluate_targets(name, latency, accuracy, batch_sizes)
    print_tables(name, latency, accuracy, checks)
    return {
        "model": name,
        "description": spec.description,
        "batch_sizes": batch_sizes,
        "target_profile": resolution.profile.id,
        "calibration_samples": samples,
        "peers": {
            ORT_PEER: {k: str(v) if k == "path" else v for k, v in peer_a.items()},
            NNCF_PEER: None
            if peer_b is None
            else {k: str(v) if k == "path" else v for k, v in peer_b.items()},
        },
        "skipped": skipped,
        "engines": records,
        "latency": latency,
        "accuracy": accuracy,
        "targets": checks,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(zoo.names()))
    parser.add_argument("--out", type=Path, default=Path("bench/results/peers.json"))
    parser.add_argument("--threads", type=int, default=0, help="0: every CPU allowed")
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=3,
        help="latency attempts when the machine is busy (lowest load kept)",
    )
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep the run directories (ONNX, IR, engines) here"
    )
    args = parser.parse_args(argv)
    # The zoo's transformers model and tokenizer are read from the local cache only.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    pinned = pin_threads(args.threads)
    stage(f"pinned   {len(pinned)} threads on CPUs {pinned}")
    work_dir = args.keep or Path(tempfile.mkdtemp(prefix="deploycomp-peers-"))
    results = []
    try:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            results.append(run_model(name, work_dir, len(pinned), args.max_attempts))
    finally:
        if args.keep is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/peers.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "threads": len(pinned),
        "pinned_cpus": pinned,
        "environment": collect_environment(),
        "nncf_version": _version("nncf"),
        "models": results,
    }
    write_json_atomic(args.out, record)
    print("\nSUMMARY")
    for r in results:
        for c in r["targets"]:
            print(f"  {c['result']}  {r['model']}: {c['target']}: {c['detail']}")
    stage(f"wrote    {args.out}")
    return 0


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
