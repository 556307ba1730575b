"""Checkpoints of the compression stage, keyed by everything that changes what they hold.

A checkpoint resumed under another target, budget or model would ship a plan and weights made
for something else. So every file name carries a short key: a hash of the model's weights, the
target profile's content, the budget, the pruning request, the training length, mode, seed, plan
backend and batch size, the data, and the deploycomp version. The plan file holds those fields
and the training checkpoint holds the key, so a renamed file is caught too. Files of other keys
are left where they are: a compile for another target can still resume from them.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deploycomp._version import __version__
from deploycomp.artifacts import CompressionPlan, write_json_atomic
from deploycomp.errors import DeployCompError
from deploycomp.hw import HardwareProfile
from deploycomp.plan.joint_planner import Budget, JointPlanResult

KEY_LENGTH = 16  # hex characters of the sha256 kept in file names
# How to get past a checkpoint that cannot be used; the CLI flag, then the library's argument.
START_AFRESH = "pass --no-resume to ignore it, or delete it (resume=False in a library call)"
_KEY_IN_NAME = re.compile(rf"-([0-9a-f]{{{KEY_LENGTH}}})-round\d+-")
# What a training checkpoint holds, with the type of each entry.
_STATE_TYPES: dict[str, type] = {
    "step": int,
    "student": dict,
    "optimizer": dict,
    "rng_state": torch.Tensor,
    "config": dict,
    "history": dict,
}
# What a plan file holds, with the type of each entry.
_PLAN_TYPES: dict[str, tuple[type, ...]] = {
    "key": (str,),
    "key_fields": (dict,),
    "plan": (dict,),
    "predicted_ms": (int, float),
    "fp32_ms": (int, float),
    "bytes": (int,),
    "fp32_bytes": (int,),
    "options": (dict,),
    "budget": (dict,),
}


class CheckpointError(DeployCompError):
    """A checkpoint or its plan file cannot be used, or --checkpoint-dir cannot hold them."""


def tensors_digest(named: Iterable[tuple[str, Any]]) -> str:
    """sha256 over each name, dtype, shape and the raw bytes of each tensor or array, in the
    order given (anything else by its repr)."""
    digest = hashlib.sha256()
    for name, value in named:
        if isinstance(value, torch.Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
            digest.update(flat.view(torch.uint8).numpy())
        elif isinstance(value, np.ndarray) and value.dtype != object:
            digest.update(f"{name}|{value.dtype}|{value.shape}|".encode())
            digest.update(np.ascontiguousarray(value).reshape(-1).view(np.uint8))
        else:
            digest.update(f"{name}|{value!r}|".encode())
    return digest.hexdigest()


def weights_digest(model: nn.Module) -> str:
    """Hash of the model's state dict (weights and buffers), in sorted key order."""
    return tensors_digest(sorted(model.state_dict().items()))


