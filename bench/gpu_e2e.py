"""End to end on an NVIDIA GPU: a BERT-base encoder compiled for the H100 profile, the torch backend.

Builds a BERT-base-sized encoder from its configuration (random weights: speed does not depend
on them), exports it, and builds three torch-backend engines from it:

- ``fp16``: the uncompressed model in fp16 (the baseline);
- ``int8``: every linear layer W8A8 (dense INT8, the strongest dense engine);
- ``compiled``: the plan the planner makes for ``--target`` from the profile's measured table
  (the fastest plan: no accuracy budget applies to random weights), the layers it puts on 2:4
  pruned 2:4, then exported and built, the build keeping a sparse kernel only where it measured
  faster on the layer's real input.

The three are timed interleaved (``measure_latency``, CUDA graphs on device buffers). Prints a
table, writes JSON. Run on the GPU:

    python bench/gpu_e2e.py --batch 32 --seq 128 --out results/gpu_e2e.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch


class Encoder(torch.nn.Module):
    """BERT-base (12 layers, hidden 768, FFN 3072) returning the last hidden state."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(num_hidden_layers=layers, attn_implementation="eager")
        self.bert = BertModel(config, add_pooling_layer=False)

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _qdq(fp32, layers, options, batches):
    from deploycomp.export.calibrate import calibrate
    from deploycomp.export.qdq import LayerQuant, activation_sites, insert_qdq

    quantized = [la for la in layers if options[la.name].activation != "fp32"]
    sites = activation_sites(fp32, {la.node for la in quantized})
    ranges = calibrate(fp32, sorted(set(sites.values())), batches, progress=False)
    plan = {}
    for la in layers:
        option = options[la.name]
        if option.is_fp32 or option.weight == "fp32":
            continue
        plan[la.node] = LayerQuant(la, option.activation, option.weight)
    return insert_qdq(fp32, plan, ranges)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--target", default="nvidia/h100")
    parser.add_argument("--runtime", default="compile", choices=("compile", "eager"))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_e2e: no CUDA GPU is visible; run this on an NVIDIA GPU.", file=sys.stderr)
        return 1

    from deploycomp.backends import BuildConfig, get_backend
    from deploycomp.export.onnx_export import export_fp32
    from deploycomp.hw.loader import load_profile
    from deploycomp.kernels.sparsity import apply_2_4
    from deploycomp.measure.latency import measure_latency
    from deploycomp.modelspec import ModelSpec
    from deploycomp.plan.inventory import build_inventory
    from deploycomp.plan.joint_planner import Budget, layer_options, plan_joint
    from deploycomp.plan.options import ACT_INT8, WEIGHT_INT8, Option

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    hw = load_profile(args.target)

    def batch(n: int) -> dict[str, np.ndarray]:
        return {
            "input_ids": rng.integers(0, 30522, (n, args.seq)).astype(np.int64),
            "attention_mask": np.ones((n, args.seq), dtype=np.int64),
        }

    calib = [batch(8) for _ in range(2)]
    test = batch(args.batch)
    root = Path(tempfile.mkdtemp(prefix="gpu-e2e-"))
    started = time.perf_counter()

    model = Encoder(args.layers).eval()
    spec = ModelSpec("bert-base", model, {k: v[:1] for k, v in test.items()}, calib)
    fp32 = export_fp32(spec, root / "fp32.onnx")
    layers = [la for la in build_inventory(fp32, {"batch": args.batch}) if la.kind == "linear"]

    # The plan: the fastest one for the torch backend on the target, from its measured table.
    offered = {la.name: layer_options(la, hw, "torch", unsigned_input=False)[0] for la in layers}
    sensitivity = {name: {o.key: 0.0 for o in opts} for name, opts in offered.items()}
    result = plan_joint(
        layers, hw, "torch", sensitivity=sensitivity, budget=Budget(), batch_size=args.batch,
        model_name="bert-base", seed=0,
    )  # fmt: skip
    chosen = {d.name: Option(d.weight, d.activation, d.sparsity) for d in result.plan.layers}
    int8 = {la.name: Option(WEIGHT_INT8, ACT_INT8) for la in layers}
    sparse_layers = {name for name, o in chosen.items() if o.sparsity == "2:4"}
    print(f"plan for {hw.id} (predicted {result.fp32_ms:.3f} -> {result.predicted_ms:.3f} ms): "
          + ", ".join(
        f"{k} x{v}" for k, v in sorted(
            {o.key: sum(1 for c in chosen.values() if c == o) for o in set(chosen.values())}
            .items())
    ))  # fmt: skip

    with torch.no_grad():  # prune the layers the plan puts on 2:4
        modules = dict(model.named_modules())
        for la in layers:
            if la.name in sparse_layers:
                module = modules[la.name]
                module.weight.copy_(apply_2_4(module.weight))
    pruned = export_fp32(spec, root / "pruned.onnx")
    pruned_layers = {
        la.name: la for la in build_inventory(pruned, {"batch": args.batch}) if la.kind == "linear"
    }
    paths = {"fp16": root / "fp32.onnx", "int8": root / "int8.onnx", "compiled": root / "plan.onnx"}
    onnx.save(_qdq(fp32, layers, int8, calib), paths["int8"])
    onnx.save(_qdq(pruned, list(pruned_layers.values()), chosen, calib), paths["compiled"])

    backend = get_backend("torch")
    sessions, engines = {}, {}
    for name, path in paths.items():
        config = BuildConfig(
            "fp32" if name == "fp16" else "compiled",
            device="cuda",
            extra={"batch_size": args.batch, "runtime": args.runtime,
                   "input_shapes": {k: list(v.shape) for k, v in test.items()}},
        )  # fmt: skip
        engines[name] = backend.build(path, root / f"engine-{name}", config)
        sessions[name] = backend.load(engines[name])
    outputs = {name: s.run(test)[0] for name, s in sessions.items()}
    measured = measure_latency(
        sessions, test, warmup_runs=5, block_runs=10, rounds=args.rounds, progress=False
    )
    stats = measured.stats
    layers_json = {
        name: json.loads((Path(e.path) / "layers.json").read_text())["layers"]
        for name, e in engines.items()
    }
    sparse_kept = sum(la["sparse"] for la in layers_json["compiled"])
    sparse_dense = sum(la["sparse_weights"] and not la["sparse"] for la in layers_json["compiled"])

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    rows = []
    base = stats["fp16"].median_ms
    for name in sessions:
        rows.append({
            "engine": name,
            "median_ms": stats[name].median_ms,
            "p90_ms": stats[name].p90_ms,
            "speedup_vs_fp16": base / stats[name].median_ms,
            "speedup_vs_int8": stats["int8"].median_ms / stats[name].median_ms,
            "rel_error_vs_fp16": rel(outputs[name], outputs["fp16"]),
        })  # fmt: skip
    print(
        f"\nBERT-base encoder, batch {args.batch} x {args.seq} tokens, "
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, runtime {args.runtime}"
    )
    print(f"{'engine':<10} {'median ms':>10} {'p90 ms':>8} {'vs fp16':>8} {'vs int8':>8} "
          f"{'rel err':>8}")  # fmt: skip
    for r in rows:
        print(f"{r['engine']:<10} {r['median_ms']:10.3f} {r['p90_ms']:8.3f} "
              f"{r['speedup_vs_fp16']:7.2f}x {r['speedup_vs_int8']:7.2f}x "
              f"{r['rel_error_vs_fp16']:8.4f}")  # fmt: skip
    print(f"compiled: {len(sparse_layers)} layers planned 2:4, {sparse_kept} run sparse kernels, "
          f"{sparse_dense} with 2:4 weights kept dense (measured faster at build)")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "batch": args.batch, "seq": args.seq, "layers": args.layers,
                     "target": hw.id, "runtime": args.runtime,
                     "date": datetime.datetime.now().isoformat(timespec="seconds"),
                     "seconds": round(time.perf_counter() - started, 1)},
            "rows": rows,
            "plan": {k: o.key for k, o in chosen.items()},
            "predicted_ms": {"fp16": result.fp32_ms, "compiled": result.predicted_ms},
            "engine_layers": layers_json,
        }, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
