"""The environment written beside every measurement: CPU model and the instruction-set flags that
decide inference speed, core counts, GPU, OS, Python and library versions.

``collect_environment()`` returns a plain JSON-ready dict. Library versions come from package
metadata, so no backend library is imported just to learn its version.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import Any

from deploycomp._version import __version__

# CPU flags that change which kernels a CPU backend can use (x86 names as in /proc/cpuinfo).
INFERENCE_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "amx_fp16",
)
LIBRARIES = ("torch", "numpy", "onnx", "onnxruntime", "openvino", "tensorrt")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return model, flags
    for line in cpuinfo.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def _library_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpus() -> list[str]:
    if "torch" not in sys.modules and importlib.util.find_spec("torch") is None:
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def collect_environment() -> dict[str, Any]:
    """Describe this machine and software stack for a measurement report.

    Returns:
        ``cpu_model``, ``cpu_flags`` (the inference-relevant flags present), ``cpu_count``
        (logical CPUs), ``cpus_allowed`` (CPUs this process may use), ``gpus``, ``os``,
        ``python`` and ``versions`` (library name -> version or None when not installed).

    Example:
        >>> env = collect_environment()
        >>> env["versions"]["deploycomp"]
        '0.1.0'
    """
    model, flags = _cpuinfo()
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    versions: dict[str, str | None] = {name: _library_version(name) for name in LIBRARIES}
    versions["deploycomp"] = __version__
    return {
        "cpu_model": model,
        "cpu_flags": [flag for flag in INFERENCE_FLAGS if flag in flags],
        "cpu_count": os.cpu_count(),
        "cpus_allowed": allowed,
        "gpus": _gpus(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }
