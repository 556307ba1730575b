"""The ``deploycomp`` command: a thin layer over :mod:`deploycomp.api`.

Subcommands: ``compile``, ``calibrate-target``, ``targets``, ``backends``, ``report``. A DeployCompError prints one line
and exits 1 (a traceback only with ``-v``).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import sys
import traceback
from collections.abc import Sequence

from deploycomp.errors import DeployCompError

MAX_BATCH = 65536  # a larger latency batch is a typo; the memory check refines this per model
SEED_MAX = 2**32 - 1  # numpy's seed range


def _log(message: str) -> None:
    print(f"deploycomp: {message}", file=sys.stderr, flush=True)


def _int_in(low: int, high: int | None = None, what: str = "an integer"):
    """An argparse type: an integer in [low, high], refused with the range otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"at least {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"expected {what} {bound}, got {text!r}")
        return value

    return parse


def _float_in(what: str, low: float, high: float = math.inf, *, open_low: bool = False):
    """An argparse type: a finite number in [low, high] (or (low, high]), refused otherwise."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        below = value <= low if open_low else value < low
        if not math.isfinite(value) or below or value > high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_float = _float_in("a positive finite number", 0.0, open_low=True)
_points = _float_in("points of the task metric from 0 to 100", 0.0, 100.0)


def _threads(text: str) -> int:
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return _int_in(0, allowed or 1, "a thread count (0: all this process may use)")(text)


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not sizes or any(not 1 <= s <= MAX_BATCH for s in sizes):
        raise argparse.ArgumentTypeError(
            f"batch sizes must be integers from 1 to {MAX_BATCH}, got {text!r}"
        )
    return sizes


def _compress_config(args: argparse.Namespace):
    """The CompressConfig the compile flags ask for, or None for post-training INT8."""
    from deploycomp.compress.config import CompressConfig
    from deploycomp.plan.joint_planner import Budget

    asked = (args.latency_target, args.size_target, args.max_accuracy_drop, args.steps, args.epochs)
    flags = (args.compare_sequential, args.mode, args.checkpoint_dir, args.no_resume)
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
        resume=not args.no_resume,
    )


def _cmd_compile(args: argparse.Namespace) -> int:
    from deploycomp.api import MeasureConfig
    from deploycomp.errors import AccuracyGuardError
    from deploycomp.measure.guard import DEFAULT_MAX_DROP_POINTS, AccuracyGuard
    from deploycomp.report import render_markdown

    config = MeasureConfig(rounds=args.rounds, threads=args.threads, eval_limit=args.eval_limit)
    compress = _compress_config(args)
    guard = None
    if not args.no_accuracy_guard:
        guard = AccuracyGuard(max_drop_points=args.max_accuracy_drop
                              if args.max_accuracy_drop is not None else DEFAULT_MAX_DROP_POINTS)
    try:
        report = _compile(args, config, compress, guard)
    except AccuracyGuardError as err:
        print(render_markdown(err.report))
        raise
    print(render_markdown(report))
    _log(f"wrote {args.output}/report.md, report.html, report.json")
    return 0


def _compile(args: argparse.Namespace, config, compress, guard) -> dict:
    from deploycomp.api import compile_model

    return compile_model(
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
        guard=guard,
    )


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
        value = float(text.removesuffix("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a fraction such as 0.5 or 50%, got {text!r}"
        ) from None
    if not (math.isfinite(value) and 0 < value <= 1):
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
    from deploycomp.rundir import require_run_dir

    require_run_dir(Path(args.run_dir))  # writes only into a run directory
    paths = write_report(args.run_dir)
    print(render_markdown(json.loads(Path(paths["json"]).read_text())))
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 1 like every other bad input (argparse's default is 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(1, f"deploycomp: error: {message}; see '{self.prog} --help'.\n")


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
    c.add_argument("--seed", type=_int_in(0, SEED_MAX, "a seed"), default=0)
    c.add_argument("--rounds", type=_int_in(1, 10_000, "a round count"), default=10,
                   help="interleaved latency rounds")
    c.add_argument("--threads", type=_threads, default=0, help="CPU threads (0: all allowed)")
    c.add_argument(
        "--no-accuracy-guard",
        action="store_true",
        help="exit 0 even when a compiled engine loses more than --max-accuracy-drop points "
        "(default 5) of a labelled set, or falls under cosine 0.9 with fp32 on an unlabelled one",
    )
    c.add_argument("--eval-limit", type=_int_in(1, what="a sample count"),
                   help="evaluate at most this many samples per set")
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
        type=_int_in(2, 10_000_000, "a step count"),
        help="training steps of pruning before post-training INT8 (1000; joint compression "
        "uses --steps/--epochs)",
    )
    p.add_argument(
        "--prune-lr",
        type=_positive_float,
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
        type=_points,
        help="points of the task metric the compressed model may lose; compression "
        "backs off the most sensitive layers until it holds",
    )
    j.add_argument("--epochs", type=_positive_float,
                   help="training passes over the model's data (1)")
    j.add_argument("--steps", type=_int_in(1, 10_000_000, "a step count"),
                   help="training steps (overrides --epochs)")
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
        "--no-resume",
        action="store_true",
        help="ignore the checkpoints in --checkpoint-dir and train afresh (they are overwritten)",
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
    k.add_argument("--batch-size", type=_int_in(1, MAX_BATCH, "a batch size"),
                   help="batch size to time (default: the model's first)")
    k.add_argument("--threads", type=_threads, default=0, help="CPU threads (0: all allowed)")
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


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so a run cleans up as on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminate(signum: int, frame) -> None:
    raise Terminated(signum)


def main(argv: Sequence[str] | None = None) -> int:
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)
    args = None
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as exc:  # usage errors and --help; user code's sys.exit is caught earlier
        return exc.code if isinstance(exc.code, int) else 1
    except DeployCompError as exc:
        if args is not None and args.verbose:
            traceback.print_exc()
        print(f"deploycomp: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        print(f"deploycomp: interrupted ({signal.Signals(signum).name}); nothing was written",
              file=sys.stderr)
        return 128 + signum
    except Exception as exc:  # noqa: BLE001 - anything else is a bug in deploycomp
        if args is not None and args.verbose:
            traceback.print_exc()
        first = (str(exc).splitlines() or [""])[0][:300]
        print(f"deploycomp: internal error: {type(exc).__name__}: {first}. This is a bug in "
              "deploycomp: rerun with -v for the traceback and report it.", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
