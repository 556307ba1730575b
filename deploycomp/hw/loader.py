"""Strict loading of hardware profiles from TOML.

Takes a profile id (``nvidia/a100``: the path under the packaged ``hw_profiles/`` folder without
``.toml``) or the path of a user's own ``.toml`` file and returns a ``HardwareProfile``. Every
unknown key, unknown name (backend, precision, scheme, op kind, ISA flag), wrong type and missing
required key raises ``ProfileError`` naming the file, the dotted key, the value found and what was
expected. Tables: ``identity``, ``compute``, ``memory``, ``peak_tops``, ``capabilities``,
``measured``; the packaged files show every key with its unit and source.
"""

from __future__ import annotations

import datetime
import importlib.resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploycomp.errors import ProfileError, closest_match_hint
from deploycomp.hw._reader import Reader, parse_toml
from deploycomp.hw.profile import (
    ACTIVATION_SCHEMES,
    BACKENDS,
    FLOAT_SCHEMES,
    ISA_FLAGS,
    KINDS,
    OP_KINDS,
    PRECISIONS,
    QUANTIZED_WEIGHT_SCHEMES,
    SPARSITY_PATTERNS,
    WEIGHT_SCHEMES,
    HardwareProfile,
    MeasuredEntry,
    OpCapability,
    PeakThroughput,
)

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

SCHEMA_VERSION = 1
_PACKAGE = "deploycomp.hw_profiles"
_TOP_KEYS = {
    "schema_version",
    "identity",
    "compute",
    "memory",
    "peak_tops",
    "capabilities",
    "measured",
}
_IDENTITY_KEYS = {
    "name",
    "kind",
    "vendor",
    "architecture",
    "isa_flags",
    "compute_capability",
    "backends",
}
_COMPUTE_KEYS = {"cores", "sm_count", "clock_ghz"}
_MEMORY_KEYS = {"bandwidth_gbs", "capacity_gib", "l2_cache_mib", "llc_mib"}
_CAPABILITY_KEYS = {
    "weight_schemes",
    "activation_schemes",
    "weight_only_schemes",
    "sparsity",
    "min_channels_for_2_4",
    "weight_only_fused",
    "note",
}
_MEASURED_KEYS = {
    "device",
    "backend",
    "backend_version",
    "date",
    "op_kind",
    "shape",
    "weight_scheme",
    "activation_scheme",
    "sparsity",
    "latency_ms",
}


def _parse(data: dict[str, Any], profile_id: str, source: str) -> HardwareProfile:
    r = Reader(source)
    r.table(
        data, "", _TOP_KEYS, {"schema_version", "identity", "memory", "peak_tops", "capabilities"}
    )
    if data["schema_version"] != SCHEMA_VERSION or isinstance(data["schema_version"], bool):
        raise r.fail("schema_version", data["schema_version"], f"{SCHEMA_VERSION}")

    kind, backends, isa_flags, capability = _parse_identity(r, data["identity"])
    ident = data["identity"]
    compute = r.table(
        data.get("compute", {}),
        "compute",
        _COMPUTE_KEYS,
        {"cores"} if kind == "cpu" else {"sm_count"},
    )
    for name in ("sm_count",) if kind == "cpu" else ("cores",):
        if name in compute:
            raise r.fail(f"compute.{name}", compute[name], f"no {name} on a {kind} profile")
    memory = r.table(
        data["memory"],
        "memory",
        _MEMORY_KEYS,
        {"bandwidth_gbs", "llc_mib" if kind == "cpu" else "l2_cache_mib"},
    )

    return HardwareProfile(
        id=profile_id,
        name=r.string(ident, "identity", "name"),
        kind=kind,
        vendor=r.string(ident, "identity", "vendor"),
        architecture=r.string(ident, "identity", "architecture"),
        isa_flags=isa_flags,
        compute_capability=capability,
        backends=backends,
        peak_tops=_parse_peaks(r, data["peak_tops"]),
        memory_bandwidth_gbs=r.number(memory, "memory", "bandwidth_gbs", "GB/s"),
        memory_capacity_gib=r.number(memory, "memory", "capacity_gib", "GiB", optional=True),
        l2_cache_mib=r.number(memory, "memory", "l2_cache_mib", "MiB", optional=True),
        llc_mib=r.number(memory, "memory", "llc_mib", "MiB", optional=True),
        cores=r.number(compute, "compute", "cores", "count", integer=True, optional=True),
        sm_count=r.number(compute, "compute", "sm_count", "count", integer=True, optional=True),
        clock_ghz=r.number(compute, "compute", "clock_ghz", "GHz", optional=True),
        capabilities=_parse_capabilities(r, data["capabilities"], backends),
        measured=_parse_measured(r, data.get("measured", {})),
        source=source,
    )


