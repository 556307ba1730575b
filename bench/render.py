"""Render the Markdown tables of BENCHMARKS.md from a bench/peers.py JSON result.

    .venv/bin/python bench/render.py bench/results/peers.json > tables.md
"""

from __future__ import annotations

import json
import sys


def _median(rows: list[dict], backend: str, engine: str, batch: int) -> float | None:
    return next((r["median_ms"] for r in rows if r["backend"] == backend
                 and r["engine"] == engine and r["batch_size"] == batch), None)


def render(result: dict) -> str:
    out = []
    for model in result["models"]:
        lat, acc = model["latency"], model["accuracy"]
        out += [f"\n### {model['model']}\n",
                "| engine | backend | batch | median ms | p90 ms | vs true fp32 | vs default precision |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for r in lat:
            fp32 = _median(lat, r["backend"], "fp32", r["batch_size"])
            default = _median(lat, r["backend"], "default_precision", r["batch_size"])
            vs_default = f"{default / r['median_ms']:.2f}x" if default else "-"
            out.append(f"| {r['engine']} | {r['backend']} | {r['batch_size']} | "
                       f"{r['median_ms']:.3f} | {r['p90_ms']:.3f} | {fp32 / r['median_ms']:.2f}x | "
                       f"{vs_default} |")
        loads = [f"{r['backend']} b{r['batch_size']}: {100 * r['machine_load']['other_cpu_fraction']:.0f}%"
                 f" ({r['machine_load']['attempts']} attempt(s))"
                 for r in lat if r["engine"] == "fp32" and r.get("machine_load")]
        out += ["", "Other processes' share of the CPUs while each group was timed: "
                + "; ".join(loads) + ".", "",
                "| engine | backend | eval set (samples) | task metric | top-1 agreement | cosine "
                "| finite |", "|---|---|---|---:|---:|---:|---|"]
        for a in acc:
            value = "-" if a["value"] is None else f"{100 * a['value']:.2f}%"
            if a["value"] is not None and a["num_samples"] <= 20:
                value += f" ({round(a['value'] * a['num_samples'])}/{a['num_samples']})"
            cosine = "-" if a["cosine"] is None else f"{a['cosine']:.4f}"
            out.append(f"| {a['engine']} | {a['backend']} | {a['eval_set']} ({a['num_samples']}) "
                       f"| {value} | {100 * a['top1_agreement']:.1f}% | {cosine} | {a['finite']} |")
        out += ["", "Targets:", ""]
        out += [f"- **{t['result']}** {t['target']}: {t['detail']}" for t in model["targets"]]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        sys.stdout.write(render(json.load(f)))
