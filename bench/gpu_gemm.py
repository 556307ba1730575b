"""GEMM sweep on an NVIDIA GPU: what each compressed linear layer's GEMM costs, measured.

For every (M, K, N) of the zoo models and of BERT-base / ResNet-50 / 7B-decoder class models it
times, interleaved, on the same random inputs, the GEMM each kernel of the torch backend runs:
fp16 (cuBLAS), int8 (``torch._int_mm``, cuBLASLt, int32 out), 2:4 int8 (cuSPARSELt, per-channel
scale applied inside, fp16 out), 2:4 fp16 (cuSPARSELt) and INT4 weight-only (the project's Triton
dequantize-GEMM). The weights are prepared by the engine's own linear layer
(:class:`deploycomp.backends.onnx_torch.LinearOp`), so the compressed forms are the engine's.

These GEMM times are what the profile's ``[measured]`` entries (backend ``torch``) hold: in the
compiled engine the activation quantization and the dequantizing epilogue fuse into the
neighbouring elementwise kernels, so the GEMM is the part of a layer's cost that differs between
options. End-to-end timings (bench/gpu_e2e.py) check that reading.

    python bench/gpu_gemm.py --out results/gpu_gemm.json --entries-out results/entries.json

and turn the entries into the packaged profile anywhere (no GPU needed):

    python bench/gpu_gemm.py --write-profile results/entries.json \
        --profile-out hw_profiles/nvidia/h100.toml
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

from deploycomp.backends.torch_cuda import event_times_ms

# (K, N) per model family; M (rows = batch x tokens, or batch x pixels) is crossed with them.
SHAPES_KN = {
    "minilm": [(384, 384), (384, 1536), (1536, 384)],
    "bert-base": [(768, 768), (768, 2304), (768, 3072), (3072, 768)],
    "resnet50-1x1": [(256, 64), (64, 256), (512, 128), (1024, 256), (2048, 512), (512, 2048)],
    "decoder-7b": [(4096, 4096), (4096, 11008), (11008, 4096)],
}
ROWS = (128, 1024, 4096, 16384)
ROWS_QUICK = (128, 4096)
VARIANTS = ("fp16", "int8", "2:4 int8", "2:4 fp16", "int4 w-only")
# Variant -> (weight scheme, activation scheme, sparsity) of the profile's [measured] entries.
SCHEMES = {
    "fp16": ("fp16", "fp16", "none"),
    "2:4 fp16": ("fp16", "fp16", "2:4"),
    "int8": ("int8_sym_per_channel", "int8_sym_per_tensor", "none"),
    "2:4 int8": ("int8_sym_per_channel", "int8_sym_per_tensor", "2:4"),
    "int4 w-only": ("int4_sym_group128", "fp16", "none"),
}
KERNEL_OF = {  # the LinearOp kernel that prepares each variant's weights
    "fp16": "float",
    "2:4 fp16": "2:4 float",
    "int8": "int8",
    "2:4 int8": "2:4 int8",
    "int4 w-only": "int4",
}


def interleaved_ms(fns: dict[str, callable], rounds: int = 7, repeats: int = 10) -> dict:
    """Median ms of each callable: warm-up, then ``rounds`` rotating rounds of ``repeats``."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name] += event_times_ms(fns[name], repeats)
    return {name: statistics.median(t) for name, t in times.items()}


def _layers(m: int, k: int, n: int, group: int):
    """The engine's linear layer under each variant, on one random weight (2:4-pruned for the
    sparse variants), with its input."""
    from deploycomp.backends.onnx_torch import LinearOp
    from deploycomp.kernels.int4 import dequantize_int4_groupwise, quantize_int4_groupwise
    from deploycomp.kernels.sparsity import apply_2_4

    gen = torch.Generator(device="cuda").manual_seed(m * 7 + k * 3 + n)
    w = torch.randn(n, k, device="cuda", generator=gen) / k**0.5
    x = torch.randn(m, k, device="cuda", generator=gen).half()
    x_scale = float(x.abs().amax()) / 127
    layers = {}
    for variant in VARIANTS:
        dense = apply_2_4(w) if variant.startswith("2:4") else w
        if variant in ("fp16", "2:4 fp16"):
            op = LinearOp(variant, dense)
        elif variant in ("int8", "2:4 int8"):
            scale = dense.abs().amax(dim=1).clamp_min(1e-8) / 127
            wq = torch.round(dense / scale[:, None]).clamp(-127, 127).to(torch.int8)
            op = LinearOp(variant, wq.float() * scale[:, None], int8=(wq, scale),
                          act=(x_scale, 0, torch.int8))  # fmt: skip
        else:
            if k % group:
                continue
            q, s = quantize_int4_groupwise(dense.cpu(), group)
            weight = dequantize_int4_groupwise(q, s, group).cuda()
            op = LinearOp(variant, weight, int4=(q.cuda(), s.cuda(), group))
        kernel = KERNEL_OF[variant]
        if kernel not in op.candidates():
            continue
        op.use(kernel, torch.float16)
        layers[variant] = op
    return layers, x, w


