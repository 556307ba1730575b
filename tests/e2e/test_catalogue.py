"""The catalogue of bad input, end to end through the command line: every case exits with the
expected code and one line holding a phrase that says what was wrong, prints no traceback, and
leaves nothing on disk (no output directory, no hidden partial folder, the user's files as they
were). Each case builds its input in a fresh directory and runs ``deploycomp`` there."""

from __future__ import annotations

import hashlib
import os
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploycomp.cli import main

QUICK = ["--rounds", "1", "--eval-limit", "64", "--batch-sizes", "1", "--backend", "onnxruntime"]
A100 = Path(__file__).resolve().parents[2] / "hw_profiles" / "nvidia" / "a100.toml"

ENTRYPOINTS = textwrap.dedent('''
    import sys

    import numpy as np
    import torch
    import deploycomp

    X = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)

    class Dict(torch.nn.Module):
        def forward(self, x):
            return {"logits": x}

    def spec(**changes):
        torch.manual_seed(0)
        value = {"model": torch.nn.Linear(4, 3).eval(), "example_inputs": {"input": X[:1]},
                 "calibration": [{"input": X[:32]}],
                 "eval_sets": [deploycomp.EvalSet("held", [{"input": X[32:]}],
                                                  np.arange(32) % 3)]}
        value.update(changes)
        return value

    def returns_dict():
        return spec(model=Dict())

    def float64_batch():
        return spec(calibration=[{"input": X[:16]}, {"input": X[16:32].astype(np.float64)}])

    def eval_sets_none():
        return spec(eval_sets=None, batch_sizes="1,64")

    def no_example_samples():
        return spec(example_inputs={"input": X[:0]})

    def no_calibration_samples():
        return spec(calibration=[{"input": X[:0]}])

    def batch_size_zero():
        return spec(batch_sizes=(0,))

    def batch_sizes_string():
        return spec(batch_sizes="1,64")

    def labels_out_of_range():
        return spec(eval_sets=[deploycomp.EvalSet("held", [{"input": X[32:]}],
                                                  np.full(32, 7))])

    def labels_not_integers():
        return spec(eval_sets=[deploycomp.EvalSet("held", [{"input": X[32:]}],
                                                  np.full(32, 1.5))])

    def calls_exit():
        sys.exit(3)

    def nan_calibration():
        x = X.copy()
        x[3, 1] = np.nan
        return spec(calibration=[{"input": x[:32]}])
''')


def _linear_onnx(path: Path, outputs: int = 1, bad_node: bool = False) -> None:
    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])]
    if outputs == 2:
        nodes.append(helper.make_node("Relu", ["y"], ["z"]))
        outs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 3]))
    if bad_node:
        nodes.append(helper.make_node("MatMul", ["y"], ["z"]))  # one input short
        outs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 3])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])], outs,
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def _npz(**arrays) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        _linear_onnx(folder / "m.onnx")
        np.savez(folder / "d.npz", **arrays)

    return make


def _profile(old: str, new: str) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        text = A100.read_text()
        assert old in text, old
        (folder / "p.toml").write_text(text.replace(old, new, 1))

    return make


def _entry(folder: Path) -> None:
    (folder / "user.py").write_text(ENTRYPOINTS)


