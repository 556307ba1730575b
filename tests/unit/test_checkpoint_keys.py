"""Compression checkpoints are keyed by everything that changes their result: a checkpoint of
another model, target, budget or training is never resumed, a broken one is a one-line error."""

import copy
import dataclasses
import datetime
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from deploycomp.compress import checkpoint_key
from deploycomp.compress.checkpoint_key import (
    CheckpointError,
    check_checkpoint_dir,
    key_fields,
    key_in_name,
    tensors_digest,
)
from deploycomp.compress.config import CompressConfig
from deploycomp.compress.joint import JointConfig, train_joint
from deploycomp.compress.stage import compress_and_export
from deploycomp.errors import DeployCompError
from deploycomp.hw import load_profile
from deploycomp.modelspec import ModelSpec
from deploycomp.plan.joint_planner import Budget

TARGET = "intel/xeon-icx"


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()


def _batches(seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((16, 64)).astype(np.float32)} for _ in range(2)]


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    batches = _batches()
    return ModelSpec("mlp", _model(), {"x": batches[0]["x"][:1]}, batches, batch_sizes=(1,))


def _compress(spec, tmp_path, *, size=0.5, target=TARGET, **config):
    """One compression run into a fresh run directory; returns its record and log lines."""
    logs: list[str] = []
    run = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    run.mkdir()
    options = {"steps": 4, "checkpoint_dir": str(tmp_path / "ckpt"), "measure_options": False}
    compress = CompressConfig(budget=Budget(size_target=size), **{**options, **config})
    _, record = compress_and_export(
        spec, load_profile(target), "onnxruntime", run, compress, log=logs.append, progress=False
    )
    return record, logs


def _files(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "ckpt").iterdir())


def _only(files: list[str], suffix: str) -> str:
    (found,) = [f for f in files if f.endswith(suffix)]
    return found


def _base_fields(**changes):
    fields = {
        "model_name": "mlp",
        "model": _model(),
        "profile": load_profile(TARGET),
        "backend": "onnxruntime",
        "batch_size": 1,
        "budget": Budget(latency_target=0.5),
        "prune": None,
        "steps": 100,
        "lr": 1e-4,
        "mode": "joint",
        "seed": 0,
        "measure_options": False,
        "data": _batches(),
    }
    return key_fields(**{**fields, **changes})


def _nudged_model() -> nn.Module:
    model = _model()
    with torch.no_grad():
        model[0].weight[3, 5] += 1e-6
    return model


def _other_profile():
    profile = load_profile(TARGET)
    return dataclasses.replace(profile, memory_bandwidth_gbs=profile.memory_bandwidth_gbs * 1.01)


CHANGES = {
    "weights": lambda: {"model": _nudged_model()},
    "profile": lambda: {"profile": _other_profile()},
    "another target": lambda: {"profile": load_profile("intel/xeon-spr")},
    "budget": lambda: {"budget": Budget(latency_target=0.6)},
    "accuracy budget": lambda: {"budget": Budget(latency_target=0.5, max_accuracy_drop=1.0)},
    "prune": lambda: {"prune": 0.5},
    "prune auto": lambda: {"prune": "auto"},
    "steps": lambda: {"steps": 101},
    "lr": lambda: {"lr": 2e-4},
    "mode": lambda: {"mode": "sequential"},
    "seed": lambda: {"seed": 1},
    "backend": lambda: {"backend": "openvino"},
    "batch size": lambda: {"batch_size": 8},
    "measured options": lambda: {"measure_options": True},
    "data": lambda: {"data": _batches(seed=1)},
}


def test_the_key_is_equal_for_equal_inputs():
    a, b = _base_fields(), _base_fields()  # built again from scratch: equal, not identical
    assert checkpoint_key.checkpoint_key(a) == checkpoint_key.checkpoint_key(b)
    assert len(checkpoint_key.checkpoint_key(a)) == checkpoint_key.KEY_LENGTH
    # Where the profile was read from is not its content.
    moved = dataclasses.replace(load_profile(TARGET), source="elsewhere/xeon-icx.toml")
    assert checkpoint_key.checkpoint_key(_base_fields(profile=moved)) == (
        checkpoint_key.checkpoint_key(a)
    )


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_the_key_differs_when_anything_that_changes_the_result_differs(change):
    base = checkpoint_key.checkpoint_key(_base_fields())
    assert checkpoint_key.checkpoint_key(_base_fields(**CHANGES[change]())) != base


def test_the_key_differs_with_the_deploycomp_version(monkeypatch):
    base = checkpoint_key.checkpoint_key(_base_fields())
    monkeypatch.setattr(checkpoint_key, "__version__", "99.0.0")
    assert checkpoint_key.checkpoint_key(_base_fields()) != base