def _raw_gemms(x: torch.Tensor, w: torch.Tensor, layers: dict) -> dict:
    """The GEMM calls alone, without quantization or epilogue."""
    w16 = w.half()
    fns = {"fp16": lambda: x @ w16.t()}
    if "int8" in layers:
        xq = torch.randint(-127, 127, x.shape, device="cuda", dtype=torch.int8)
        wq = layers["int8"].wq
        if x.shape[0] > 16:
            fns["int8"] = lambda: torch._int_mm(xq, wq.t())
        if "2:4 int8" in layers:
            op = layers["2:4 int8"]
            fns["2:4 int8"] = lambda: torch._cslt_sparse_mm(
                op.compressed, xq.t(), alpha=op.alpha, out_dtype=torch.float16
            )
    if "2:4 fp16" in layers:
        op16 = layers["2:4 fp16"]
        fns["2:4 fp16"] = lambda: torch._cslt_sparse_mm(op16.compressed, x.t())
    if "int4 w-only" in layers:
        op4 = layers["int4 w-only"]
        from deploycomp.kernels.triton_int4 import int4_matmul

        fns["int4 w-only"] = lambda: int4_matmul(x, op4.packed4, op4.scales4, op4.int4_group)
    return fns


def sweep(rows, families, group: int) -> list[dict]:
    results = []
    for family in families:
        for k, n in SHAPES_KN[family]:
            for m in rows:
                with torch.no_grad():
                    layers, x, w = _layers(m, k, n, group)
                    gemm_ms = interleaved_ms(_raw_gemms(x, w, layers))
                row = {"family": family, "m": m, "k": k, "n": n, "gemm_ms": gemm_ms}
                results.append(row)
                print(_row_text(row), flush=True)
    return results


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:6.2f}x" if a and b else "      -"


def _row_text(row: dict) -> str:
    g = row["gemm_ms"]
    return (
        f"{row['family']:<13} {row['m']:>6} {row['k']:>6} {row['n']:>6} | "
        + " ".join(f"{g.get(v, float('nan')):11.4f}" for v in VARIANTS)
        + f" | {_ratio(g.get('int8'), g.get('2:4 int8'))} {_ratio(g.get('fp16'), g.get('int8'))}"
        + f" {_ratio(g.get('fp16'), g.get('2:4 fp16'))} {_ratio(g.get('fp16'), g.get('int4 w-only'))}"
    )


HEADER = (
    f"{'family':<13} {'M':>6} {'K':>6} {'N':>6} | "
    + " ".join(f"{v + ' ms':>11}" for v in VARIANTS)
    + " | int8/2:4i8 fp16/int8 fp16/2:4 fp16/int4"
)


def entries(results: list[dict], device: str, version: str) -> list[dict]:
    """The layer timings as ``MeasuredEntry`` fields (backend ``torch``, op kind ``linear``)."""
    today = datetime.date.today().isoformat()
    out = []
    for row in results:
        for variant, ms in row["gemm_ms"].items():
            weight, act, sparsity = SCHEMES[variant]
            out.append({"device": device, "backend": "torch", "backend_version": version, "date": today,
                            "op_kind": "linear", "shape": [row["m"], row["k"], row["n"]],
                            "weight_scheme": weight, "activation_scheme": act, "sparsity": sparsity,
                            "latency_ms": round(ms, 6)})  # fmt: skip
    return out


def write_profile(entries_path: Path, out: Path, base: str) -> None:
    from deploycomp.hw.loader import load_profile
    from deploycomp.hw.measured_toml import write_measured_profile
    from deploycomp.hw.profile import MeasuredEntry

    rows = json.loads(entries_path.read_text())
    measured = [MeasuredEntry(**{**r, "shape": tuple(r["shape"])}) for r in rows]
    path = write_measured_profile(load_profile(base), measured, out)
    print(f"wrote {len(measured)} measured entries into {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="JSON with every timing")
    parser.add_argument("--entries-out", type=Path, help="JSON of [measured] entries")
    parser.add_argument("--families", default=",".join(SHAPES_KN))
    parser.add_argument("--quick", action="store_true", help=f"rows {ROWS_QUICK} only")
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--write-profile", type=Path, help="entries JSON to write into a profile")
    parser.add_argument("--profile-out", type=Path)
    parser.add_argument("--base", default="nvidia/h100")
    args = parser.parse_args(argv)
    if args.write_profile:
        if not args.profile_out:
            parser.error("--write-profile needs --profile-out")
        write_profile(args.write_profile, args.profile_out, args.base)
        return 0
    if not torch.cuda.is_available():
        print("gpu_gemm: no CUDA GPU is visible; run this on an NVIDIA GPU.", file=sys.stderr)
        return 1
    device = torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}, cuda {torch.version.cuda}")
    print(HEADER)
    rows = ROWS_QUICK if args.quick else ROWS
    results = sweep(rows, args.families.split(","), args.group)
    meta = {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    if args.entries_out:
        args.entries_out.parent.mkdir(parents=True, exist_ok=True)
        args.entries_out.write_text(
            json.dumps(entries(results, device, torch.__version__), indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
