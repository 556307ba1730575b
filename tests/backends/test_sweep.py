"""The on-target sweep on a tiny model, on the real backends, and the profile it writes."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import importlib.resources
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from deploycomp.errors import DeployCompError, OutputDirError, ProfileError
from deploycomp.hw import describe_host, load_profile
from deploycomp.hw.measured_toml import HEADER_MARK, write_measured_profile
from deploycomp.hw.profile import MeasuredEntry
from deploycomp.hw.sweep import calibrate_target, options_to_time, sweep
from deploycomp.modelspec import ModelSpec

BASE = "intel/xeon-icx"
BATCH, TOKENS, VOCAB = 4, 8, 1000
ROWS = BATCH * TOKENS
# Shape keys of the tiny model at batch 4: (rows, reduction, outputs) for linear layers,
# (rows gathered, vocabulary, row length) for the embedding.
SHAPES = {
    ("embedding", (ROWS, VOCAB, 128)),
    ("linear", (ROWS, 128, 256)),
    ("linear", (ROWS, 256, 128)),
}
BACKENDS = [
    "onnxruntime",
    pytest.param(
        "openvino",
        marks=[
            pytest.mark.openvino,
            pytest.mark.skipif(
                importlib.util.find_spec("openvino") is None,
                reason="openvino is not installed: pip install openvino",
            ),
        ],
    ),
]


def _tiny_spec() -> ModelSpec:
    """Embedding -> Linear -> ReLU -> Linear on 8 tokens."""
    torch.manual_seed(0)

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, 128)
            self.mlp = torch.nn.Sequential(
                torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128)
            )

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.mlp(self.embed(ids))

    ids = np.random.default_rng(0).integers(0, VOCAB, size=(BATCH, TOKENS), dtype=np.int64)
    return ModelSpec("tiny", Tiny().eval(), {"ids": ids}, [{"ids": ids}], batch_sizes=(BATCH,))


def _entry(**changes) -> MeasuredEntry:
    entry = MeasuredEntry(
        device="Test CPU, 2 cores, avx512_vnni",
        backend="onnxruntime",
        backend_version="1.0",
        date="2025-01-31",
        op_kind="linear",
        shape=(64, 384, 384),
        weight_scheme="int8_sym_per_channel",
        activation_scheme="int8_sym_per_tensor",
        sparsity="none",
        latency_ms=0.125,
    )
    return dataclasses.replace(entry, **changes)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("backend", BACKENDS)
def test_calibrate_target_times_every_shape_and_option(backend, tmp_path):
    out = tmp_path / "my-cpu.toml"
    messages: list[str] = []
    path = calibrate_target(
        BASE, _tiny_spec(), out, backends=[backend], progress=False, log=messages.append
    )

    assert path == out
    assert _files(tmp_path) == ["my-cpu.toml"]  # no temporary file left beside it
    base = load_profile(BASE)
    written = load_profile(out)
    linear = options_to_time(base, backend, "linear")
    assert {o.key for o in linear} >= {"fp32", "int8", "int8/u8", "int4 w-only"}
    assert {o.key for o in options_to_time(base, backend, "embedding")} >= {"fp32", "int4 w-only"}
    expected = {
        (backend, kind, shape, o.weight, o.activation, o.sparsity)
        for kind, shape in SHAPES
        for o in options_to_time(base, backend, kind)
    }
    found = [
        (e.backend, e.op_kind, e.shape, e.weight_scheme, e.activation_scheme, e.sparsity)
        for e in written.measured
    ]
    assert sorted(found) == sorted(expected), messages
    for entry in written.measured:
        assert math.isfinite(entry.latency_ms) and entry.latency_ms > 0
        assert entry.device == describe_host()
        assert entry.backend_version == importlib.metadata.version(backend)
        assert entry.date == datetime.date.today().isoformat()
    # Everything but the measured table is the base profile's.
    assert dataclasses.replace(written, id=base.id, source=base.source, measured=()) == base
    first = out.read_text().splitlines()[0]
    assert first.startswith(HEADER_MARK) and describe_host() in first
    assert datetime.date.today().isoformat() in first


def test_written_profile_round_trips_and_merges(tmp_path):
    base = load_profile(BASE)
    entries = [
        _entry(),
        _entry(weight_scheme="int4_sym_group128", activation_scheme="fp32", latency_ms=2.5e-05),
        _entry(backend="openvino", device='CPU "quoted" \\ name', shape=(1, 384, 3)),
    ]
    first = write_measured_profile(base, entries, tmp_path / "a.toml")
    loaded = load_profile(first)
    assert loaded.measured == tuple(entries)
    assert dataclasses.replace(loaded, id=base.id, source=base.source, measured=()) == base

    # Writing on top of an earlier output: same device and key replaced, other keys of the same
    # device kept, other devices dropped; the earlier header is not repeated.
    newer = [_entry(latency_ms=0.5), _entry(shape=(64, 384, 1536), latency_ms=1.0)]
    second = load_profile(write_measured_profile(loaded, newer, tmp_path / "b.toml"))
    assert second.measured == (entries[1], *newer)
    assert (tmp_path / "b.toml").read_text().count(HEADER_MARK) == 1
    assert _files(tmp_path) == ["a.toml", "b.toml"]


def test_measured_table_in_the_middle_of_a_user_file_is_replaced(tmp_path):
    packaged = load_profile(BASE)
    text = importlib.resources.files("deploycomp.hw_profiles").joinpath(*f"{BASE}.toml".split("/"))
    text = text.read_text(encoding="utf-8")
    old = _entry(device="Other CPU", shape=(8, 8, 8))
    table = (
        '[measured]  # kept by hand here\n\n[[measured.entries]]\ndevice = "Other CPU"\n'
        'backend = "onnxruntime"\nbackend_version = "1.0"\ndate = 2025-01-31\n'
        'op_kind = "linear"\nshape = [8, 8, 8]\nweight_scheme = "int8_sym_per_channel"\n'
        'activation_scheme = "int8_sym_per_tensor"\nlatency_ms = 0.125\n\n'
    )
    user = tmp_path / "user.toml"
    user.write_text(text.replace("[measured]", "").replace("[compute]", table + "[compute]"))
    base = load_profile(user)
    assert base.measured == (old,)

    written = load_profile(write_measured_profile(base, [_entry()], tmp_path / "out.toml"))
    assert written.measured == (_entry(),)  # the other device's entry is dropped
    assert dataclasses.replace(written, id=BASE, source=packaged.source, measured=()) == packaged


@pytest.mark.parametrize("where", ["missing-folder", "file-as-folder", "directory", "not-toml"])
def test_bad_out_path_is_one_clear_error_and_leaves_nothing(where, tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    out = {
        "missing-folder": tmp_path / "missing" / "my-cpu.toml",
        "file-as-folder": tmp_path / "afile" / "my-cpu.toml",
        "directory": tmp_path / "adir",
        "not-toml": tmp_path / "my-cpu.txt",
    }[where]
    before = _files(tmp_path)
    with pytest.raises(OutputDirError, match="hardware profile") as info:
        calibrate_target(BASE, _tiny_spec(), out, backends=["onnxruntime"], progress=False)
    assert str(out) in str(info.value)
    with pytest.raises(OutputDirError):
        write_measured_profile(load_profile(BASE), [_entry()], out)
    assert _files(tmp_path) == before
    assert _files(tmp_path / "adir") == []


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"latency_ms": float("nan")}, "not a positive finite number"),
        ({"latency_ms": float("inf")}, "not a positive finite number"),
        ({"weight_scheme": "int3"}, "does not load"),
        ({"date": "yesterday"}, "does not load"),
    ],
)
def test_rejected_entries_leave_no_file_and_keep_the_old_one(bad, message, tmp_path):
    out = tmp_path / "my-cpu.toml"
    write_measured_profile(load_profile(BASE), [_entry()], out)
    before = out.read_text()
    with pytest.raises(ProfileError, match=message):
        write_measured_profile(load_profile(BASE), [_entry(**bad)], out)
    assert out.read_text() == before
    assert _files(tmp_path) == ["my-cpu.toml"]


def test_sweep_without_linear_layers_says_so():
    with pytest.raises(DeployCompError, match="constant weight"):
        sweep(load_profile(BASE), [], ["onnxruntime"], progress=False)


def test_gpu_sweep_times_2_4_on_pruned_weights(tmp_path):
    """On a GPU profile the sweep times 2:4 options too, on weights pruned 2:4 along K, and the
    QDQ writer keeps the pattern in the int8 weight; CPU profiles time no 2:4."""
    import onnx
    from onnx import numpy_helper

    from deploycomp.hw.sweep import _shape_models
    from deploycomp.kernels.sparsity import is_2_4_sparse

    keys = [o.key for o in options_to_time(load_profile("nvidia/h100"), "torch", "linear")]
    assert keys == ["fp32", "int8", "int4 w-only", "2:4", "2:4+int8"]
    assert not any(
        "2:4" in o.key
        for o in options_to_time(load_profile("intel/xeon-icx"), "openvino", "linear")
    )
    options = options_to_time(load_profile("nvidia/h100"), "torch", "linear")
    paths, _, skipped = _shape_models("linear", (32, 256, 128), options, tmp_path, seed=0)
    assert not skipped
    for option, path in paths.items():
        model = onnx.load(str(path))
        weights = [
            numpy_helper.to_array(i)
            for i in model.graph.initializer
            if i.name in ("weight", "weight_quantized")
        ]
        (weight,) = weights
        sparse = is_2_4_sparse(torch.from_numpy(weight.astype(np.float32)).t().contiguous())
        assert sparse == (option.sparsity == "2:4"), option.key