def _parse_identity(
    r: Reader, data: Any
) -> tuple[str, tuple[str, ...], tuple[str, ...], tuple[int, int] | None]:
    required = {"name", "kind", "vendor", "architecture", "backends"}
    ident = r.table(data, "identity", _IDENTITY_KEYS, required)
    kind = r.choice("identity.kind", ident["kind"], KINDS)
    backends = r.choices(ident, "identity", "backends", BACKENDS)
    if not backends:
        raise r.fail("identity.backends", [], "at least one backend, fastest first")
    if kind == "cpu":
        if "compute_capability" in ident:
            cc = ident["compute_capability"]
            raise r.fail("identity.compute_capability", cc, "no compute capability on a CPU")
        return kind, backends, r.choices(ident, "identity", "isa_flags", ISA_FLAGS), None
    if "isa_flags" in ident:
        raise r.fail("identity.isa_flags", ident["isa_flags"], "no ISA flags on a GPU profile")
    if "compute_capability" not in ident:
        raise r.missing("identity.compute_capability")
    cc = ident["compute_capability"]
    if not (
        isinstance(cc, list)
        and len(cc) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in cc)
    ):
        raise r.fail("identity.compute_capability", cc, "[major, minor], e.g. [8, 0]")
    return kind, backends, (), (cc[0], cc[1])


def _parse_peaks(r: Reader, data: Any) -> dict[str, PeakThroughput]:
    peaks = r.table(data, "peak_tops", set(PRECISIONS), set())
    if not peaks:
        raise r.fail("peak_tops", {}, "at least one precision, e.g. fp32 = { dense = 19.5 }")
    result = {}
    for precision, entry in peaks.items():
        key = f"peak_tops.{precision}"
        r.table(entry, key, {"dense", "sparse"}, {"dense"})
        result[precision] = PeakThroughput(
            dense_tops=r.number(entry, key, "dense", "TOPS"),
            sparse_tops=r.number(entry, key, "sparse", "TOPS", optional=True),
        )
    return result


def _parse_capabilities(
    r: Reader, data: Any, backends: tuple[str, ...]
) -> dict[str, dict[str, OpCapability]]:
    r.table(data, "capabilities", set(BACKENDS), set(backends))
    result: dict[str, dict[str, OpCapability]] = {}
    for backend, ops in data.items():
        if backend not in backends:
            raise ProfileError(
                f"{r.source}: key 'capabilities.{backend}' describes a backend that "
                f"identity.backends {list(backends)!r} does not list; add it there or remove the "
                f"table."
            )
        r.table(ops, f"capabilities.{backend}", set(OP_KINDS), set())
        result[backend] = {}
        for op_kind, entry in ops.items():
            key = f"capabilities.{backend}.{op_kind}"
            r.table(entry, key, _CAPABILITY_KEYS, {"weight_schemes", "activation_schemes"})
            sparsity = r.choices(entry, key, "sparsity", SPARSITY_PATTERNS, ())
            min_channels = r.number(
                entry, key, "min_channels_for_2_4", "channels", integer=True, optional=True
            )
            if min_channels is not None and "2:4" not in sparsity:
                raise r.fail(
                    f"{key}.min_channels_for_2_4",
                    min_channels,
                    "no 2:4 constraint where sparsity does not list '2:4'",
                )
            fused = entry.get("weight_only_fused", True)
            if not isinstance(fused, bool):
                raise r.fail(f"{key}.weight_only_fused", fused, "true or false")
            result[backend][op_kind] = OpCapability(
                weight_schemes=r.choices(entry, key, "weight_schemes", WEIGHT_SCHEMES),
                activation_schemes=r.choices(entry, key, "activation_schemes", ACTIVATION_SCHEMES),
                weight_only_schemes=r.choices(
                    entry, key, "weight_only_schemes", QUANTIZED_WEIGHT_SCHEMES, ()
                ),
                sparsity=sparsity,
                min_channels_for_2_4=min_channels,
                weight_only_fused=fused,
                note=r.string(entry, key, "note", ""),
            )
            if not set(result[backend][op_kind].activation_schemes) & set(FLOAT_SCHEMES):
                raise r.fail(
                    f"{key}.activation_schemes",
                    entry["activation_schemes"],
                    "at least one float scheme (the baseline the op runs in)",
                )
    return result


