"""Detection of this machine and resolution of a ``--target`` to a hardware profile.

``detect_host`` reads the CPU model and instruction-set flags (``/proc/cpuinfo`` on Linux) and, if
PyTorch sees a CUDA device, the GPU name and compute capability. ``resolve_target`` turns
``"auto"``, a packaged profile id or a path into a ``TargetResolution``: the profile, a sentence
saying what was found and why this profile, and whether the profile describes this machine (so
that measurements taken here are measurements of the target). The choice itself is the pure
function ``choose_profile(host, profiles)``, testable on synthetic hosts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import platform
import re
from collections.abc import Sequence
from pathlib import Path

from deploycomp.artifacts import Artifact
from deploycomp.errors import ProfileError
from deploycomp.hw.loader import list_profiles, load_profile
from deploycomp.hw.profile import HardwareProfile

# The instruction that sets the int8 GEMM rate, best first: a profile that requires an earlier
# one is more capable than one that requires a later one, whatever its other flags.
ISA_TIERS: tuple[tuple[str, str], ...] = (
    ("amx_int8", "AMX"),
    ("avx512_vnni", "AVX-512 VNNI"),
    ("avx_vnni", "AVX-VNNI"),
    ("avx2", "AVX2"),
)
_VENDOR_NAMES = {"intel": "Intel", "amd": "AMD", "nvidia": "NVIDIA"}


@dataclasses.dataclass(frozen=True)
class HostInfo(Artifact):
    """What this machine is, as far as choosing a profile needs.

    ``cpu_count`` is the number of logical CPUs this process may run on.
    """

    cpu_name: str
    cpu_flags: tuple[str, ...]
    cpu_count: int
    machine: str = "x86_64"  # platform.machine()
    cpu_vendor: str = ""  # "intel" | "amd" | "" when unknown
    gpu_name: str | None = None
    gpu_compute_capability: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class TargetResolution:
    """A resolved ``--target``: the profile, why it was chosen, and whether it is this machine."""

    profile: HardwareProfile
    reason: str
    is_host: bool


def parse_cpuinfo(text: str) -> tuple[str, str, tuple[str, ...]]:
    """Model name, vendor (``intel``/``amd``/``""``) and sorted flags from ``/proc/cpuinfo``."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    vendor_id = fields.get("vendor_id", "")
    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(vendor_id, "")
    flags = tuple(sorted(set(fields.get("flags", "").split())))
    return fields.get("model name", ""), vendor, flags


def _detect_gpu() -> tuple[str | None, tuple[int, int] | None]:
    if importlib.util.find_spec("torch") is None:
        return None, None
    import torch  # heavy: imported only when a caller asks about the GPU

    try:
        if not torch.cuda.is_available():
            return None, None
        major, minor = torch.cuda.get_device_capability(0)
        return torch.cuda.get_device_name(0), (int(major), int(minor))
    except RuntimeError:  # a broken driver reads as "no GPU", not as a crash
        return None, None


def detect_host(include_gpu: bool = True) -> HostInfo:
    """Detect this machine's CPU and, optionally, its first CUDA GPU.

    Args:
        include_gpu: Ask PyTorch (imported here, lazily) for a CUDA device.

    Returns:
        The host description; GPU fields are None without a visible CUDA device.

    Example:
        >>> detect_host(include_gpu=False).cpu_name
        'Intel(R) Xeon(R) Platinum 8480+'
    """
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux: no flags, so only the fallback profile can match
        text = ""
    name, vendor, flags = parse_cpuinfo(text)
    if hasattr(os, "sched_getaffinity"):
        cpu_count = len(os.sched_getaffinity(0))
    else:
        cpu_count = os.cpu_count() or 1
    gpu_name, gpu_cc = _detect_gpu() if include_gpu else (None, None)
    return HostInfo(
        cpu_name=name or platform.processor() or platform.machine() or "unknown CPU",
        cpu_flags=flags,
        cpu_count=cpu_count,
        machine=platform.machine(),
        cpu_vendor=vendor,
        gpu_name=gpu_name,
        gpu_compute_capability=gpu_cc,
    )


INT8_DOT_PRODUCT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def has_int8_dot_product(host: HostInfo | None = None) -> bool:
    """Whether this x86 CPU has an INT8 dot-product instruction (VNNI or AMX).

    Without one, ONNX Runtime's u8 x s8 kernels multiply with AVX2's vpmaddubsw, which saturates
    the int16 sum of each pair of products: its INT8 results then depart from the QDQ graph's
    arithmetic by up to a few percent of an output.
    """
    host = host or detect_host(include_gpu=False)
    return bool(set(host.cpu_flags) & set(INT8_DOT_PRODUCT_FLAGS))


