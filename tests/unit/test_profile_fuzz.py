"""Property-based fuzzing of the hardware-profile loader: whatever a file or ``--target`` holds,
loading either returns a profile whose every number is finite and within ``NUMBER_BOUNDS``, or
raises a one-line ``ProfileError``; never another exception.

Documents start from the packaged profiles (parsed, plus one measured entry) and are mutated:
values replaced by NaN, infinities, huge, tiny or negative numbers, strings, bools, lists and
tables; keys dropped or added; bytes that are not UTF-8 inserted.
"""

from __future__ import annotations

import copy
import datetime
import importlib.resources
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploycomp.errors import ProfileError
from deploycomp.hw import HardwareProfile, load_profile
from deploycomp.hw.loader import NUMBER_BOUNDS
from deploycomp.hw.profile import PRECISIONS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

MEASURED_ENTRY = {
    "device": "Test CPU",
    "backend": "onnxruntime",
    "backend_version": "1.20.0",
    "date": datetime.date(2025, 1, 31),
    "op_kind": "linear",
    "shape": [1, 768, 768],
    "weight_scheme": "int8_sym_per_channel",
    "activation_scheme": "uint8_per_tensor",
    "latency_ms": 0.12,
}


def _packaged(profile_id: str) -> dict[str, Any]:
    item = importlib.resources.files("deploycomp.hw_profiles")
    for part in f"{profile_id}.toml".split("/"):
        item = item.joinpath(part)
    return tomllib.loads(item.read_text(encoding="utf-8"))