def _parse_measured(r: Reader, data: Any) -> tuple[MeasuredEntry, ...]:
    r.table(data, "measured", {"entries"}, set())
    entries = data.get("entries", [])
    if not isinstance(entries, list):
        raise r.fail("measured.entries", entries, "an array of tables ([[measured.entries]])")
    result = []
    for i, entry in enumerate(entries):
        key = f"measured.entries[{i}]"
        r.table(entry, key, _MEASURED_KEYS, _MEASURED_KEYS - {"sparsity"})
        date = entry["date"]
        if isinstance(date, (datetime.date, datetime.datetime)):
            date = date.isoformat()
        else:
            try:
                datetime.date.fromisoformat(str(date))
            except ValueError:
                raise r.fail(f"{key}.date", date, "a date, e.g. 2025-01-31") from None
        shape = entry["shape"]
        if not (
            isinstance(shape, list)
            and shape
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        ):
            raise r.fail(f"{key}.shape", shape, "a list of positive integers")
        result.append(
            MeasuredEntry(
                device=r.string(entry, key, "device"),
                backend=r.choice(f"{key}.backend", entry["backend"], BACKENDS),
                backend_version=r.string(entry, key, "backend_version"),
                date=date,
                op_kind=r.choice(f"{key}.op_kind", entry["op_kind"], OP_KINDS),
                shape=tuple(shape),
                weight_scheme=r.choice(
                    f"{key}.weight_scheme", entry["weight_scheme"], WEIGHT_SCHEMES
                ),
                activation_scheme=r.choice(
                    f"{key}.activation_scheme", entry["activation_scheme"], ACTIVATION_SCHEMES
                ),
                sparsity=r.choice(
                    f"{key}.sparsity", entry.get("sparsity", "none"), ("none",) + SPARSITY_PATTERNS
                ),
                latency_ms=r.number(entry, key, "latency_ms", "milliseconds"),
            )
        )
    return tuple(result)


def _parse_text(text: str, profile_id: str, source: str) -> HardwareProfile:
    return _parse(parse_toml(text, source), profile_id, source)


def _packaged_files() -> dict[str, Traversable]:
    """Packaged profile ids mapped to their files, found recursively under the data package."""
    found: dict[str, Traversable] = {}
    pending: list[tuple[str, Traversable]] = [("", importlib.resources.files(_PACKAGE))]
    while pending:
        prefix, folder = pending.pop()
        for item in folder.iterdir():
            if item.is_dir() and not item.name.startswith(("_", ".")):
                pending.append((f"{prefix}{item.name}/", item))
            elif item.name.endswith(".toml"):
                found[prefix + item.name[: -len(".toml")]] = item
    return found


def list_profiles() -> list[HardwareProfile]:
    """Every packaged hardware profile, sorted by id.

    Returns:
        The loaded profiles.

    Raises:
        ProfileError: A packaged file is malformed.

    Example:
        >>> [p.id for p in list_profiles()][:2]
        ['generic/x86-64-avx2', 'intel/core-avxvnni']
    """
    files = _packaged_files()
    return [
        _parse_text(files[pid].read_text(encoding="utf-8"), pid, f"hw_profiles/{pid}.toml")
        for pid in sorted(files)
    ]


def load_profile(id_or_path: str | Path) -> HardwareProfile:
    """Load one hardware profile by packaged id or from a user's ``.toml`` file.

    Args:
        id_or_path: A packaged id such as ``"nvidia/a100"``, or a path ending in ``.toml``
            (a ``Path`` is always a path). A file's profile id is the path as given.

    Returns:
        The validated profile.

    Raises:
        ProfileError: The id is unknown (the message lists known ids and the closest one), the
            file is missing or unreadable, or its contents break the schema.

    Example:
        >>> load_profile("intel/xeon-spr").backends
        ('openvino', 'onnxruntime')
    """
    if isinstance(id_or_path, Path) or str(id_or_path).endswith(".toml"):
        path = Path(id_or_path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ProfileError(
                f"cannot read hardware profile file {str(path)!r}: {exc.strerror or exc}. "
                f"Check the path, or pass a packaged id (see `list_profiles()`)."
            ) from exc
        return _parse_text(text, str(id_or_path), str(path))
    files = _packaged_files()
    if id_or_path not in files:
        known = sorted(files)
        hint = closest_match_hint(id_or_path, known)
        same_device = [pid for pid in known if pid.endswith(f"/{id_or_path}")]
        if not hint and same_device:
            hint = f" Did you mean {same_device[0]!r}?"
        raise ProfileError(
            f"unknown hardware profile {id_or_path!r}; known profiles: {', '.join(known)}."
            f"{hint} Pass a known id, 'auto', or the path of your own .toml file."
        )
    text = files[id_or_path].read_text(encoding="utf-8")
    return _parse_text(text, id_or_path, f"hw_profiles/{id_or_path}.toml")