def describe_host(host: HostInfo | None = None) -> str:
    """One line naming this machine, for labelling measurements.

    Args:
        host: A detected host; detected now (with the GPU) when None.

    Returns:
        E.g. ``"AMD EPYC, 2 cores, avx512_vnni"`` or ``"..., amx; GPU NVIDIA H100 (sm_90)"``.
    """
    host = host or detect_host()
    flags = set(host.cpu_flags)
    best = next((flag for flag, _ in ISA_TIERS if flag in flags), "no avx2")
    line = f"{host.cpu_name}, {host.cpu_count} cores, {'amx' if best == 'amx_int8' else best}"
    if host.gpu_name:
        line += f"; GPU {host.gpu_name} ({_sm(host.gpu_compute_capability)})"
    return line


def _sm(cc: tuple[int, int] | None) -> str:
    return f"sm_{cc[0]}{cc[1]}" if cc else "unknown compute capability"


def _isa_summary(flags: set[str]) -> str:
    parts = ["amx"] if "amx_int8" in flags else []
    parts += [f for f in ("avx512_vnni", "avx512_bf16", "avx_vnni") if f in flags]
    if not parts:
        parts = [f for f in ("avx2", "fma") if f in flags]
    if "avx512_vnni" in flags and "amx_int8" not in flags:
        parts.append("no amx")
    elif "avx2" in flags and "avx512f" not in flags:
        parts.append("no avx-512")
    return ", ".join(parts) or "no AVX2"


def _tier(profile: HardwareProfile) -> tuple[int, str]:
    for rank, (flag, label) in enumerate(ISA_TIERS):
        if flag in profile.isa_flags:
            return rank, label
    return len(ISA_TIERS), "baseline x86-64"


def _host_vendor(host: HostInfo) -> str:
    if host.cpu_vendor:
        return host.cpu_vendor
    lowered = host.cpu_name.lower()
    return next((v for v in ("intel", "amd") if v in lowered), "")


def _choose_cpu(
    host: HostInfo, profiles: Sequence[HardwareProfile], prefer: str = ""
) -> tuple[HardwareProfile, str]:
    cpus = [p for p in profiles if p.kind == "cpu"]
    if not cpus:
        raise ProfileError("no CPU hardware profile is available to match this machine against.")
    flags = set(host.cpu_flags)
    fits = sorted(
        (p for p in cpus if set(p.isa_flags) <= flags),
        key=lambda p: (_tier(p)[0], -len(p.isa_flags), p.id != prefer, p.id),
    )
    what = f"this CPU is {host.cpu_name!r} ({_isa_summary(flags)})"
    if not fits:
        chosen = min(cpus, key=lambda p: (len(p.isa_flags), p.id))
        missing = ", ".join(sorted(set(chosen.isa_flags) - flags))
        return chosen, (
            f"{what}, machine {host.machine}: no profile's required instruction set is present "
            f"(even {chosen.id} needs {missing}); falling back to {chosen.id}, whose numbers do "
            f"not describe this CPU"
        )
    chosen = fits[0]
    label = _tier(chosen)[1]
    vendor = _VENDOR_NAMES.get(chosen.vendor, chosen.vendor)
    if chosen.vendor == _host_vendor(host):
        reason = (
            f"{what}: matches {chosen.id} ({label}) by instruction set; its peak numbers are "
            f"those of the {chosen.name}, not necessarily this SKU's"
        )
    elif chosen.vendor in _VENDOR_NAMES:
        reason = (
            f"{what}: no vendor profile matches exactly; closest by instruction set is "
            f"{chosen.id} ({label}); its peak numbers are {vendor}'s, not this CPU's"
        )
    else:
        reason = (
            f"{what}: no vendor profile's instruction set is present; closest by instruction set "
            f"is {chosen.id} ({label}); its peak numbers are those of a reference CPU "
            f"({chosen.name}), not this CPU's"
        )
    unused = [f for f in ("avx512_bf16", "amx_bf16") if f in flags and f not in chosen.isa_flags]
    if unused and "bf16" not in chosen.peak_tops:
        reason += f"; this CPU also has {unused[0]}, which that profile does not use"
    return chosen, reason


def _choose_gpu(
    host: HostInfo, profiles: Sequence[HardwareProfile], prefer: str = ""
) -> tuple[HardwareProfile, str] | None:
    cc = host.gpu_compute_capability
    gpus = [p for p in profiles if p.kind == "gpu" and p.compute_capability]
    if cc is None or not gpus:
        return None

    def named(p: HardwareProfile) -> bool:
        device = re.escape(p.id.rsplit("/", 1)[-1].lower())
        return re.search(rf"\b{device}\b", (host.gpu_name or "").lower()) is not None

    what = f"this machine has GPU {host.gpu_name!r} (compute capability {cc[0]}.{cc[1]})"
    exact = sorted(
        (p for p in gpus if p.compute_capability == cc),
        key=lambda p: (p.id != prefer, not named(p), p.id),
    )
    if exact:
        chosen = exact[0]
        if named(chosen):
            return chosen, f"{what}: matches {chosen.id} ({chosen.name})"
        return chosen, (
            f"{what}: matches the compute capability of {chosen.id} ({_sm(cc)}); its peak "
            f"numbers are the {chosen.name}'s, not this GPU's"
        )
    # A newer GPU runs everything an older architecture accelerates, so the newest profile not
    # newer than this GPU is closest; a GPU older than every profile takes the oldest one.
    older = [p for p in gpus if p.compute_capability < cc]  # type: ignore[operator]
    if older:
        chosen = max(older, key=lambda p: (p.compute_capability, p.id == prefer))
    else:
        chosen = min(gpus, key=lambda p: (p.compute_capability, p.id != prefer))
    return chosen, (
        f"{what}: no profile for {_sm(cc)}; closest by compute capability is {chosen.id} "
        f"({_sm(chosen.compute_capability)}); its peak numbers are the {chosen.name}'s, not "
        f"this GPU's"
    )


def choose_profile(host: HostInfo, profiles: Sequence[HardwareProfile]) -> TargetResolution:
    """Pick the profile closest to ``host``: by compute capability with a GPU, else by CPU ISA.

    Pure: depends only on its arguments. Among CPU profiles whose required flags are all present
    the most capable wins (AMX, then AVX-512 VNNI, then AVX-VNNI, then AVX2).

    Args:
        host: The machine, detected or synthetic.
        profiles: Candidate profiles, e.g. ``list_profiles()``.

    Returns:
        The resolution, with ``is_host=True``.

    Raises:
        ProfileError: ``profiles`` has no CPU profile and the host has no matching GPU.

    Example:
        >>> host = HostInfo("Intel Xeon", ("avx2", "fma", "avx512f", "avx512_vnni"), 8)
        >>> choose_profile(host, list_profiles()).profile.id
        'intel/xeon-icx'
    """
    gpu = _choose_gpu(host, profiles)
    if gpu is not None:
        return TargetResolution(profile=gpu[0], reason=gpu[1], is_host=True)
    profile, reason = _choose_cpu(host, profiles)
    if host.gpu_name:
        reason += f" (GPU {host.gpu_name!r} seen, but no GPU profile was offered)"
    return TargetResolution(profile=profile, reason=reason, is_host=True)


def resolve_target(target: str, host: HostInfo | None = None) -> TargetResolution:
    """Resolve a ``--target`` value to a hardware profile.

    Args:
        target: ``"auto"`` (detect this machine), a packaged id such as ``"intel/xeon-spr"``,
            or the path of a ``.toml`` profile.
        host: The machine to compare against; detected when None.

    Returns:
        The profile, a reason that says what was found and why, and ``is_host``: True for
        ``"auto"`` and for a named profile that is also the closest one to this machine.

    Raises:
        ProfileError: The id is unknown (the message suggests the closest packaged id, e.g.
            ``nvidia/a100`` for ``a100``), the path is not a readable file, or the file is
            malformed; always on one line.

    Example:
        >>> resolve_target("auto").reason
        "this CPU is 'AMD EPYC' (avx512_vnni, avx512_bf16, no amx): no vendor profile ..."
    """
    if target == "auto":
        return choose_profile(host or detect_host(), list_profiles())
    profile = load_profile(target)
    host = host or detect_host(include_gpu=profile.kind == "gpu")
    candidates = list_profiles()
    if profile.id not in {p.id for p in candidates}:
        candidates.append(profile)
    if profile.kind == "gpu":
        gpu = _choose_gpu(host, candidates, prefer=profile.id)
        is_host = gpu is not None and gpu[0].id == profile.id
    else:
        is_host = _choose_cpu(host, candidates, prefer=profile.id)[0].id == profile.id
    if is_host:
        reason = (
            f"{profile.id} was named; it is also the profile closest to this machine "
            f"({describe_host(host)})"
        )
    else:
        reason = (
            f"{profile.id} was named; this machine ({describe_host(host)}) is a different "
            f"device, so what is measured here does not describe the target"
        )
    return TargetResolution(profile=profile, reason=reason, is_host=is_host)
