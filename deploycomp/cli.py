"""The ``deploycomp`` command: a thin layer over :mod:`deploycomp.api`.

Subcommands: ``compile``, ``targets``, ``backends``, ``report``. A DeployCompError prints one line
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
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return sizes


def _cmd_compile(args: argparse.Namespace) -> int:
    from deploycomp.api import MeasureConfig, compile_model
    from deploycomp.report import render_markdown

    config = MeasureConfig(rounds=args.rounds, threads=args.threads, eval_limit=args.eval_limit)
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
    )
    print(render_markdown(report))
    _log(f"wrote {args.output}/report.md, report.html, report.json")
    return 0


def _cmd_targets(args: argparse.Namespace) -> int:
    from deploycomp.hw import list_profiles, resolve_target

    rows = [(p.id, p.kind, p.architecture, ",".join(p.backends), p.name) for p in list_profiles()]
    widths = [max(len(r[i]) for r in rows + [("id", "kind", "arch", "backends", "name")])
              for i in range(5)]
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deploycomp",
        description="Hardware-aware deployment compiler: plan, quantize, lower, measure, report.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
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
    c.set_defaults(func=_cmd_compile)
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
    args = parser.parse_args(argv)
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