def profile_digest(profile: HardwareProfile) -> str:
    """Hash of the profile's content; where it was read from (``source``) is left out."""
    content = {k: v for k, v in profile.to_dict().items() if k != "source"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def key_fields(
    *,
    model_name: str,
    model: nn.Module,
    profile: HardwareProfile,
    backend: str,
    batch_size: int,
    budget: Budget,
    prune: float | str | None,
    steps: int,
    lr: float,
    mode: str,
    seed: int,
    measure_options: bool,
    data: Iterable[Mapping[str, Any]],
) -> dict[str, Any]:
    """Everything a checkpointed plan or trained student depends on, as JSON values."""
    return {
        "model": model_name,
        "weights": weights_digest(model),
        "profile": profile_digest(profile),
        "backend": backend,
        "batch_size": batch_size,
        "budget": dataclasses.asdict(budget),
        "prune": prune,
        "steps": steps,
        "lr": lr,
        "mode": mode,
        "seed": seed,
        "measure_options": measure_options,
        "data": tensors_digest(
            (f"{i}/{name}", batch[name]) for i, batch in enumerate(data) for name in sorted(batch)
        ),
        "deploycomp_version": __version__,
    }


def checkpoint_key(fields: Mapping[str, Any]) -> str:
    """The first ``KEY_LENGTH`` hex characters of a sha256 over the fields' canonical JSON."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def key_in_name(path: str | Path) -> str | None:
    """The key a checkpoint's file name carries (None for a name without one)."""
    found = _KEY_IN_NAME.findall(Path(path).name)
    return found[-1] if found else None


def check_checkpoint_dir(path: str | Path) -> None:
    """Refuse a --checkpoint-dir that is a file, or that cannot be created or written to."""
    where = f"--checkpoint-dir {str(path)!r}"
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(
            f"{where} is a file, not a directory; pass a directory (it is created if missing)"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(
            f"{where} cannot be created ({err.strerror or type(err).__name__}); pass a "
            f"directory you can write to"
        ) from err
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise CheckpointError(
            f"{where} cannot be written to ({err.strerror or type(err).__name__}); pass a "
            f"directory you can write to"
        ) from err


def read_checkpoint(path: Path, *, peek: bool = False) -> dict[str, Any]:
    """The state a training checkpoint holds; ``peek`` maps the file instead of reading it,
    for a look at its step or key. Raises CheckpointError, on one line, for a file torch cannot
    read or one that lacks an entry."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=peek)
    except Exception as err:  # torch raises many kinds; none of their messages fit one line
        if path.is_file() and path.stat().st_size == 0:
            why = "the file is empty"
        elif "Weights only load failed" in str(err):
            why = "it holds objects other than tensors and plain values"
        else:
            why = "it is truncated, or not a file torch.save wrote"
        raise CheckpointError(
            f"cannot read the checkpoint {str(path)!r}: {why}; {START_AFRESH}"
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(
            f"the checkpoint {str(path)!r} holds a {type(state).__name__}, not a training "
            f"checkpoint; {START_AFRESH}"
        )
    for name, kind in _STATE_TYPES.items():
        if not isinstance(state.get(name), kind):
            found = "nothing" if name not in state else f"a {type(state[name]).__name__}"
            raise CheckpointError(
                f"the checkpoint {str(path)!r} is incomplete: its {name!r} entry is {found}, "
                f"expected a {kind.__name__}; {START_AFRESH}"
            )
    return state


def _read_plan_file(path: Path) -> dict[str, Any]:
    """The plan file's JSON, with its key and each entry of the expected type."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        why = f"line {err.lineno}: {err.msg}" if isinstance(err, json.JSONDecodeError) else err
        raise CheckpointError(
            f"the checkpoint plan {str(path)!r} is not readable JSON ({why}); {START_AFRESH}"
        ) from err
    if not isinstance(data, dict):
        raise CheckpointError(
            f"the checkpoint plan {str(path)!r} holds a {type(data).__name__}, expected an "
            f"object; {START_AFRESH}"
        )
    for name, kind in _PLAN_TYPES.items():
        value = data.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            expected = " or ".join(k.__name__ for k in kind)
            why = (
                f"is incomplete: {name!r} is missing"
                if name not in data
                else f"has a {type(value).__name__} as {name!r}, expected {expected}"
            )
            raise CheckpointError(f"the checkpoint plan {str(path)!r} {why}; {START_AFRESH}")
    return data


def _plan_result(data: dict[str, Any], path: Path) -> JointPlanResult:
    try:
        return JointPlanResult(
            plan=CompressionPlan.from_dict(data["plan"]),
            predicted_ms=float(data["predicted_ms"]),
            fp32_ms=float(data["fp32_ms"]),
            bytes=data["bytes"],
            fp32_bytes=data["fp32_bytes"],
            options={k: [tuple(o) for o in v] for k, v in data["options"].items()},
            budget=Budget(**data["budget"]),
        )
    except (TypeError, ValueError, KeyError, AttributeError, DeployCompError) as err:
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"the checkpoint plan {str(path)!r} does not hold a valid plan ({why}); "
            f"{START_AFRESH}"
        ) from err


@dataclasses.dataclass(frozen=True)
class Checkpoints:
    """The checkpoint files of one compile in --checkpoint-dir: per round, the plan it trains
    (``<model>-<key>-roundN-plan.json``) and the training checkpoint(s) of the mode
    (``<model>-<key>-roundN-<mode>.pt``; sequential adds a suffix per phase)."""

    folder: Path
    fields: dict[str, Any]
    resume: bool = True

    @functools.cached_property
    def key(self) -> str:
        return checkpoint_key(self.fields)

    def _path(self, label: str, suffix: str, key: str | None = None) -> Path:
        return self.folder / f"{self.fields['model']}-{key or self.key}-{label}-{suffix}"

    def train_path(self, label: str) -> Path:
        """The checkpoint path the training of round ``label`` is given."""
        return self._path(label, f"{self.fields['mode']}.pt")

    def _train_files(self, label: str) -> list[Path]:
        from deploycomp.compress.sequential import phase_checkpoint_paths

        path = self.train_path(label)
        if self.fields["mode"] == "joint":
            return [path]
        return list(phase_checkpoint_paths(path).values())

    def save_plan(self, label: str, result: JointPlanResult) -> None:
        write_json_atomic(
            self._path(label, "plan.json"),
            {
                "key": self.key,
                **dataclasses.asdict(result),
                "plan": result.plan.to_dict(),
                "key_fields": self.fields,
            },
        )

    def saved_plan(self, label: str, log: Callable[[str], None]) -> JointPlanResult | None:
        """The plan a checkpoint of round ``label`` was trained on, to resume it with; None
        to train the round afresh (the log says why when a checkpoint is passed over)."""
        trained = [f for f in self._train_files(label) if f.is_file()]
        if not trained:
            self._tell_other_keys(label, log)
            return None
        if not self.resume:
            log(f"checkpoint {trained[0].name} is ignored (--no-resume) and will be overwritten")
            return None
        plan_file = self._path(label, "plan.json")
        if not plan_file.is_file():
            raise CheckpointError(
                f"the checkpoint {str(trained[0])!r} has no plan file {plan_file.name!r} beside "
                f"it, so the plan it was trained on is unknown; {START_AFRESH}"
            )
        data = _read_plan_file(plan_file)
        keys = {plan_file: data["key"]}
        keys.update({f: read_checkpoint(f, peek=True).get("key") for f in trained})
        for file, key in keys.items():
            if key != self.key:
                log(
                    f"checkpoint {file.name} holds key {key}, not this run's {self.key}: it was "
                    f"written for another model/target/budget and renamed; starting afresh"
                )
                return None
        return _plan_result(data, plan_file)

    def _tell_other_keys(self, label: str, log: Callable[[str], None]) -> None:
        """One log line when the folder holds this round's checkpoint of another key."""
        model = str(self.fields["model"])
        others: dict[str, list[Path]] = {}
        for file in self.folder.glob(f"{glob.escape(model)}-*-{label}-*"):
            key = key_in_name(file)
            if key not in (None, self.key) and file.name.startswith(f"{model}-{key}-{label}-"):
                others.setdefault(key, []).append(file)
        if not others:
            return
        key = max(others, key=lambda k: max(f.stat().st_mtime for f in others[k]))
        files = sorted(others[key], key=lambda f: (f.suffix != ".pt", f.name))
        differ = ""
        try:
            theirs = _read_plan_file(self._path(label, "plan.json", key))["key_fields"]
            names = sorted({*theirs, *self.fields})
            differ = ", ".join(k for k in names if theirs.get(k) != self.fields.get(k))
        except CheckpointError:
            pass  # without a readable plan file, the fields that differ are unknown
        differ = f", differs in {differ}" if differ else ""
        more = f"; {len(others) - 1} more key(s) kept too" if len(others) > 1 else ""
        log(
            f"checkpoint {files[0].name} was written for another model/target/budget (key "
            f"{key}{differ}); starting afresh, that file is kept{more}"
        )
