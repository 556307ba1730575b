"""Structured channel pruning + INT8 against the peers' INT8 engines (CPU, fmnist-cnn and
efficientnet-lite0).

For each model, one of two paths:

- ``--joint``: pruning inside joint compression, as ``compile --prune KEEP|auto --latency-target``
  runs it: the planner chooses each group's amount under ``--latency-target`` (``--keep auto``) or
  keeps ``--keep`` of every group, plans the precisions on the pruned shapes, and the joint loop
  trains the channels to zero with the quantizers on, removes them and trains on;
- otherwise: the channel groups are pruned to ``--keep`` of their channels (rounded to the host
  profile's channel multiple) with distillation from the fp32 model (``deploycomp.prune``), then
  quantized to INT8 by the compiler's own post-training path, calibrated on the pruned model.

In one process, interleaved per backend, it times and evaluates: fp32, deploycomp's INT8 of the
unpruned model, the pruned INT8 model, ONNX Runtime's ``quantize_static`` and NNCF (OpenVINO).
Prints a table and writes JSON:

    HF_HUB_OFFLINE=1 .venv/bin/python bench/prune.py --models fmnist-cnn --out bench/results/prune.json
    HF_HUB_OFFLINE=1 .venv/bin/python bench/prune.py --models fmnist-cnn --joint --keep auto \
        --latency-target 0.3 --batch 64 --steps 1404 --lr 1e-4 --out bench/results/prune_joint.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from peer_quantizers import load_openvino_ir, quantize_with_nncf, quantize_with_onnxruntime
from peers import measure_all_accuracy, measure_all_latency, stage

from deploycomp import zoo
from deploycomp.api import export
from deploycomp.backends import BuildConfig, get_backend
from deploycomp.compress.config import CompressConfig
from deploycomp.hw import resolve_target
from deploycomp.plan.joint_planner import Budget
from deploycomp.prune.train import channel_multiple, prune_with_distillation

OURS, PRUNED, ORT_PEER, NNCF_PEER = "deploycomp_int8", "pruned_int8", "ort_quantize_static", "nncf"
PEERS = (ORT_PEER, NNCF_PEER)


def _param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_model(name: str, args: argparse.Namespace, work: Path) -> dict:
    started = time.perf_counter()
    spec = zoo.load(name)
    if args.batch:
        spec.batch_sizes = (args.batch,)
    resolution = resolve_target("auto")
    multiple = channel_multiple(resolution.profile)
    keep, steps, lr = args.keep, args.steps, args.lr
    dirs = {"full": work / name / "full", "pruned": work / name / "pruned"}
    for folder in dirs.values():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    export(spec, resolution, "openvino", dirs["full"], log=stage, progress=True)
    if args.joint:
        stage(f"prune    {name}: --prune {keep} inside joint compression, latency target "
              f"{args.latency_target}, {steps} steps")  # fmt: skip
        config = CompressConfig(
            budget=Budget(latency_target=args.latency_target), steps=steps, lr=lr,
            prune=keep if keep == "auto" else float(keep), max_rounds=1,
        )  # fmt: skip
        export(spec, resolution, "openvino", dirs["pruned"], log=stage, progress=True,
               compress=config)  # fmt: skip
        record = json.loads((dirs["pruned"] / "pruning.json").read_text())
        reasons, pruned_params = [g["reason"] for g in record["groups"]], record["params_after"]
        predicted = record["predicted"]
    else:
        example = tuple(torch.from_numpy(spec.example_inputs[n]) for n in spec.input_names)
        stage(f"prune    {name}: keep {float(keep):.0%} of each group (multiple of {multiple}), "
              f"{steps} steps")  # fmt: skip
        pruned_model, plans = prune_with_distillation(
            spec.model, example, spec.train_data or (lambda: spec.calibration), spec.input_names,
            keep_fraction=float(keep), multiple=multiple, steps=steps, lr=lr,
        )  # fmt: skip
        pruned_spec = dataclasses.replace(spec, model=pruned_model)
        export(pruned_spec, resolution, "openvino", dirs["pruned"], log=stage, progress=True)
        reasons, pruned_params = [p.reason for p in plans], _param_count(pruned_model)
        predicted = None
    calibration = [dict(b) for b in spec.calibration]
    peer_a = quantize_with_onnxruntime(dirs["full"] / "model_fp32.onnx", calibration, dirs["full"])
    nncf_dir = dirs["full"] / "nncf"
    nncf_dir.mkdir()
    peer_b = quantize_with_nncf(dirs["full"] / "model_fp32.onnx", calibration, name, nncf_dir)
    sources = {
        "fp32": (dirs["full"] / "model_fp32.onnx", "fp32"),
        OURS: (dirs["full"] / "model.onnx", "compiled"),
        PRUNED: (dirs["pruned"] / "model.onnx", "compiled"),
        ORT_PEER: (peer_a["path"], "compiled"),
    }
    sessions: dict[str, dict] = {"openvino": {}, "onnxruntime": {}}
    for backend, group in sessions.items():
        for engine, (source, variant) in sources.items():
            built = get_backend(backend).build(
                source, work / name / "engines" / f"{backend}-{engine}",
                BuildConfig(variant=variant, threads=args.threads),
            )  # fmt: skip
            group[engine] = get_backend(backend).load(built, args.threads)
    sessions["openvino"][NNCF_PEER] = load_openvino_ir(peer_b["path"], args.threads)
    batch_sizes = list(spec.batch_sizes)
    latency = measure_all_latency(spec, sessions, batch_sizes, max_attempts=3)
    accuracy = measure_all_accuracy(spec, sessions)
    return {
        "model": name,
        "joint": args.joint,
        "keep": keep,
        "latency_target": args.latency_target,
        "steps": steps,
        "lr": lr,
        "channel_multiple": multiple,
        "groups": reasons,
        "predicted": predicted,
        "params": {"fp32": _param_count(spec.model), "pruned": pruned_params},
        "onnx_bytes": {k: Path(s).stat().st_size for k, (s, _) in sources.items()},
        "latency": latency,
        "accuracy": accuracy,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _median(latency, backend, engine, batch):
    return next(
        (r["median_ms"] for r in latency
         if (r["backend"], r["engine"], r["batch_size"]) == (backend, engine, batch)), None,
    )  # fmt: skip


def print_tables(result: dict) -> list[dict]:
    latency, accuracy = result["latency"], result["accuracy"]
    batches = sorted({r["batch_size"] for r in latency})
    print(f"\n{result['model']}: params {result['params']['fp32']} -> {result['params']['pruned']}")
    for reason in result["groups"]:
        print(f"  {reason}")
    print(
        f"{'backend':<12} {'engine':<22} "
        + " ".join(f"{'b' + str(b) + ' ms':>10}" for b in batches)
    )
    for backend in ("openvino", "onnxruntime"):
        for engine in ("fp32", OURS, PRUNED, *PEERS):
            row = [_median(latency, backend, engine, b) for b in batches]
            if any(v is not None for v in row):
                print(f"{backend:<12} {engine:<22} "
                      + " ".join(f"{v:10.4f}" if v else f"{'-':>10}" for v in row))  # fmt: skip
    print(f"{'backend':<12} {'engine':<22} {'eval set':<12} {'top-1':>7} {'agree':>7}")
    for r in accuracy:
        if r["engine"] != "torch_fp32":
            print(f"{r['backend']:<12} {r['engine']:<22} {r['eval_set']:<12} "
                  f"{100 * (r['value'] or 0):7.2f} {100 * r['top1_agreement']:7.2f}")  # fmt: skip
    checks = []
    for batch in batches:
        ours = min(v for b in ("openvino", "onnxruntime")
                   if (v := _median(latency, b, PRUNED, batch)) is not None)  # fmt: skip
        peers = [
            (v, f"{b}/{p}") for b in ("openvino", "onnxruntime") for p in PEERS
            if (v := _median(latency, b, p, batch)) is not None
        ]  # fmt: skip
        best, where = min(peers)
        checks.append({"batch": batch, "pruned_ms": ours, "best_peer_ms": best,
                       "best_peer": where, "speedup": best / ours})  # fmt: skip
        print(f"batch {batch}: pruned INT8 {ours:.4f} ms vs best peer {where} {best:.4f} ms: "
              f"{best / ours:.2f}x")  # fmt: skip
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="fmnist-cnn")
    parser.add_argument(
        "--keep", default="0.5", help="fraction of each group to keep, or 'auto' (with --joint)"
    )
    parser.add_argument("--joint", action="store_true", help="prune inside joint compression")
    parser.add_argument(
        "--latency-target", type=float, help="joint: fraction of the fp32 predicted latency"
    )
    parser.add_argument("--batch", type=int, help="plan and time at this batch size only")
    parser.add_argument("--steps", type=int, default=468)
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="learning rate of the pruning or joint training"
    )
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="deploycomp-prune-"))
    results = []
    for name in args.models.split(","):
        result = run_model(name, args, work)
        result["checks"] = print_tables(result)
        results.append(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv), "results": results}  # fmt: skip
        args.out.write_text(json.dumps(record, indent=1, default=str))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
