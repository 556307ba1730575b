"""The backend interface: availability, build an engine from the exported ONNX, load and run it.

A backend subclasses :class:`Backend` and fills in ``_build`` and ``_load``; the public ``build``
validates, times the build and writes ``engine.json`` (template method). Backends import their
library inside these methods only, so ``import deploycomp`` loads no backend library.
"""

from __future__ import annotations

import abc
import dataclasses
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deploycomp.artifacts import Engine, write_json_atomic
from deploycomp.errors import BackendError


@dataclasses.dataclass(frozen=True)
class Availability:
    available: bool
    reason: str  # why not, and how to install; or what was found
    version: str = ""


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """How to build one engine.

    ``variant`` names the role of the engine in a comparison: ``compiled`` (the QDQ model),
    ``fp32`` (the true fp32 baseline) or ``default_precision`` (what the backend does to the fp32
    model when left alone; differs from fp32 where the backend lowers precision by default).
    """

    variant: str = "compiled"
    threads: int = 0  # 0: all cores available to this process
    device: str = "cpu"
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


class Session(abc.ABC):
    """A loaded engine. ``run`` takes named numpy inputs and returns the outputs in order."""

    input_names: Sequence[str]

    @abc.abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    def bind(self, inputs: dict[str, np.ndarray]) -> Callable[[], None]:
        """A call that runs the engine once on ``inputs`` and returns when it is done.

        Latency measurement times this call. A CPU engine runs ``run``; a GPU engine copies the
        inputs to the device once here, so the timed call is the device work alone (as a GPU
        server that keeps its buffers on the device sees it), not PCIe copies.
        """
        return lambda: self.run(inputs)


class Backend(abc.ABC):
    name: str
    devices: tuple[str, ...] = ("cpu",)
    engine_file: str  # the file in the engine directory that ``_load`` opens

    def default_device(self) -> str:
        """The device an engine is built for when the caller names none."""
        return "cuda:0" if self.devices[0] == "cuda" else "cpu"

    @abc.abstractmethod
    def availability(self) -> Availability:
        """Never raises: says whether the backend can be used here, and why not."""

    def build(self, onnx_path: str | Path, out_dir: str | Path, config: BuildConfig) -> Engine:
        """Build an engine from an ONNX file into ``out_dir`` (created; replaced on success)."""
        avail = self.availability()
        if not avail.available:
            raise BackendError(f"backend {self.name!r} is unavailable: {avail.reason}")
        if config.device.split(":")[0] not in self.devices:
            raise BackendError(
                f"the {self.name} backend runs on {' or '.join(map(repr, self.devices))}, got "
                f"device {config.device!r}; pick a backend for that device (deploycomp backends)."
            )
        onnx_path, out_dir = Path(onnx_path), Path(out_dir)
        if not onnx_path.is_file():
            raise BackendError(f"ONNX file {str(onnx_path)!r} does not exist.")
        tmp_dir = out_dir.with_name(f".{out_dir.name}.building")
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)
        start = time.perf_counter()
        try:
            precision, build_config, notes = self._build(onnx_path, tmp_dir, config)
        except BackendError:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        except Exception as exc:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise BackendError(
                f"backend {self.name!r} failed to build {onnx_path.name!r}: {exc}"
            ) from exc
        seconds = time.perf_counter() - start
        engine = Engine(
            backend=self.name,
            variant=config.variant,
            path=str(out_dir),
            files=tuple(sorted(p.name for p in tmp_dir.iterdir())),
            device=config.device,
            precision=precision,
            build_seconds=round(seconds, 3),
            build_config=build_config,
            backend_version=avail.version,
            notes=tuple(notes),
        )
        write_json_atomic(tmp_dir / "engine.json", engine.to_dict())
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp_dir.rename(out_dir)
        return engine

    @abc.abstractmethod
    def _build(
        self, onnx_path: Path, out_dir: Path, config: BuildConfig
    ) -> tuple[str, dict[str, Any], list[str]]:
        """Write the engine files into ``out_dir``; return (precision, build_config, notes)."""

    def load(self, engine: Engine, threads: int = 0) -> Session:
        if engine.backend != self.name:
            raise BackendError(
                f"engine was built by {engine.backend!r}, cannot be loaded by {self.name!r}."
            )
        path = Path(engine.path) / self.engine_file
        if not path.is_file():
            raise BackendError(
                f"engine file {str(path)!r} is missing; rebuild the engine with build()."
            )
        return self._load(engine, threads)

    @abc.abstractmethod
    def _load(self, engine: Engine, threads: int) -> Session: ...