def test_tensor_digest_reads_every_dtype_and_the_names():
    values = [torch.ones(3, dtype=torch.bfloat16), torch.tensor([True, False]), torch.tensor(2.0)]
    digest = tensors_digest(enumerate(values))
    flipped = [values[0], torch.tensor([False, False]), values[2]]
    assert tensors_digest(enumerate(flipped)) != digest
    assert tensors_digest(zip("abc", values)) != digest
    assert tensors_digest([("a", np.zeros(2, np.float32))]) != tensors_digest(
        [("a", np.zeros(2, np.float64))]
    )


def test_a_checkpoint_of_another_budget_or_target_is_not_resumed_and_is_kept(spec, tmp_path):
    first, _ = _compress(spec, tmp_path)
    original = _files(tmp_path)
    key = key_in_name(_only(original, "joint.pt"))
    assert _only(original, "plan.json") == f"mlp-{key}-round1-plan.json"

    _, logs = _compress(spec, tmp_path, size=0.3)
    (told,) = [line for line in logs if line.startswith("checkpoint")]
    assert f"mlp-{key}-round1-joint.pt was written for another" in told
    assert "differs in budget" in told and "starting afresh" in told
    assert not any(line.startswith("resume") for line in logs)
    _, logs = _compress(spec, tmp_path, target="intel/xeon-spr")
    (told,) = [line for line in logs if line.startswith("checkpoint")]
    # The newest other key is named (the smaller budget's): budget and target differ from it.
    assert "differs in budget, profile" in told and "1 more key(s) kept too" in told
    assert not any(line.startswith("resume") for line in logs)
    assert set(original) < set(_files(tmp_path))  # the other keys' files are all still there
    assert len(_files(tmp_path)) == 6

    again, logs = _compress(spec, tmp_path)
    assert any(line.startswith(f"resume   round 1 from mlp-{key}-round1-joint.pt") for line in logs)
    assert not any(line.startswith("checkpoint") for line in logs)
    assert again["rounds"][0]["final_loss"] == first["rounds"][0]["final_loss"]


def test_a_checkpoint_renamed_to_this_runs_key_is_not_resumed(spec, tmp_path):
    _compress(spec, tmp_path)
    theirs = _files(tmp_path)
    _compress(spec, tmp_path, size=0.3)
    ours = [f for f in _files(tmp_path) if f not in theirs]
    folder = tmp_path / "ckpt"
    for suffix in ("joint.pt", "plan.json"):
        os.replace(folder / _only(theirs, suffix), folder / _only(ours, suffix))
    _, logs = _compress(spec, tmp_path, size=0.3)
    (told,) = [line for line in logs if line.startswith("checkpoint")]
    assert f"holds key {key_in_name(theirs[0])}, not this run's {key_in_name(ours[0])}" in told
    assert not any(line.startswith("resume") for line in logs)


def _one_line_error(spec, tmp_path, name):
    with pytest.raises(DeployCompError) as caught:
        _compress(spec, tmp_path)
    message = str(caught.value)
    assert "\n" not in message and name in message, message
    assert "pass --no-resume to ignore it, or delete it" in message
    assert "weights_only" not in message
    return message


@pytest.mark.parametrize(
    "damage",
    ["random bytes", "truncated", "empty", "an object", "no student"],
)
def test_a_corrupt_checkpoint_is_a_one_line_error_and_no_resume_gets_past_it(
    spec, tmp_path, damage
):
    _compress(spec, tmp_path)
    path = tmp_path / "ckpt" / _only(_files(tmp_path), "joint.pt")
    if damage == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4000))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "an object":
        torch.save({"step": 4, "when": datetime.date(2024, 1, 1)}, path)
    else:
        torch.save({"step": 4, "key": key_in_name(path)}, path)
    _one_line_error(spec, tmp_path, path.name)

    _, logs = _compress(spec, tmp_path, resume=False)
    assert f"checkpoint {path.name} is ignored (--no-resume) and will be overwritten" in logs
    assert not any(line.startswith("resume") for line in logs)
    _, logs = _compress(spec, tmp_path)  # the file written afresh resumes
    assert any(line.startswith("resume") for line in logs)


