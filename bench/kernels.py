"""The Triton kernels of kernels/ against their PyTorch equivalents on a CUDA GPU.

INT4 weight-only GEMM (``int4_matmul``, fp16 activations, groups of ``--group-size``), for M in
``--rows`` and (K, N) from BERT-base (768x768, 768x3072, 3072x768) and a 7B-class LLM (4096x4096,
4096x11008), against: the reference path in PyTorch (unpack, dequantize to fp16, fp16 matmul), a
dense fp16 matmul with the unquantized weight (cuBLAS), and PyTorch's own INT4 kernel
(``torch._weight_int4pack_mm``, bf16 activations) where this PyTorch has a working one. Each call
reads a different copy of the weights, with enough copies to exceed twice the L2 cache, so weights
come from DRAM as in a model whose layers each run once per token.

Fused 2:4 mask + per-channel INT8 fake quantization (``fake_quant_2_4``, fp32 weights) against
its PyTorch reference (``mask_2_4`` then the fake quantizer), the same with a given mask (what
CompressedLinear's forward does: the mask is a buffer) against the unfused PyTorch ops, and the
forward + backward of a CompressedLinear's effective weight, fused against unfused.

Timing: CUDA events around blocks of calls (a block lasts about ``--block-ms``), variants
interleaved block by block in a rotating order, ``--repeats`` blocks each after a warm-up; the
median per-call time is reported. Relative errors are ``|y - ref| / |ref|`` against the fp32
reference. Prints the tables and writes one JSON file.

    python bench/kernels.py --out bench/results/kernels.json
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploycomp.artifacts import write_json_atomic
from deploycomp.compress.fake_quant import lsq_fake_quantize
from deploycomp.compress.modules import CompressedLinear
from deploycomp.kernels.int4 import dequantize_int4_groupwise, quantize_int4_groupwise, unpack_int4
from deploycomp.kernels.triton_fq24 import fake_quant_2_4, fake_quant_2_4_reference
from deploycomp.kernels.triton_int4 import int4_matmul, int4_matmul_reference, prepare_int4_weight
from deploycomp.measure import collect_environment

GEMM_SHAPES_KN = [(768, 768), (768, 3072), (3072, 768), (4096, 4096), (4096, 11008)]
FAKE_QUANT_SHAPES_NK = [(768, 768), (3072, 768), (4096, 4096), (11008, 4096)]
DEFAULT_L2_BYTES = 50 * 2**20
MAX_WEIGHT_COPIES = 512
WARMUP_CALLS = 3
# PyTorch's INT4 kernel is accepted as computing our weight when it is this close to the reference.
TORCH_INT4_MAX_ERROR = 2e-2


def _time_blocks(variants: dict[str, Callable[[int], Any]], repeats: int, block_ms: float):
    """Median ms per call of each variant, timed in interleaved blocks; ``fn(i)`` is call ``i``."""
    calls = {}
    for name, fn in variants.items():
        for i in range(WARMUP_CALLS):
            fn(i)
        torch.cuda.synchronize()
        calls[name] = max(1, math.ceil(block_ms / max(_block_ms(fn, WARMUP_CALLS), 1e-3)))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(_block_ms(variants[name], calls[name]))
    return {name: statistics.median(s) for name, s in samples.items()}, calls


def _block_ms(fn: Callable[[int], Any], calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(calls):
        fn(i)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def _relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def _copies(make: Callable[[], Any], size_bytes: int, l2_bytes: int) -> list[Any]:
    count = min(MAX_WEIGHT_COPIES, max(1, math.ceil(2 * l2_bytes / size_bytes)))
    return [make() for _ in range(count)]


# ---- INT4 GEMM ----------------------------------------------------------------------------------


def _dequantize_then_matmul(x, packed, scales, group_size):
    weight = dequantize_int4_groupwise(unpack_int4(packed, x.shape[1]), scales, group_size)
    return x @ weight.to(x.dtype).T


def _torch_int4_weights(q: torch.Tensor, scales: torch.Tensor, group_size: int, x_bf16):
    """PyTorch's tinygemm INT4 operands for our codes, or ``(None, why)``.

    tinygemm stores unsigned nibbles and dequantizes ``(u - 8) * scale + zero``, so ``u = q + 8``
    with zero 0 is our weight. Its packing changed between versions: each candidate is checked
    against the reference and the first that computes our weight is kept.
    """
    if not hasattr(torch, "_weight_int4pack_mm"):
        return None, "this PyTorch has no torch._weight_int4pack_mm"
    unsigned = (q.to(torch.int32) + 8).to(torch.uint8)
    scales_and_zeros = torch.stack([scales.T, torch.zeros_like(scales.T)], dim=-1)
    scales_and_zeros = scales_and_zeros.to(torch.bfloat16).contiguous()
    candidates = {
        "uint8 [N, K/2], even element in the high nibble": (unsigned[:, ::2] << 4)
        | unsigned[:, 1::2],
        "uint8 [N, K/2], even element in the low nibble": unsigned[:, ::2]
        | (unsigned[:, 1::2] << 4),
        "int32 [N, K]": unsigned.to(torch.int32),
    }
    ref = x_bf16.float() @ (q.float() * scales.float().repeat_interleave(group_size, 1)).T
    failures = []
    for layout, operand in candidates.items():
        try:
            packed = torch._convert_weight_to_int4pack(operand.contiguous(), 8)
            y = torch._weight_int4pack_mm(x_bf16, packed, group_size, scales_and_zeros)
            error = _relative_error(y, ref)
        except (RuntimeError, TypeError) as exc:
            failures.append(f"{layout}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            continue
        if error < TORCH_INT4_MAX_ERROR:
            return (packed, scales_and_zeros, layout), None
        failures.append(f"{layout}: relative error {error:.3g}")
    return None, "; ".join(failures)


def bench_int4_gemm(rows, group_size, repeats, block_ms, l2_bytes) -> list[dict[str, Any]]:
    results = []
    for k, n in GEMM_SHAPES_KN:
        results += _bench_gemm_shape(k, n, rows, group_size, repeats, block_ms, l2_bytes)
        torch.cuda.empty_cache()
    return results


def _bench_gemm_shape(k, n, rows, group_size, repeats, block_ms, l2_bytes) -> list[dict[str, Any]]:
    dense = torch.randn(n, k, device="cuda") / math.sqrt(k)
    q, scales32 = quantize_int4_groupwise(dense, group_size)
    packed, scales = prepare_int4_weight(dense, group_size, torch.float16)
    int4_bytes = packed.numel() + scales.numel() * scales.element_size()
    weights = {
        "int4": _copies(lambda: (packed.clone(), scales.clone()), int4_bytes, l2_bytes),
        "dense_fp16": _copies(dense.half, dense.numel() * 2, l2_bytes),
    }
    probe = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    torch_int4, torch_int4_note = _torch_int4_weights(q, scales32, group_size, probe)
    if torch_int4:
        operands = torch_int4[:2]
        weights["torch_int4"] = _copies(
            lambda: tuple(t.clone() for t in operands), int4_bytes, l2_bytes
        )
    results = []
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        variants = _gemm_variants(x, weights, group_size)
        with torch.no_grad():
            ref = int4_matmul_reference(x, packed, scales, group_size)
            errors = {
                "triton": _relative_error(variants["triton"](0), ref),
                "reference_fp16": _relative_error(variants["reference_fp16"](0), ref),
            }
            if torch_int4:
                ref_bf16 = int4_matmul_reference(x.to(torch.bfloat16), packed, scales, group_size)
                errors["torch_int4"] = _relative_error(variants["torch_int4"](0), ref_bf16)
            ms, calls = _time_blocks(variants, repeats, block_ms)
        row = {
            "m": m,
            "k": k,
            "n": n,
            "group_size": group_size,
            "ms": ms,
            "speedup_of_triton_over": {v: ms[v] / ms["triton"] for v in ms if v != "triton"},
            "relative_error": errors,
            "calls_per_block": calls,
            "weight_copies": {name: len(copies) for name, copies in weights.items()},
            "torch_int4": torch_int4[2] if torch_int4 else f"skipped: {torch_int4_note}",
        }
        results.append(row)
        print(_gemm_line(row), flush=True)
    return results


def _gemm_variants(x, weights, group_size) -> dict[str, Callable[[int], Any]]:
    """Call ``i`` of each variant, on weight copy ``i`` modulo the number of copies."""
    int4, dense = weights["int4"], weights["dense_fp16"]
    variants = {
        "triton": lambda i: int4_matmul(x, *int4[i % len(int4)], group_size),
        "reference_fp16": lambda i: _dequantize_then_matmul(x, *int4[i % len(int4)], group_size),
        "dense_fp16": lambda i: x @ dense[i % len(dense)].T,
    }
    if "torch_int4" in weights:
        tinygemm, x_bf16 = weights["torch_int4"], x.to(torch.bfloat16)

        def torch_int4(i: int) -> torch.Tensor:
            packed, scales_and_zeros = tinygemm[i % len(tinygemm)]
            return torch._weight_int4pack_mm(x_bf16, packed, group_size, scales_and_zeros)

        variants["torch_int4"] = torch_int4
    return variants


def _gemm_line(row: dict[str, Any]) -> str:
    ms, speedup = row["ms"], row["speedup_of_triton_over"]

    def cell(v: str) -> str:
        return f"{ms[v]:.4f} ({speedup[v]:.2f}x)" if v in ms else "-"

    return (
        f"| {row['m']} | {row['k']}x{row['n']} | {ms['triton']:.4f} | {cell('reference_fp16')} "
        f"| {cell('dense_fp16')} | {cell('torch_int4')} | {row['relative_error']['triton']:.2e} |"
    )


# ---- fused 2:4 mask + fake quantization ---------------------------------------------------------


def _unfused_given_mask(weight, mask, scale, qmax):
    kept = torch.where(mask, weight, weight.new_zeros(()))
    return lsq_fake_quantize(kept, scale[:, None], -qmax, qmax, 1.0)


def bench_fake_quant(repeats, block_ms) -> list[dict[str, Any]]:
    results = []
    for n, k in FAKE_QUANT_SHAPES_NK:
        results.append(_bench_fake_quant_shape(n, k, repeats, block_ms))
        print(_fake_quant_line(results[-1]), flush=True)
        torch.cuda.empty_cache()
    return results


def _bench_fake_quant_shape(n, k, repeats, block_ms, qmax=127) -> dict[str, Any]:
    layer = CompressedLinear(
        nn.Linear(k, n, device="cuda"), weight="int8_sym_per_channel", sparsity="2:4"
    )
    weight, mask, scale = layer.weight.detach(), layer.mask, layer.weight_quant.scale()
    grad = torch.randn(n, k, device="cuda")

    def train_step(fused: bool) -> None:
        layer.use_fused_kernel = fused
        layer.weight.grad = layer.weight_quant.step.grad = None
        layer.effective_weight().backward(grad)

    with torch.no_grad():
        got, got_mask = fake_quant_2_4(weight, scale, qmax)
        want, want_mask = fake_quant_2_4_reference(weight, scale, qmax)
        got_given, _ = fake_quant_2_4(weight, scale, qmax, mask)
        want_given = _unfused_given_mask(weight, mask, scale, qmax)
        variants = {
            "triton": lambda i: fake_quant_2_4(weight, scale, qmax),
            "reference": lambda i: fake_quant_2_4_reference(weight, scale, qmax),
            "triton_given_mask": lambda i: fake_quant_2_4(weight, scale, qmax, mask),
            "unfused_given_mask": lambda i: _unfused_given_mask(weight, mask, scale, qmax),
        }
        ms, calls = _time_blocks(variants, repeats, block_ms)
    train = {
        "fused_train_step": lambda i: train_step(True),
        "unfused_train_step": lambda i: train_step(False),
    }
    train_ms, train_calls = _time_blocks(train, repeats, block_ms)
    ms.update(train_ms)
    calls.update(train_calls)
    return {
        "n": n,
        "k": k,
        "qmax": qmax,
        "ms": ms,
        "speedup": {
            "triton_over_reference": ms["reference"] / ms["triton"],
            "given_mask": ms["unfused_given_mask"] / ms["triton_given_mask"],
            "train_step": ms["unfused_train_step"] / ms["fused_train_step"],
        },
        "mask_identical": bool(torch.equal(got_mask, want_mask)),
        "bit_identical": bool(torch.equal(got.view(torch.int32), want.view(torch.int32))),
        "bit_identical_given_mask": bool(
            torch.equal(got_given.view(torch.int32), want_given.view(torch.int32))
        ),
        "relative_error": _relative_error(got, want),
        "calls_per_block": calls,
    }


def _fake_quant_line(row: dict[str, Any]) -> str:
    ms, speedup = row["ms"], row["speedup"]
    return (
        f"| {row['n']}x{row['k']} | {ms['triton']:.4f} | {ms['reference']:.4f} "
        f"| {speedup['triton_over_reference']:.1f}x | {ms['triton_given_mask']:.4f} "
        f"| {ms['unfused_given_mask']:.4f} | {speedup['given_mask']:.1f}x "
        f"| {ms['fused_train_step']:.4f} | {ms['unfused_train_step']:.4f} "
        f"| {speedup['train_step']:.1f}x | {row['mask_identical'] and row['bit_identical']} |"
    )


# ---- driver -------------------------------------------------------------------------------------


def _device_record() -> dict[str, Any]:
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "l2_bytes": getattr(props, "L2_cache_size", None),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/kernels.json"))
    parser.add_argument("--rows", default="1,16,128,4096", help="M values of the INT4 GEMM")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7, help="timed blocks per variant")
    parser.add_argument("--block-ms", type=float, default=2.0, help="length of one timed block")
    parser.add_argument("--suites", default="int4,fake_quant")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU; none is visible", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    device = _device_record()
    l2_bytes = device["l2_bytes"] or DEFAULT_L2_BYTES
    suites = args.suites.split(",")
    record: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/kernels.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": device,
        "method": {
            "timer": "CUDA events around blocks of calls, variants interleaved in rotating order",
            "repeats": args.repeats,
            "block_ms": args.block_ms,
            "warmup_calls": WARMUP_CALLS,
            "statistic": "median ms per call",
            "int4_weights": "each call reads another copy; copies exceed twice the L2 cache",
            "fake_quant_weights": "one fp32 weight, back to back (L2-warm when it fits)",
        },
    }
    if "int4" in suites:
        print(f"\n## INT4 weight-only GEMM, fp16, group {args.group_size} ({device['gpu']})\n")
        print(
            "| M | KxN | triton ms | reference fp16 ms (triton x) | dense fp16 ms (triton x) "
            "| torch int4 ms (triton x) | rel err |\n|--:|---|--:|--:|--:|--:|--:|"
        )
        rows = [int(m) for m in args.rows.split(",")]
        record["int4_gemm"] = bench_int4_gemm(
            rows, args.group_size, args.repeats, args.block_ms, l2_bytes
        )
    if "fake_quant" in suites:
        print("\n## Fused 2:4 mask + INT8 per-channel fake quantization, fp32 weights\n")
        print(
            "| NxK | triton ms | reference ms | x | given mask: triton ms | unfused ms | x "
            "| train step: fused ms | unfused ms | x | exact |\n"
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"
        )
        record["fake_quant_2_4"] = bench_fake_quant(args.repeats, args.block_ms)
    record["environment"] = collect_environment()
    write_json_atomic(args.out, record)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
