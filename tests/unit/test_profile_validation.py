"""Hardware profiles and ``--target`` values that cannot load fail with one line naming the file,
the key and the value: bad encodings, numbers that are not finite or not plausible, wrong types,
ids without their vendor folder, and paths that are not files."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import pytest

from deploycomp.errors import DeployCompError, ProfileError
from deploycomp.hw import load_profile, resolve_target
from deploycomp.hw.loader import NUMBER_BOUNDS

MEASURED_ENTRY = """
[[measured.entries]]
device = "Test CPU"
backend = "onnxruntime"
backend_version = "1.20.0"
date = 2025-01-31
op_kind = "linear"
shape = [1, 768, 768]
weight_scheme = "int8_sym_per_channel"
activation_scheme = "uint8_per_tensor"
latency_ms = 0.12
"""


def packaged_text(profile_id: str) -> str:
    item = importlib.resources.files("deploycomp.hw_profiles")
    for part in f"{profile_id}.toml".split("/"):
        item = item.joinpath(part)
    return item.read_text(encoding="utf-8")


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> str:
    assert isinstance(error.value, ProfileError) and isinstance(error.value, DeployCompError)
    message = str(error.value)
    assert "\n" not in message and message.isprintable() and message.strip() == message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


CPU, GPU = "intel/xeon-icx", "nvidia/a100"
NUMBER_CASES = [
    # (case, base profile, text replaced (first occurrence), replacement, expected fragments)
    ("nan bandwidth", CPU, "bandwidth_gbs = 204.8", "bandwidth_gbs = nan",
     ["memory.bandwidth_gbs", "is nan", "from 0.1 to 100000 (GB/s)"]),
    ("infinite bandwidth", CPU, "bandwidth_gbs = 204.8", "bandwidth_gbs = inf",
     ["memory.bandwidth_gbs", "is inf"]),
    ("bandwidth in MB/s", GPU, "bandwidth_gbs = 2039", "bandwidth_gbs = 2039000",
     ["memory.bandwidth_gbs", "2039000"]),
    ("string number", CPU, "bandwidth_gbs = 204.8", 'bandwidth_gbs = "204.8"',
     ["memory.bandwidth_gbs", "'204.8'", "a positive finite number"]),
    ("bool number", CPU, "bandwidth_gbs = 204.8", "bandwidth_gbs = true",
     ["memory.bandwidth_gbs", "is True"]),
    ("cores 1e11", CPU, "cores = 40 ", "cores = 1e11 ",
     ["compute.cores", "100000000000.0", "a positive integer from 1 to 4096"]),
    ("cores as a huge integer", CPU, "cores = 40 ", "cores = 100000000000 ",
     ["compute.cores", "100000000000", "from 1 to 4096"]),
    ("zero cores", CPU, "cores = 40 ", "cores = 0 ", ["compute.cores", "is 0,"]),
    ("negative cores", CPU, "cores = 40 ", "cores = -4 ", ["compute.cores", "is -4,"]),
    ("bool cores", CPU, "cores = 40 ", "cores = true ", ["compute.cores", "is True"]),
    ("clock in MHz", CPU, "clock_ghz = 2.3", "clock_ghz = 2300", ["compute.clock_ghz", "2300"]),
    ("peak 1e300", CPU, "fp32 = { dense = 5.888 }", "fp32 = { dense = 1e300 }",
     ["peak_tops.fp32.dense", "1e+300", "from 0.001 to 100000"]),
    ("peak 1e-300", CPU, "fp32 = { dense = 5.888 }", "fp32 = { dense = 1e-300 }",
     ["peak_tops.fp32.dense", "1e-300"]),
    ("negative sparse peak", GPU, "sparse = 1248", "sparse = -1248",
     ["peak_tops.int8.sparse", "-1248"]),
    ("sm_count 1e5", GPU, "sm_count = 108", "sm_count = 100000",
     ["compute.sm_count", "100000"]),
    ("compute capability 8.1000", GPU, "compute_capability = [8, 0]",
     "compute_capability = [8, 1000]", ["identity.compute_capability[1]", "1000"]),
    ("compute capability of floats", GPU, "compute_capability = [8, 0]",
     "compute_capability = [8.0, 0]", ["identity.compute_capability[0]", "8.0"]),
    ("zero channels for 2:4", GPU, "min_channels_for_2_4 = 256", "min_channels_for_2_4 = 0",
     ["capabilities.tensorrt.linear.min_channels_for_2_4", "is 0,"]),
    ("schema version 1.0", CPU, "schema_version = 1", "schema_version = 1.0",
     ["schema_version", "1.0"]),
    ("nan latency", CPU, "[measured]", "[measured]" + MEASURED_ENTRY.replace("0.12", "nan"),
     ["measured.entries[0].latency_ms", "is nan", "(milliseconds)"]),
    ("latency of a century", CPU, "[measured]", "[measured]" + MEASURED_ENTRY.replace(
        "0.12", "3.2e12"), ["measured.entries[0].latency_ms", "3200000000000"]),
    ("zero dimension", CPU, "[measured]", "[measured]" + MEASURED_ENTRY.replace(
        "[1, 768, 768]", "[1, 0, 768]"), ["measured.entries[0].shape[1]", "is 0,"]),
    ("date as an integer", CPU, "[measured]", "[measured]" + MEASURED_ENTRY.replace(
        "2025-01-31", "20250131"), ["measured.entries[0].date", "20250131"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("base", "old", "new", "fragments"),
    [case[1:] for case in NUMBER_CASES],
    ids=[case[0] for case in NUMBER_CASES],
)
def test_implausible_number_names_file_key_and_value(tmp_path, base, old, new, fragments):
    text = packaged_text(base)
    assert old in text
    path = tmp_path / "custom.toml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert_one_line(info, str(path), *fragments)


def test_bounds_are_inclusive_ranges_that_refuse_nan_and_bools():
    for key, bounds in NUMBER_BOUNDS.items():
        assert 0 <= bounds.low < bounds.high, key
        assert bounds.admits(bounds.low) and bounds.admits(bounds.high), key
        for value in (float("nan"), float("inf"), True, str(bounds.high), bounds.high * 2):
            assert not bounds.admits(value), (key, value)


def test_text_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    text = packaged_text(CPU).replace("(Ice Lake-SP)", "(Ice Lake-SP, café)")
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert_one_line(info, str(path), "not UTF-8", "byte 0xe9 at line 11", "Save the file as UTF-8")
    assert isinstance(info.value.__cause__, UnicodeDecodeError)


def test_arrays_nested_too_deeply(tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text(packaged_text(CPU) + "\nx = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert_one_line(info, str(path), "nested too deeply")


@pytest.mark.parametrize(
    ("target", "suggested"),
    [
        ("a100", "nvidia/a100"),
        ("xeon-icx", "intel/xeon-icx"),
        ("A100", "nvidia/a100"),
        ("Nvidia/H100", "nvidia/h100"),
        ("h10", "nvidia/h100"),
        ("nvidia/a1000", "nvidia/a100"),
        ("xeon-icxx", "intel/xeon-icx"),
    ],
)
def test_unknown_target_suggests_the_packaged_id(target, suggested):
    with pytest.raises(ProfileError) as info:
        resolve_target(target)
    assert_one_line(info, f"unknown hardware profile {target!r}", f"Did you mean {suggested!r}?")


def test_unknown_target_with_nothing_close_lists_the_known_ids():
    with pytest.raises(ProfileError) as info:
        resolve_target("tpu-v9")
    message = assert_one_line(info, "'tpu-v9'", "nvidia/a100", "intel/xeon-icx", "'auto'")
    assert "Did you mean" not in message


def test_target_with_a_line_break_stays_on_one_line():
    with pytest.raises(ProfileError) as info:
        resolve_target("nvidia/a100\nrm")
    assert_one_line(info, r"'nvidia/a100\nrm'")


def test_file_named_without_toml_suffix(tmp_path):
    path = tmp_path / "my-cpu.txt"
    path.write_text(packaged_text(CPU))
    with pytest.raises(ProfileError) as info:
        resolve_target(str(path))
    assert_one_line(info, str(path), "must end in .toml")


@pytest.mark.parametrize("where", ["missing", "directory", "missing folder", "file as folder"])
def test_toml_path_that_is_not_a_readable_file(tmp_path, where):
    (tmp_path / "adir.toml").mkdir()
    (tmp_path / "afile").write_text("")
    path, problem = {
        "missing": (tmp_path / "nope.toml", "it does not exist"),
        "directory": (tmp_path / "adir.toml", "it is a directory, not a file"),
        "missing folder": (tmp_path / "nope" / "x.toml", "it does not exist"),
        "file as folder": (tmp_path / "afile" / "x.toml", "it does not exist"),
    }[where]
    for target in (path, str(path)):
        loader = load_profile if isinstance(target, Path) else resolve_target
        with pytest.raises(ProfileError) as info:
            loader(target)  # type: ignore[operator]
        assert_one_line(info, f"cannot read hardware profile file {str(path)!r}: {problem}.")


def test_missing_toml_named_like_a_packaged_profile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for target, packaged in [("a100.toml", "nvidia/a100"), ("intel/xeon-icx.toml", CPU)]:
        with pytest.raises(ProfileError) as info:
            resolve_target(target)
        assert_one_line(info, "it does not exist", f"packaged profile {packaged!r}")


def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.toml"
    path.write_text(packaged_text(CPU))
    path.chmod(0)
    try:
        try:
            path.read_bytes()
        except PermissionError:
            pass
        else:
            pytest.skip("this user reads files whatever their mode (root)")
        with pytest.raises(ProfileError) as info:
            load_profile(path)
        assert_one_line(info, str(path), "Permission denied")
    finally:
        path.chmod(0o644)
