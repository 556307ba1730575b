"""Read the artifacts of one run directory for the report: every file is optional except that the
directory must exist. A missing artifact is recorded as a sentence in ``RunArtifacts.missing`` so
the report can say what it could not show; a present but malformed one raises
:class:`~deploycomp.errors.OutputDirError` naming the file, because rendering half of a corrupt run
would hide the problem.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from deploycomp.artifacts import (
    Artifact,
    CompressionPlan,
    Engine,
    EngineLayer,
    ExportedModel,
    MeasurementResult,
)
from deploycomp.errors import OutputDirError
from deploycomp.report.engine_layers import read_engine_layers

A = TypeVar("A", bound=Artifact)

PLAN_FILE = "plan.json"
EXPORTED_FILE = "exported.json"
MEASUREMENT_FILE = "measurement.json"
TARGET_FILE = "target.json"
RUN_FILE = "run.json"
COMPRESSION_FILE = "compression.json"  # only runs that trained a compressed model
PRUNING_FILE = "pruning.json"  # only runs compiled with --prune
ENGINES_DIR = "engines"
ENGINE_FILE = "engine.json"


@dataclasses.dataclass(frozen=True)
class RunArtifacts:
    """What a run directory holds; ``None`` (or empty) where a file is absent."""

    plan: CompressionPlan | None
    exported: ExportedModel | None
    measurement: MeasurementResult | None
    engines: tuple[Engine, ...]
    target: dict[str, Any] | None
    run: dict[str, Any] | None
    missing: tuple[str, ...]
    compression: dict[str, Any] | None = None
    pruning: dict[str, Any] | None = None
    # engine directory name -> the layers its layers.json lists (GPU engines only)
    engine_layers: dict[str, tuple[EngineLayer, ...]] = dataclasses.field(default_factory=dict)
    # "backend/variant" -> bytes on disk of the engine's model files (its .json records excluded)
    engine_bytes: dict[str, int] = dataclasses.field(default_factory=dict)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OutputDirError(
            f"cannot read {path.name!r} in run directory {str(path.parent)!r}: {exc}. "
            "Expected a JSON file written by deploycomp; rerun the stage that writes it."
        ) from exc


def _load_artifact(path: Path, cls: type[A]) -> A:
    data = _read_json(path)
    try:
        return cls.from_dict(data)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise OutputDirError(
            f"{path.name!r} in run directory {str(path.parent)!r} is not a valid {cls.__name__}: "
            f"{exc}. Rerun the stage that writes it with this deploycomp version."
        ) from exc


def _load_dict(path: Path) -> dict[str, Any]:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise OutputDirError(
            f"{path.name!r} in run directory {str(path.parent)!r} holds a "
            f"{type(data).__name__}, expected a JSON object."
        )
    return data


def load_run(run_dir: str | Path) -> RunArtifacts:
    """Load every artifact the report uses from a run directory.

    Args:
        run_dir: the directory the pipeline wrote.

    Returns:
        The artifacts found, with one sentence in ``missing`` for each one that is absent.

    Raises:
        OutputDirError: ``run_dir`` is not a directory, or an artifact in it is malformed.

    Example:
        >>> artifacts = load_run("out/fashion_mlp")
        >>> artifacts.measurement is None
        False
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise OutputDirError(
            f"run directory {str(run_dir)!r} does not exist or is not a directory. "
            "Pass the output directory of a deploycomp run."
        )
    missing: list[str] = []

    def optional(name: str, what: str) -> Path | None:
        path = run_dir / name
        if path.is_file():
            return path
        missing.append(f"{name} is missing: {what}.")
        return None

    plan_path = optional(PLAN_FILE, "no per-layer decisions to show")
    exported_path = optional(EXPORTED_FILE, "no export checks to show")
    measurement_path = optional(
        MEASUREMENT_FILE, "no latency or accuracy was measured (the measure stage did not run)"
    )
    target_path = optional(TARGET_FILE, "the target device and where it was measured are unknown")
    run_path = optional(RUN_FILE, "no model name, command or stage timings")

    engines: list[Engine] = []
    engine_layers: dict[str, tuple[EngineLayer, ...]] = {}
    engine_bytes: dict[str, int] = {}
    engines_dir = run_dir / ENGINES_DIR
    if engines_dir.is_dir():
        for engine_json in sorted(engines_dir.glob(f"*/{ENGINE_FILE}")):
            engines.append(_load_artifact(engine_json, Engine))
            files = [f for f in engine_json.parent.rglob("*") if f.is_file()]
            engine_bytes[f"{engines[-1].backend}/{engines[-1].variant}"] = sum(
                f.stat().st_size for f in files if f.suffix != ".json"
            )
            layers = read_engine_layers(engine_json.parent)
            if layers is not None:
                engine_layers[engine_json.parent.name] = tuple(layers)
    if not engines:
        missing.append(f"{ENGINES_DIR}/ holds no {ENGINE_FILE}: no engine was built.")

    return RunArtifacts(
        plan=_load_artifact(plan_path, CompressionPlan) if plan_path else None,
        exported=_load_artifact(exported_path, ExportedModel) if exported_path else None,
        measurement=(
            _load_artifact(measurement_path, MeasurementResult) if measurement_path else None
        ),
        engines=tuple(engines),
        target=_load_dict(target_path) if target_path else None,
        run=_load_dict(run_path) if run_path else None,
        missing=tuple(missing),
        compression=(
            _load_dict(run_dir / COMPRESSION_FILE)
            if (run_dir / COMPRESSION_FILE).is_file() else None
        ),
        engine_layers=engine_layers,
        engine_bytes=engine_bytes,
        pruning=_load_dict(run_dir / PRUNING_FILE) if (run_dir / PRUNING_FILE).is_file() else None,
    )
