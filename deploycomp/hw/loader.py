"""Strict loading of hardware profiles from TOML.

Takes a profile id (``nvidia/a100``: the path under the packaged ``hw_profiles/`` folder without
``.toml``) or the path of a user's own ``.toml`` file and returns a ``HardwareProfile``. Every
unknown key, unknown name (backend, precision, scheme, op kind, ISA flag), wrong type and missing
required key raises ``ProfileError`` naming the file, the dotted key, the value found and what was
expected. Tables: ``identity``, ``compute``, ``memory``, ``peak_tops``, ``capabilities``,
``measured``; the packaged files show every key with its unit and source. Every number must be
finite and within its plausible range in ``NUMBER_BOUNDS``; a file that is not UTF-8, a path that
is not a readable file, and an id that is not packaged fail the same way, on one line.
"""

from __future__ import annotations

import datetime
import difflib
import importlib.resources
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploycomp.errors import ProfileError, closest_match_hint
from deploycomp.hw._reader import Bounds, Reader, display_source, parse_toml
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
_TOP_KEYS = {"schema_version", "identity", "compute", "memory", "peak_tops", "capabilities",
             "measured"}  # fmt: skip
_IDENTITY_KEYS = {"name", "kind", "vendor", "architecture", "isa_flags", "compute_capability",
                  "backends"}  # fmt: skip
_COMPUTE_KEYS = {"cores", "sm_count", "clock_ghz"}
_MEMORY_KEYS = {"bandwidth_gbs", "capacity_gib", "l2_cache_mib", "llc_mib"}
_CAPABILITY_KEYS = {"weight_schemes", "activation_schemes", "weight_only_schemes", "sparsity",
                    "min_channels_for_2_4", "weight_only_fused", "note"}  # fmt: skip
_MEASURED_KEYS = {"device", "backend", "backend_version", "date", "op_kind", "shape",
                  "weight_scheme", "activation_scheme", "sparsity", "latency_ms"}  # fmt: skip

# The plausible values of every number a profile holds, inclusive, keyed by dotted key (``*``: any
# name, ``[]``: any element). Wide enough for anything from a small embedded CPU to a large
# multi-socket server or the largest accelerator (the packaged profiles sit well inside them);
# narrow enough that a unit slip (MB/s for GB/s, ops for TOPS) or a stray exponent fails to load
# instead of reaching the cost model. NaN and infinities are never admitted.
NUMBER_BOUNDS: dict[str, Bounds] = {
    "identity.compute_capability[]": Bounds(0, 99, "major or minor version", integer=True),
    "compute.cores": Bounds(1, 4096, "physical cores", integer=True),
    "compute.sm_count": Bounds(1, 1024, "streaming multiprocessors", integer=True),
    "compute.clock_ghz": Bounds(0.01, 10, "GHz"),
    "memory.bandwidth_gbs": Bounds(0.1, 100_000, "GB/s"),
    "memory.capacity_gib": Bounds(0.001, 100_000, "GiB"),
    "memory.l2_cache_mib": Bounds(0.001, 4096, "MiB"),
    "memory.llc_mib": Bounds(0.001, 4096, "MiB"),
    "peak_tops.*.dense": Bounds(0.001, 100_000, "TOPS or TFLOPS"),
    "peak_tops.*.sparse": Bounds(0.001, 100_000, "TOPS or TFLOPS"),
    "capabilities.*.*.min_channels_for_2_4": Bounds(1, 1 << 20, "channels", integer=True),
    "measured.entries[].shape[]": Bounds(1, 2**31 - 1, "elements", integer=True),
    "measured.entries[].latency_ms": Bounds(1e-6, 1e7, "milliseconds"),
}


def _parse(data: dict[str, Any], profile_id: str, source: str) -> HardwareProfile:
    r = Reader(source)
    r.table(
        data, "", _TOP_KEYS, {"schema_version", "identity", "memory", "peak_tops", "capabilities"}
    )
    version = data["schema_version"]
    if type(version) is not int or version != SCHEMA_VERSION:
        raise r.fail("schema_version", version, f"{SCHEMA_VERSION}")

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
        memory_bandwidth_gbs=_number(r, memory, "memory", "bandwidth_gbs"),
        memory_capacity_gib=_number(r, memory, "memory", "capacity_gib", optional=True),
        l2_cache_mib=_number(r, memory, "memory", "l2_cache_mib", optional=True),
        llc_mib=_number(r, memory, "memory", "llc_mib", optional=True),
        cores=_number(r, compute, "compute", "cores", optional=True),
        sm_count=_number(r, compute, "compute", "sm_count", optional=True),
        clock_ghz=_number(r, compute, "compute", "clock_ghz", optional=True),
        capabilities=_parse_capabilities(r, data["capabilities"], backends),
        measured=_parse_measured(r, data.get("measured", {})),
        source=source,
    )


def _number(
    r: Reader,
    data: dict[str, Any],
    table: str,
    name: str,
    bounds_key: str = "",
    optional: bool = False,
) -> Any:
    """``r.number`` with the bounds of ``bounds_key`` (default ``table.name``) in NUMBER_BOUNDS."""
    bounds = NUMBER_BOUNDS[bounds_key or f"{table}.{name}"]
    return r.number(data, table, name, bounds, optional=optional)


