"""The ``deploycomp`` command: a thin layer over :mod:`deploycomp.api`.

Subcommands: ``compile``, ``calibrate-target``, ``targets``, ``backends``, ``report``. A DeployCompError prints one line
and exits 1 (a traceback only with ``-v``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import traceback
from collections.abc import Sequence

from deploycomp.errors import DeployCompError


def _log(message: str) -> None:
    print(f"deploycomp: {message}", file=sys.stderr, flush=True)


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return sizes


def _compress_config(args: argparse.Namespace):
    """The CompressConfig the compile flags ask for, or None for post-training INT8."""
    from deploycomp.compress.config import CompressConfig
    from deploycomp.plan.joint_planner import Budget

    asked = (args.latency_target, args.size_target, args.max_accuracy_drop, args.steps, args.epochs)
    flags = (args.compare_sequential, args.mode, args.checkpoint_dir)
    if all(a is None for a in asked) and not any(flags):
        return None
    budget = Budget(
        latency_target=args.latency_target,
        size_target=args.size_target,
        max_accuracy_drop=args.max_accuracy_drop,
    )
    return CompressConfig(
        budget=budget,
        epochs=args.epochs if args.epochs is not None else 1.0,
        steps=args.steps,
        mode=args.mode or "joint",
        compare_sequential=args.compare_sequential,
        measure_options=not args.no_measure_options,
        checkpoint_dir=args.checkpoint_dir,
    )


def _cmd_compile(args: argparse.Namespace) -> int:
    from deploycomp.api import MeasureConfig, compile_model
    from deploycomp.report import render_markdown

    config = MeasureConfig(rounds=args.rounds, threads=args.threads, eval_limit=args.eval_limit)
    compress = _compress_config(args)
    report = compile_model(
        args.model,
        target=args.target,
        backends=args.backend,
        out_dir=args.output,
        data=args.data,
        batch_sizes=args.batch_sizes,
        seed=args.seed,
        measure_config=config,
        log=_log,
        progress=sys.stderr.isatty(),
        command=shlex.join(["deploycomp", *sys.argv[1:]]),
        compress=compress,
        prune=args.prune,
        prune_steps=args.prune_steps,
        prune_lr=args.prune_lr,
    )
    print(render_markdown(report))
    _log(f"wrote {args.output}/report.md, report.html, report.json")
    return 0


def _cmd_calibrate_target(args: argparse.Namespace) -> int:
    from deploycomp.hw.sweep import calibrate_target

    path = calibrate_target(
        args.target,
        args.model,
        args.output,
        backends=args.backend,
        batch_size=args.batch_size,
        threads=args.threads,
        progress=sys.stderr.isatty(),
        log=_log,
    )
    _log(f"wrote {path}; compile with --target {path}")
    return 0


def _prune_amount(text: str) -> float | str:
    return "auto" if text.strip().lower() == "auto" else _fraction(text)


def _fraction(text: str) -> float:
    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a fraction such as 0.5 or 50%, got {text!r}"
        ) from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def _cmd_targets(args: argparse.Namespace) -> int:
    from deploycomp.hw import list_profiles, resolve_target

    rows = [(p.id, p.kind, p.architecture, ",".join(p.backends), p.name) for p in list_profiles()]
    widths = [
        max(len(r[i]) for r in rows + [("id", "kind", "arch", "backends", "name")])
        for i in range(5)
    ]
    for row in [("id", "kind", "arch", "backends", "name"), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    auto = resolve_target("auto")
    print(f"\nauto -> {auto.profile.id}: {auto.reason}")
    return 0


def _cmd_backends(args: argparse.Namespace) -> int:
    from deploycomp.backends import availability_table

    for name, avail in availability_table():
        state = f"available {avail.version}".strip() if avail.available else "unavailable"
        print(f"{name:12s} {state:24s} {avail.reason}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from deploycomp.report import render_markdown, write_report

    paths = write_report(args.run_dir)
    print(render_markdown(json.loads(Path(paths["json"]).read_text())))
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 1 like every other bad input (argparse's default is 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="deploycomp",
        description="Hardware-aware deployment compiler: plan, quantize, lower, measure, report.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    c = sub.add_parser("compile", help="compile a model for a target and report")
    c.add_argument("model", help="zoo name, file.py:function, package.module:function or .onnx")
    c.add_argument("--target", default="auto", help="hardware profile id, .toml path or 'auto'")
    c.add_argument("--backend", action="append", help="backend to build (repeatable)")
    c.add_argument("-o", "--output", default="deploycomp-out", help="run directory")
    c.add_argument("--data", help=".npz of real inputs (needed for an .onnx model)")
    c.add_argument("--batch-sizes", type=_batch_sizes, help="latency batch sizes, e.g. 1,64")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--rounds", type=int, default=10, help="interleaved latency rounds")
    c.add_argument("--threads", type=int, default=0, help="CPU threads (0: all allowed)")
    c.add_argument("--eval-limit", type=int, help="evaluate at most this many samples per set")
    p = c.add_argument_group(
        "structured pruning (a torch model): remove whole channels, heads and FFN neurons. With "
        "a joint compression budget the units are trained to zero inside the joint loop, with "
        "the quantizers; alone, pruning is trained with distillation before post-training INT8"
    )
    p.add_argument(
        "--prune",
        type=_prune_amount,
        metavar="KEEP|auto",
        help="keep this fraction of every prunable channel group (e.g. 50%%), or 'auto': per "
        "group amounts chosen to meet --latency-target",
    )
    p.add_argument(
        "--prune-steps",
        type=int,
        help="training steps of pruning before post-training INT8 (1000; joint compression "
        "uses --steps/--epochs)",
    )
    p.add_argument(
        "--prune-lr",
        type=float,
        help="AdamW learning rate of pruning before post-training INT8 (1e-3; pretrained "
        "transformers want about 5e-5)",
    )
    j = c.add_argument_group(
        "joint compression (2:4 sparsity + INT8/INT4, planned from the target, trained with "
        "distillation; any of these turns it on)"
    )
    j.add_argument(
        "--latency-target",
        type=_fraction,
        help="predicted latency as a fraction of the fp32 model's, e.g. 0.4",
    )
    j.add_argument(
        "--size-target",
        type=_fraction,
        help="weight bytes as a fraction of the fp32 model's, e.g. 0.2",
    )
    j.add_argument(
        "--max-accuracy-drop",
        type=float,
        help="points of the task metric the compressed model may lose; compression "
        "backs off the most sensitive layers until it holds",
    )
    j.add_argument("--epochs", type=float, help="training passes over the model's data (1)")
    j.add_argument("--steps", type=int, help="training steps (overrides --epochs)")
    j.add_argument(
        "--mode",
        choices=("joint", "sequential"),
        help="train masks and quantizers together (joint, default) or prune then "
        "quantize (sequential)",
    )
    j.add_argument(
        "--checkpoint-dir",
        help="write training checkpoints here (every 50 steps); a later compile of the same "
        "model, target and budget resumes from them",
    )
    j.add_argument(
        "--no-measure-options",
        action="store_true",
        help="plan from the profile's numbers only; by default, when the target is this machine, "
        "each layer option is timed here first",
    )
    j.add_argument(
        "--compare-sequential",
        action="store_true",
        help="also train the other mode on the same plan and steps, and report both",
    )
    c.set_defaults(func=_cmd_compile)
    k = sub.add_parser(
        "calibrate-target",
        help="time each layer option of a model on this machine's backends and "
        "write a profile with the measured numbers",
    )
    k.add_argument("model", help="zoo name or file.py:function (its layer shapes are timed)")
    k.add_argument("--target", default="auto", help="the profile to start from")
    k.add_argument("--backend", action="append", help="backend to time (repeatable)")
    k.add_argument("--batch-size", type=int, help="batch size to time (default: the model's first)")
    k.add_argument("--threads", type=int, default=0, help="CPU threads (0: all allowed)")
    k.add_argument("-o", "--output", required=True, help="the .toml profile to write")
    k.set_defaults(func=_cmd_calibrate_target)
    t = sub.add_parser("targets", help="list hardware profiles and what 'auto' picks here")
    t.set_defaults(func=_cmd_targets)
    b = sub.add_parser("backends", help="which backends can run here, and why not")
    b.set_defaults(func=_cmd_backends)
    r = sub.add_parser("report", help="re-render the report of a run directory")
    r.add_argument("run_dir")
    r.set_defaults(func=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors and --help
        return int(exc.code or 0)
    try:
        return args.func(args)
    except DeployCompError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"deploycomp: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("deploycomp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