@pytest.mark.parametrize(
    "damage",
    ["invalid json", "a list", "missing field", "wrong type", "bad plan", "bad budget", "gone"],
)
def test_a_corrupt_or_incomplete_plan_file_is_a_one_line_error(spec, tmp_path, damage):
    _compress(spec, tmp_path)
    path = tmp_path / "ckpt" / _only(_files(tmp_path), "plan.json")
    data = json.loads(path.read_text())
    if damage == "invalid json":
        path.write_text(path.read_text()[:-40])
    elif damage == "a list":
        path.write_text("[]")
    elif damage == "missing field":
        del data["options"]
    elif damage == "wrong type":
        data["bytes"] = "many"
    elif damage == "bad plan":
        data["plan"] = {"model_name": "mlp"}
    elif damage == "bad budget":
        data["budget"] = {"latency_target": 7}
    else:
        path.unlink()
    if damage not in ("invalid json", "a list", "gone"):
        path.write_text(json.dumps(data))
    message = _one_line_error(spec, tmp_path, path.name)
    if damage == "gone":
        assert "has no plan file" in message
    _, logs = _compress(spec, tmp_path, resume=False)
    assert not any(line.startswith("resume") for line in logs)


def test_no_resume_ignores_a_good_checkpoint_and_overwrites_it(spec, tmp_path):
    _compress(spec, tmp_path)
    files = _files(tmp_path)
    path = tmp_path / "ckpt" / _only(files, "joint.pt")
    before = path.stat().st_mtime_ns
    _, logs = _compress(spec, tmp_path, resume=False)
    assert not any(line.startswith("resume") for line in logs)
    assert _files(tmp_path) == files and path.stat().st_mtime_ns > before


def test_sequential_checkpoints_carry_the_key_and_resume(spec, tmp_path):
    _compress(spec, tmp_path, mode="sequential")
    files = _files(tmp_path)
    assert [f.rsplit("-", 1)[-1] for f in files] == [
        "plan.json",
        "sequential.prune.pt",
        "sequential.quantize.pt",
    ]
    assert len({key_in_name(f) for f in files}) == 1
    _, logs = _compress(spec, tmp_path, mode="sequential")
    assert any(line.startswith("resume") for line in logs)
    _, logs = _compress(spec, tmp_path)  # joint: another key, the sequential files stay
    assert any("differs in mode" in line for line in logs)
    assert set(files) < set(_files(tmp_path))


@pytest.mark.parametrize("kind", ["a file", "under a file"])
def test_a_checkpoint_dir_that_cannot_be_a_directory_fails_before_any_work(spec, tmp_path, kind):
    blocker = tmp_path / "ckpt"
    blocker.write_text("not a directory")
    folder = blocker if kind == "a file" else blocker / "inner"
    with pytest.raises(CheckpointError) as caught:
        check_checkpoint_dir(folder)
    message = str(caught.value)
    assert message.startswith(f"--checkpoint-dir {str(folder)!r}") and "\n" not in message
    logs: list[str] = []
    run = tmp_path / "run"
    run.mkdir()
    config = CompressConfig(steps=4, checkpoint_dir=str(folder), measure_options=False)
    with pytest.raises(CheckpointError, match="--checkpoint-dir"):
        compress_and_export(
            spec, load_profile(TARGET), "onnxruntime", run, config, log=logs.append,
            progress=False,
        )  # fmt: skip
    assert logs == [] and list(run.iterdir()) == []


def test_check_checkpoint_dir_creates_a_missing_directory(tmp_path):
    check_checkpoint_dir(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []


def _trained(tmp_path, name):
    student = nn.Sequential(nn.Linear(8, 4))
    teacher = copy.deepcopy(student)
    batches = [torch.randn(16, 8)]
    config = JointConfig(steps=2, log_every=1)
    train_joint(student, teacher, batches, config, progress=False, checkpoint_path=tmp_path / name)
    return student, teacher, batches, config


def test_train_joint_refuses_a_checkpoint_renamed_to_another_key(tmp_path):
    student, teacher, batches, config = _trained(tmp_path, "m-0123456789abcdef-round1-joint.pt")
    state = torch.load(tmp_path / "m-0123456789abcdef-round1-joint.pt", weights_only=True)
    assert state["key"] == "0123456789abcdef"
    renamed = tmp_path / "m-fedcba9876543210-round1-joint.pt"
    os.replace(tmp_path / "m-0123456789abcdef-round1-joint.pt", renamed)
    with pytest.raises(CheckpointError, match="renamed.*--no-resume") as caught:
        train_joint(
            student, teacher, batches, config, progress=False, checkpoint_path=renamed,
            resume=True,
        )  # fmt: skip
    assert "\n" not in str(caught.value)


def test_train_joint_reports_an_unreadable_checkpoint_on_one_line(tmp_path):
    student, teacher, batches, config = _trained(tmp_path, "run.pt")
    (tmp_path / "run.pt").write_bytes(b"\x80\x02garbage" * 50)
    with pytest.raises(CheckpointError) as caught:
        train_joint(
            student, teacher, batches, config, progress=False,
            checkpoint_path=tmp_path / "run.pt", resume=True,
        )  # fmt: skip
    message = str(caught.value)
    assert "\n" not in message and "run.pt" in message and "--no-resume" in message