def _file(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(data)


def _corrupt_checkpoint(folder: Path) -> None:
    """A real checkpoint of a short training, then its plan file cut short as a crash would."""
    args = [*CHECKPOINTED, "-o", str(folder / "first")]
    assert main(args) == 0
    (plan,) = (folder / "ckpt").glob("*-plan.json")
    plan.write_text(plan.read_text()[:40])


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    phrase: str
    setup: Callable[[Path], None] | None = None
    code: int = 1
    absent: str = ""  # a phrase the message must not hold


X = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
ONNX = ("compile", "m.onnx", "--data", "d.npz", *QUICK)
ZOO = ("compile", "fmnist-cnn", *QUICK)
CHECKPOINTED = (*ZOO, "--steps", "2", "--no-measure-options", "--no-accuracy-guard",
                "--checkpoint-dir", "ckpt")
CASES = [
    # hardware profiles
    Case("profile-not-utf8", ("compile", "fmnist-cnn", "--target", "p.toml"), "not UTF-8",
         lambda f: (f / "p.toml").write_bytes(A100.read_bytes().replace(b"A100", b"A100 \xe9"))),
    Case("profile-nan-bandwidth", ("compile", "fmnist-cnn", "--target", "p.toml"),
         "bandwidth_gbs", _profile("bandwidth_gbs = ", "bandwidth_gbs = nan #")),
    Case("profile-absurd-cores", ("compile", "fmnist-cnn", "--target", "p.toml"), "from 1 to",
         _profile("sm_count = ", "sm_count = 100000000000 #")),
    Case("profile-huge-peak", ("compile", "fmnist-cnn", "--target", "p.toml"), "TOPS",
         _profile("int8 = { dense = 624,", "int8 = { dense = 1e300,")),
    Case("profile-tiny-peak", ("compile", "fmnist-cnn", "--target", "p.toml"), "TOPS",
         _profile("int8 = { dense = 624,", "int8 = { dense = 1e-300,")),
    Case("target-without-vendor", ("compile", "fmnist-cnn", "--target", "a100"), "nvidia/a100"),
    # entrypoints
    Case("returns-dict", ("compile", "user.py:returns_dict", *QUICK), "one tensor", _entry),
    Case("float64-batch", ("compile", "user.py:float64_batch", *QUICK), "float64", _entry),
    Case("eval-sets-none-and-string-batches", ("compile", "user.py:eval_sets_none", *QUICK),
         "batch_sizes", _entry),
    Case("zero-example-samples", ("compile", "user.py:no_example_samples", *QUICK), "0 samples",
         _entry),
    Case("zero-calibration-samples", ("compile", "user.py:no_calibration_samples", *QUICK),
         "0 samples", _entry),
    Case("batch-size-zero", ("compile", "user.py:batch_size_zero", *QUICK), "batch_sizes",
         _entry),
    Case("batch-sizes-string", ("compile", "user.py:batch_sizes_string", *QUICK), "batch_sizes",
         _entry),
    Case("labels-out-of-range", ("compile", "user.py:labels_out_of_range", *QUICK), "7", _entry),
    Case("labels-not-integers", ("compile", "user.py:labels_not_integers", *QUICK), "integer",
         _entry),
    Case("user-code-calls-exit", ("compile", "user.py:calls_exit", *QUICK), "sys.exit", _entry),
    Case("nan-calibration", ("compile", "user.py:nan_calibration", *QUICK), "NaN", _entry),
    # an ONNX model with --data
    Case("npz-wrong-shape", ONNX, "shape", _npz(x=X[:, :3])),
    Case("npz-wrong-rank", ONNX, "shape", _npz(x=X[:, :, None])),
    Case("npz-wrong-dtype", ONNX, "dtype", _npz(x=X.astype(np.complex64))),
    Case("npz-scalar", ONNX, "scalar", _npz(x=np.float32(1.0))),
    Case("npz-zero-samples", ONNX, "0 samples", _npz(x=X[:0])),
    Case("npz-labels-length", ONNX, "labels", _npz(x=X, labels=np.zeros(5, np.int64))),
    Case("onnx-two-outputs", ONNX, "output", lambda f: (_linear_onnx(f / "m.onnx", outputs=2),
                                                        np.savez(f / "d.npz", x=X))),
    Case("onnx-invalid-node", ONNX, "m.onnx", lambda f: (_linear_onnx(f / "m.onnx", bad_node=True),
                                                         np.savez(f / "d.npz", x=X))),
    # flags, refused before any work
    Case("seed-negative", (*ZOO, "--seed", "-1"), "--seed"),
    Case("prune-lr-negative", (*ZOO, "--prune", "50%", "--prune-lr", "-1"), "--prune-lr"),
    Case("prune-steps-zero", (*ZOO, "--prune", "50%", "--prune-steps", "0"), "--prune-steps"),
    Case("rounds-zero", ("compile", "fmnist-cnn", "--rounds", "0"), "--rounds"),
    Case("threads-too-many", (*ZOO, "--threads", "999"), "--threads"),
    Case("eval-limit-zero", (*ZOO, "--eval-limit", "0"), "--eval-limit"),
    Case("batch-sizes-huge", ("compile", "fmnist-cnn", "--batch-sizes", "100000000"),
         "--batch-sizes"),
    Case("batch-size-past-memory", ("compile", "fmnist-cnn", "--batch-sizes", "65536"),
         "available"),
    Case("latency-target-double-percent", (*ZOO, "--latency-target", "50%%"), "--latency-target"),
    Case("max-accuracy-drop-nan", (*ZOO, "--max-accuracy-drop", "nan"), "--max-accuracy-drop"),
    Case("tensorrt-on-a-cpu", ("compile", "fmnist-cnn", "--backend", "tensorrt"), "tensorrt",
         absent="pip install onnxruntime"),
    # checkpoints
    Case("checkpoint-dir-is-a-file", (*ZOO, "--steps", "2", "--checkpoint-dir", "ckpt"),
         "--checkpoint-dir", _file("ckpt", b"not a folder")),
    Case("checkpoint-plan-corrupt", CHECKPOINTED, "--no-resume", _corrupt_checkpoint),
    Case("calibrate-target-unwritable", ("calibrate-target", "fmnist-cnn", "-o",
                                         "afile/p.toml"), "afile", _file("afile", b"x")),
    Case("calibrate-target-overwrites-a-user-file",
         ("calibrate-target", "fmnist-cnn", "-o", "mine.toml"), "not written by",
         _file("mine.toml", b"[my]\nnotes = 1\n")),
    # output directories
    Case("stray-run-json", (*ZOO, "-o", "x"), "not a deploycomp run",
         lambda f: ((f / "x").mkdir(), (f / "x" / "run.json").write_text("{}"),
                    (f / "x" / "thesis.tex").write_text("work"))),
    Case("output-is-cwd", (*ZOO, "-o", "."), "current directory"),
    Case("output-is-ancestor", (*ZOO, "-o", ".."), "pass -o with a new directory"),
    Case("output-is-root", (*ZOO, "-o", "/"), "root directory"),
    Case("output-through-symlink", (*ZOO, "-o", "link"), "symbolic link",
         lambda f: ((f / "real").mkdir(), (f / "link").symlink_to(f / "real"))),
    Case("output-under-a-file", (*ZOO, "-o", "afile/out"), "is a file", _file("afile", b"x")),
    Case("report-of-a-non-run", ("report", "notes"), "not a deploycomp run directory",
         lambda f: ((f / "notes").mkdir(), (f / "notes" / "run.json").write_text("{}"))),
]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` (symlinks not followed) with a digest of each file."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            out[rel] = (hashlib.sha256(path.read_bytes()).hexdigest()
                        if path.is_file() and not path.is_symlink() else "")
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_one_line_and_touches_nothing(case, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path))
    if case.setup is not None:
        case.setup(work)
    capsys.readouterr()
    before = _snapshot(work)
    code = main(list(case.args))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == case.code, err
    assert "Traceback" not in err and len(errors) == 1, err
    assert errors[0] == err.strip().splitlines()[-1], err
    assert case.phrase in errors[0], errors[0]
    assert not case.absent or case.absent not in errors[0], errors[0]
    assert _snapshot(work) == before  # nothing written, nothing deleted, nothing left


def test_an_unexpected_exception_is_one_internal_error_line(capsys, monkeypatch):
    from deploycomp import cli

    def broken(args):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(cli, "_cmd_targets", broken)
    assert main(["targets"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "internal error: ZeroDivisionError" in err
    assert "-v" in err and "report" in err


def test_an_unreachable_target_is_refused_before_options_are_scored(capsys, tmp_path):
    # fmnist-cnn at batch 1 on an A100: the fastest plan reaches 0.93 of fp32's predicted latency.
    code = main(["compile", "fmnist-cnn", "--target", "nvidia/a100", "--latency-target", "0.5",
                 "--batch-sizes", "1", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "cannot be met" in err.strip().splitlines()[-1]
    assert not any(line.startswith(("deploycomp: score", "deploycomp: train"))
                   for line in err.splitlines()), err
    assert list(tmp_path.iterdir()) == []
