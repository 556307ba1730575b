"""Which channels to prune: the group L2 norm against the output change of zeroing each channel.

For every prunable group of a zoo model and each kept fraction, the channels each ranking would
remove are zeroed (one group at a time, no training) and the KL divergence of the model's outputs
from the unpruned ones is measured on the calibration batches; with ``--agreement``, also the
top-1 agreement with the unpruned model on the first eval set. No engine is built: this measures
the ranking alone, the first thing a pruned model's accuracy depends on. Prints a table and
writes JSON:

    HF_HUB_OFFLINE=1 .venv/bin/python bench/prune_ranking.py --models efficientnet-lite0 \
        --out bench/results/prune_ranking.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import torch

from deploycomp import zoo
from deploycomp.hw import resolve_target
from deploycomp.prune import build_groups
from deploycomp.prune.apply import scale_units
from deploycomp.prune.train import (
    channel_multiple,
    drop_order,
    fixed_keep,
    measure_for_ranking,
    zeroed_kl,
)

RANKINGS = ("group_norm", "output_change")


def _forward(model: torch.nn.Module, inputs: tuple) -> torch.Tensor:
    out = model(*inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_model(name: str, keeps: list[float], agreement: bool) -> dict:
    spec = zoo.load(name)
    model = spec.model.eval()
    names = spec.input_names
    batches = [tuple(torch.from_numpy(b[n]) for n in names) for b in spec.calibration]
    eval_batches = (
        [tuple(torch.from_numpy(b[n]) for n in names) for b in spec.eval_sets[0].batches]
        if agreement else []
    )  # fmt: skip
    multiple = channel_multiple(resolve_target("auto").profile)
    groups = build_groups(model, batches[0]).prunable()
    energy, reference = measure_for_ranking(model, groups, batches, _forward)
    eval_reference = [_forward(model, b).argmax(-1) for b in eval_batches]
    rows = []
    for index, group in enumerate(groups):
        if not group.zero_invariant:
            continue
        orders = {"group_norm": drop_order(model, group),
                  "output_change": drop_order(model, group, energy)}  # fmt: skip
        for keep in sorted({fixed_keep(group, k, multiple) for k in keeps}, reverse=True):
            if keep == group.size:
                continue
            row = {"group": index, "first_member": group.slots[0].module, "size": group.size,
                   "keep": keep}  # fmt: skip
            for ranking, order in orders.items():
                units = order[: group.size - keep]
                row[f"kl_{ranking}"] = zeroed_kl(model, group, units, batches, _forward, reference)
                if eval_batches:
                    trial = copy.deepcopy(model)
                    scale_units(trial, group, units, 0.0)
                    same = [(_forward(trial, b).argmax(-1) == r).float().mean().item()
                            for b, r in zip(eval_batches, eval_reference)]  # fmt: skip
                    row[f"agreement_{ranking}"] = float(np.mean(same))
            rows.append(row)
    return {"model": name, "channel_multiple": multiple, "rows": rows}


def print_table(result: dict) -> None:
    print(f"\n{result['model']}: KL of the outputs with one group's channels zeroed, no training")
    print(f"{'group':>5} {'first member':<32} {'size':>5} {'keep':>5} "
          f"{'KL norm':>9} {'KL output':>9}")  # fmt: skip
    for r in result["rows"]:
        print(f"{r['group']:>5} {r['first_member']:<32} {r['size']:>5} {r['keep']:>5} "
              f"{r['kl_group_norm']:9.4f} {r['kl_output_change']:9.4f}")  # fmt: skip
    kl = {k: [r[f"kl_{k}"] for r in result["rows"]] for k in RANKINGS}
    better = sum(o < n for n, o in zip(kl["group_norm"], kl["output_change"]))
    best = [min(n, o) for n, o in zip(kl["group_norm"], kl["output_change"])]
    print(f"output change lower in {better} of {len(result['rows'])} cases; median KL "
          f"{np.median(kl['group_norm']):.4f} (norm), {np.median(kl['output_change']):.4f} "
          f"(output change), {np.median(best):.4f} (the lower of the two, what the planner keeps)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet-lite0")
    parser.add_argument("--keep", default="0.75,0.5", help="kept fractions to compare at")
    parser.add_argument("--agreement", action="store_true", help="also top-1 agreement")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    keeps = [float(k) for k in args.keep.split(",")]
    results = []
    for name in args.models.split(","):
        result = run_model(name, keeps, args.agreement)
        print_table(result)
        results.append(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv), "torch": torch.__version__,
                  "results": results}  # fmt: skip
        args.out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