def _is_iso_date(text: str) -> bool:
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return True


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
    if not (isinstance(cc, list) and len(cc) == 2):
        raise r.fail("identity.compute_capability", cc, "[major, minor], e.g. [8, 0]")
    bounds = NUMBER_BOUNDS["identity.compute_capability[]"]
    major, minor = (
        r.check(f"identity.compute_capability[{i}]", v, bounds) for i, v in enumerate(cc)
    )
    return kind, backends, (), (major, minor)


def _parse_peaks(r: Reader, data: Any) -> dict[str, PeakThroughput]:
    peaks = r.table(data, "peak_tops", set(PRECISIONS), set())
    if not peaks:
        raise r.fail("peak_tops", {}, "at least one precision, e.g. fp32 = { dense = 19.5 }")
    result = {}
    for precision, entry in peaks.items():
        key = f"peak_tops.{precision}"
        r.table(entry, key, {"dense", "sparse"}, {"dense"})
        result[precision] = PeakThroughput(
            dense_tops=_number(r, entry, key, "dense", "peak_tops.*.dense"),
            sparse_tops=_number(r, entry, key, "sparse", "peak_tops.*.sparse", optional=True),
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
            min_channels = _number(
                r, entry, key, "min_channels_for_2_4", "capabilities.*.*.min_channels_for_2_4",
                optional=True,
            )  # fmt: skip
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
        elif not (isinstance(date, str) and _is_iso_date(date)):
            raise r.fail(f"{key}.date", date, "a date, e.g. 2025-01-31")
        shape = entry["shape"]
        if not (isinstance(shape, list) and shape):
            raise r.fail(f"{key}.shape", shape, "a non-empty list of positive integers")
        dim = NUMBER_BOUNDS["measured.entries[].shape[]"]
        shape = [r.check(f"{key}.shape[{j}]", d, dim) for j, d in enumerate(shape)]
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
                latency_ms=_number(r, entry, key, "latency_ms", "measured.entries[].latency_ms"),
            )
        )
    return tuple(result)


def _parse_bytes(data: bytes, profile_id: str, source: str) -> HardwareProfile:
    return _parse(parse_toml(data, display_source(source)), profile_id, source)


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


def _same_id(name: str, known: list[str]) -> str | None:
    """The id equal to ``name`` but for case, or whose device name (the part after the vendor
    folder: ``a100`` for ``nvidia/a100``) is ``name``; None if there is none."""
    lowered = name.lower()
    devices = {pid.rsplit("/", 1)[-1].lower(): pid for pid in known}
    return next((pid for pid in known if pid.lower() == lowered), devices.get(lowered))


def _suggestion(name: str, known: list[str]) -> str:
    """' Did you mean ...?' naming the packaged id ``name`` most likely meant, or ''.

    The same id or device name comes first (``a100`` -> ``nvidia/a100``), then the closest id,
    then the id whose device name is closest (``h10`` -> ``nvidia/h100``).
    """
    same = _same_id(name, known)
    hint = f" Did you mean {same!r}?" if same else closest_match_hint(name, known)
    if hint:
        return hint
    devices = {pid.rsplit("/", 1)[-1].lower(): pid for pid in known}
    close = difflib.get_close_matches(name.lower().rsplit("/", 1)[-1], list(devices), 1, 0.5)
    return f" Did you mean {devices[close[0]]!r}?" if close else ""


def _read_file(path: Path) -> bytes:
    """The bytes of a user's profile file; a path that is not a readable file fails on one line."""
    try:
        if path.is_dir():
            problem = "it is a directory, not a file"
        elif not path.exists():
            problem = "it does not exist"
        elif not path.is_file():
            problem = "it is not a regular file"
        else:
            return path.read_bytes()
    except (OSError, ValueError) as exc:
        problem = str(getattr(exc, "strerror", None) or exc)
    packaged = _same_id(str(path).removesuffix(".toml"), sorted(_packaged_files()))
    hint = f" Did you mean the packaged profile {packaged!r}?" if packaged else ""
    raise ProfileError(
        f"cannot read hardware profile file {str(path)!r}: {problem}.{hint} Pass the path of a "
        f"readable .toml file, or a packaged id (see `deploycomp targets`)."
    )


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
        _parse_bytes(files[pid].read_bytes(), pid, f"hw_profiles/{pid}.toml")
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
            path is not a readable file, the file is not UTF-8 TOML, or its contents break the
            schema (a number that is not finite or not within ``NUMBER_BOUNDS`` included).

    Example:
        >>> load_profile("intel/xeon-spr").backends
        ('openvino', 'onnxruntime')
    """
    if isinstance(id_or_path, Path) or str(id_or_path).endswith(".toml"):
        path = Path(id_or_path)
        return _parse_bytes(_read_file(path), str(id_or_path), str(path))
    files = _packaged_files()
    if id_or_path not in files:
        known = sorted(files)
        hint = _suggestion(id_or_path, known)
        if not hint and os.path.isfile(id_or_path):  # False, not an error, for any string
            hint = " A file of that name exists: a profile file's name must end in .toml."
        raise ProfileError(
            f"unknown hardware profile {id_or_path!r}; known profiles: "
            f"{', '.join(known)}.{hint} Pass a known id, 'auto', or the path of your own "
            f".toml file."
        )
    return _parse_bytes(
        files[id_or_path].read_bytes(), id_or_path, f"hw_profiles/{id_or_path}.toml"
    )