def _with_measured(doc: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    doc["measured"] = {"entries": [dict(MEASURED_ENTRY)]}
    return doc


BASES = {
    "nvidia/a100": _packaged("nvidia/a100"),
    "intel/xeon-spr": _packaged("intel/xeon-spr"),
    "intel/xeon-icx+measured": _with_measured(_packaged("intel/xeon-icx")),
}


# ---------------------------------------------------------------------------------------------
# TOML writing (one inline value per top-level key) and walking


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_string(text: str) -> str:
    # A JSON string is a TOML basic string once DEL, which TOML wants escaped, is.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # nan, inf, -inf, 1e+300 and 5e-324 are TOML floats as written
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, list):
        return f"[{', '.join(_toml_value(v) for v in value)}]"
    items = (f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
    return f"{{{', '.join(items)}}}"


def to_toml(doc: dict[str, Any]) -> str:
    return "".join(f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in doc.items())


def _paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """The path of every value below ``value`` (tables, arrays and leaves)."""
    children = value.items() if isinstance(value, dict) else enumerate(value)
    for key, child in children:
        yield prefix + (key,)
        if isinstance(child, (dict, list)):
            yield from _paths(child, prefix + (key,))


def _dotted(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _bounds_key(dotted: str) -> str | None:
    """The NUMBER_BOUNDS key whose pattern (``*``: a name, ``[]``: an index) matches ``dotted``."""
    for key in NUMBER_BOUNDS:
        pattern = re.escape(key).replace(r"\*", r"[^.\[]+").replace(r"\[\]", r"\[\d+\]")
        if re.fullmatch(pattern, dotted):
            return key
    return None


def _number_paths(doc: dict[str, Any]) -> list[tuple[tuple, str]]:
    found = [(p, _bounds_key(_dotted(p))) for p in _paths(doc)]
    return [(p, key) for p, key in found if key is not None]


def _parent(doc: Any, path: tuple) -> Any:
    for part in path[:-1]:
        doc = doc[part]
    return doc


def profile_numbers(profile: HardwareProfile) -> Iterator[tuple[str, Any]]:
    """Every number of a loaded profile with its NUMBER_BOUNDS key."""
    for value in profile.compute_capability or ():
        yield "identity.compute_capability[]", value
    for key, value in [
        ("compute.cores", profile.cores),
        ("compute.sm_count", profile.sm_count),
        ("compute.clock_ghz", profile.clock_ghz),
        ("memory.bandwidth_gbs", profile.memory_bandwidth_gbs),
        ("memory.capacity_gib", profile.memory_capacity_gib),
        ("memory.l2_cache_mib", profile.l2_cache_mib),
        ("memory.llc_mib", profile.llc_mib),
    ]:
        if value is not None:
            yield key, value
    for peak in profile.peak_tops.values():
        yield "peak_tops.*.dense", peak.dense_tops
        if peak.sparse_tops is not None:
            yield "peak_tops.*.sparse", peak.sparse_tops
    for ops in profile.capabilities.values():
        for cap in ops.values():
            if cap.min_channels_for_2_4 is not None:
                yield "capabilities.*.*.min_channels_for_2_4", cap.min_channels_for_2_4
    for entry in profile.measured:
        yield from (("measured.entries[].shape[]", d) for d in entry.shape)
        yield "measured.entries[].latency_ms", entry.latency_ms


_MEMORY_FIELDS = {"bandwidth_gbs": "memory_bandwidth_gbs", "capacity_gib": "memory_capacity_gib"}


def number_at(profile: HardwareProfile, path: tuple) -> Any:
    """The loaded number that the document's value at ``path`` became."""
    table, name, *rest = path
    if table == "identity":
        return profile.compute_capability[rest[0]]  # type: ignore[index]
    if table in ("compute", "memory"):
        return getattr(profile, _MEMORY_FIELDS.get(name, name))
    if table == "peak_tops":
        return getattr(profile.peak_tops[name], f"{rest[0]}_tops")
    if table == "capabilities":
        return profile.capabilities[name][rest[0]].min_channels_for_2_4
    entry = profile.measured[rest[0]]
    return entry.shape[rest[2]] if rest[1] == "shape" else entry.latency_ms


def load_or_fail_on_one_line(path: Path) -> HardwareProfile | None:
    """The loaded profile, checked number by number, or None after a well-formed ProfileError.

    Any other exception propagates and fails the calling test.
    """
    try:
        profile = load_profile(path)
    except ProfileError as exc:
        message = str(exc)
        assert message and "\n" not in message and message.isprintable(), repr(message)
        return None
    for key, value in profile_numbers(profile):
        bounds = NUMBER_BOUNDS[key]
        assert bounds.admits(value), (key, value)
        assert isinstance(value, int if bounds.integer else float), (key, value)
    return profile


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "profile.toml"


# ---------------------------------------------------------------------------------------------
# the writer and the walk are sound, so a failure below is the loader's


@pytest.mark.parametrize("name", sorted(BASES))
def test_unmutated_documents_load_with_every_bound_exercised(name, fuzz_file):
    fuzz_file.write_text(to_toml(BASES[name]), encoding="utf-8")
    profile = load_or_fail_on_one_line(fuzz_file)
    assert profile is not None
    base_id = name.removesuffix("+measured")
    assert profile.peak_tops == load_profile(base_id).peak_tops
    assert profile.capabilities == load_profile(base_id).capabilities
    assert len(profile.measured) == len(BASES[name].get("measured", {}).get("entries", []))


def test_every_bound_is_in_a_base_document_and_on_a_loaded_profile(fuzz_file):
    in_documents, on_profiles = set(), set()
    for doc in BASES.values():
        in_documents |= {key for _, key in _number_paths(doc)}
        fuzz_file.write_text(to_toml(doc), encoding="utf-8")
        on_profiles |= {key for key, _ in profile_numbers(load_profile(fuzz_file))}
    assert in_documents == on_profiles == set(NUMBER_BOUNDS)


# ---------------------------------------------------------------------------------------------
# strategies

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)  # writable as UTF-8
ODD_NUMBERS = st.sampled_from(
    [math.nan, math.inf, -math.inf, 1e300, -1e300, 1e-300, 5e-324, 0, 0.0, -0.0, -1, 10**30,
     2**63, 1e11, 4096.0]
)  # fmt: skip
SCALARS = st.one_of(
    ODD_NUMBERS,
    st.floats(),
    st.integers(),
    st.booleans(),
    TEXT,
    st.sampled_from(list(PRECISIONS) + ["fp32", "linear", "tensorrt", "2:4", "nan", "1e3"]),
    st.dates(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)
NOT_UTF8 = st.sampled_from([b"\xff", b"\xfe\xff", b"\xe9", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"])


@st.composite
def mutated_documents(draw: st.DrawFn) -> dict[str, Any]:
    doc = copy.deepcopy(BASES[draw(st.sampled_from(sorted(BASES)))])
    for _ in range(draw(st.integers(1, 4))):
        paths = list(_paths(doc))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, last = _parent(doc, path), path[-1]
        action = draw(st.sampled_from(["replace", "replace", "drop", "add"]))
        if action == "replace":
            parent[last] = draw(VALUES)
        elif action == "drop":
            del parent[last]
        elif isinstance(parent, list):
            parent.append(draw(VALUES))
        else:  # an unknown key, mostly; a known one is replaced
            parent[draw(TEXT)] = draw(VALUES)
    return doc


def _out_of_bounds(key: str) -> st.SearchStrategy:
    bounds = NUMBER_BOUNDS[key]
    low, high = bounds.low, bounds.high
    wrong = st.one_of(
        st.sampled_from([math.nan, math.inf, -math.inf, True, False]),
        st.floats(max_value=low, exclude_max=True),
        st.floats(min_value=high, exclude_min=True),
        st.integers(max_value=math.ceil(low) - 1),
        st.integers(min_value=math.floor(high) + 1),
        TEXT,
        st.lists(st.integers(), max_size=2),
    )
    return st.one_of(wrong, st.floats(low, high)) if bounds.integer else wrong


def _within_bounds(key: str) -> st.SearchStrategy:
    bounds = NUMBER_BOUNDS[key]
    ints = st.integers(math.ceil(bounds.low), math.floor(bounds.high))
    return ints if bounds.integer else st.floats(bounds.low, bounds.high) | ints


@st.composite
def one_number_changed(draw: st.DrawFn, within: bool) -> tuple[dict[str, Any], tuple, Any]:
    doc = copy.deepcopy(BASES[draw(st.sampled_from(sorted(BASES)))])
    path, key = draw(st.sampled_from(_number_paths(doc)))
    value = draw(_within_bounds(key) if within else _out_of_bounds(key))
    _parent(doc, path)[path[-1]] = value
    return doc, path, value


# ---------------------------------------------------------------------------------------------
# properties


@FUZZ
@given(doc=mutated_documents())
def test_any_mutated_document_loads_or_fails_on_one_line(doc, fuzz_file):
    fuzz_file.write_text(to_toml(doc), encoding="utf-8")
    load_or_fail_on_one_line(fuzz_file)


@FUZZ
@given(doc=mutated_documents(), bad=NOT_UTF8, where=st.floats(0, 1))
def test_bytes_that_are_not_utf8_fail_on_one_line(doc, bad, where, fuzz_file):
    data = to_toml(doc).encode("utf-8")
    at = int(where * len(data))
    while at < len(data) and (data[at] & 0xC0) == 0x80:  # not inside a multi-byte character
        at += 1
    fuzz_file.write_bytes(data[:at] + bad + data[at:])
    with pytest.raises(ProfileError, match="not UTF-8 text"):
        load_profile(fuzz_file)
    load_or_fail_on_one_line(fuzz_file)


@FUZZ
@given(change=one_number_changed(within=False))
def test_a_number_out_of_bounds_is_named_with_its_key(change, fuzz_file):
    doc, path, value = change
    dotted = _dotted(path)
    fuzz_file.write_text(to_toml(doc), encoding="utf-8")
    assert load_or_fail_on_one_line(fuzz_file) is None, (dotted, value)
    with pytest.raises(ProfileError, match=re.escape(f"key {dotted!r} is ")):
        load_profile(fuzz_file)


@FUZZ
@given(change=one_number_changed(within=True))
def test_a_number_within_bounds_loads_unchanged(change, fuzz_file):
    doc, path, value = change
    fuzz_file.write_text(to_toml(doc), encoding="utf-8")
    profile = load_or_fail_on_one_line(fuzz_file)
    assert profile is not None, (path, value)
    assert number_at(profile, path) == value, (path, value)


@FUZZ
@given(data=st.binary(max_size=200) | TEXT.map(lambda t: t.encode("utf-8")))
def test_arbitrary_bytes_fail_on_one_line(data, fuzz_file):
    fuzz_file.write_bytes(data)
    assert load_or_fail_on_one_line(fuzz_file) is None


@FUZZ
@given(target=st.text(max_size=40) | TEXT.map(lambda t: t + ".toml"))
def test_any_target_string_loads_or_fails_on_one_line(target):
    try:
        profile = load_profile(target)
    except ProfileError as exc:
        message = str(exc)
        assert "\n" not in message and message.isprintable(), repr(message)
    else:
        assert profile.id == target
