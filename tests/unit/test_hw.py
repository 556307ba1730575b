"""Hardware profiles: packaged files load, malformed files fail clearly, detection picks right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploycomp.errors import ProfileError
from deploycomp.hw import (
    HardwareProfile,
    HostInfo,
    choose_profile,
    describe_host,
    detect_host,
    list_profiles,
    load_profile,
    resolve_target,
)
from deploycomp.hw.detect import parse_cpuinfo

PACKAGED = [
    "generic/x86-64-avx2",
    "intel/core-avxvnni",
    "intel/xeon-icx",
    "intel/xeon-spr",
    "nvidia/a10",
    "nvidia/a100",
    "nvidia/h100",
]

MINIMAL = """\
schema_version = 1

[identity]
name = "Test CPU"
kind = "cpu"
vendor = "intel"
architecture = "avx512_vnni"
isa_flags = ["avx512f", "avx512_vnni"]
backends = ["onnxruntime"]

[compute]
cores = 4

[memory]
bandwidth_gbs = 50.0
llc_mib = 8

[peak_tops]
fp32 = { dense = 1.0 }
int8 = { dense = 4.0 }

[capabilities.onnxruntime.linear]
weight_schemes = ["fp32", "int8_sym_per_channel"]
activation_schemes = ["fp32", "uint8_per_tensor"]
weight_only_schemes = ["int4_sym_group128"]
"""


def write_profile(tmp_path: Path, text: str, name: str = "custom.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def profiles() -> list[HardwareProfile]:
    return list_profiles()


# ---------------------------------------------------------------------------------------------
# packaged profiles


def test_every_packaged_profile_loads_sorted(profiles):
    assert [p.id for p in profiles] == PACKAGED
    for profile in profiles:
        assert load_profile(profile.id) == profile
        assert profile.source == f"hw_profiles/{profile.id}.toml"
        assert profile.measured == ()
        assert HardwareProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile


def test_profiles_follow_their_kind(profiles):
    for profile in profiles:
        if profile.kind == "gpu":
            assert profile.compute_capability and profile.sm_count and not profile.isa_flags
            assert profile.backends == ("tensorrt", "torch", "onnxruntime")
        else:
            assert profile.isa_flags and profile.cores and profile.compute_capability is None
            assert all(peak.sparse_tops is None for peak in profile.peak_tops.values())
            for ops in profile.capabilities.values():
                assert all(cap.sparsity == () for cap in ops.values())


def test_peak_ops_per_s():
    a100 = load_profile("nvidia/a100")
    assert a100.peak_ops_per_s("int8") == pytest.approx(624e12)
    assert a100.peak_ops_per_s("int8", sparse=True) == pytest.approx(1248e12)
    assert a100.peak_ops_per_s("fp32", sparse=True) == pytest.approx(19.5e12)
    spr = load_profile("intel/xeon-spr")
    assert spr.peak_ops_per_s("int8", sparse=True) == spr.peak_ops_per_s("int8")
    with pytest.raises(ProfileError, match="int4"):
        spr.peak_ops_per_s("int4")


def test_accelerates_on_tensorrt():
    a100 = load_profile("nvidia/a100")
    w8, a8 = "int8_sym_per_channel", "int8_sym_per_tensor"
    assert a100.accelerates("tensorrt", "conv2d", w8, a8)
    assert a100.accelerates("tensorrt", "linear", w8, a8, "2:4", channels=1024)
    assert not a100.accelerates("tensorrt", "linear", w8, a8, "2:4", channels=64)
    assert a100.accelerates("tensorrt", "linear", "int4_sym_group128", "fp16")
    assert not a100.accelerates("tensorrt", "linear", "int4_sym_group128", a8)
    assert not a100.accelerates("tensorrt", "conv2d", "int4_sym_group128", "fp16")
    assert not a100.accelerates("tensorrt", "linear", "int4_sym_group128", "fp16", "2:4")
    assert not a100.accelerates("tensorrt", "conv2d_depthwise", w8, a8, "2:4")
    assert not a100.accelerates("openvino", "linear", w8, a8)
    with pytest.raises(ValueError, match="int8_sym_per_channel"):
        a100.accelerates("tensorrt", "linear", "int8_per_channel", a8)


def test_no_cpu_backend_accelerates_2_4(profiles):
    for profile in profiles:
        if profile.kind != "cpu":
            continue
        assert profile.accelerates(
            profile.backends[0], "linear", "int8_sym_per_channel", "uint8_per_tensor"
        )
        for backend in profile.backends:
            assert not profile.accelerates(
                backend, "linear", "int8_sym_per_channel", "uint8_per_tensor", "2:4"
            )


def test_embedding_tables_are_weight_only_on_cpus_and_float_on_gpus(profiles):
    for profile in profiles:
        for backend in profile.backends:
            cap = profile.capabilities[backend]["embedding"]
            assert profile.accelerates(backend, "embedding", "fp32", "fp32")
            assert not profile.accelerates(backend, "embedding", "int8_sym_per_channel",
                                           "int8_sym_per_tensor")  # fmt: skip
            for scheme in ("int8_sym_per_channel", "int4_sym_group128"):
                weight_only = profile.accelerates(backend, "embedding", scheme, "fp32")
                assert weight_only == (profile.kind == "cpu"), (profile.id, backend, scheme)
            # Both gather compressed rows: OpenVINO from its compressed constants, ONNX Runtime
            # through the lowerer's GatherBlockQuantized rewrite.
            assert cap.weight_only_fused


# ---------------------------------------------------------------------------------------------
# strict loading


def test_user_file_loads(tmp_path):
    path = write_profile(tmp_path, MINIMAL)
    profile = load_profile(path)
    assert profile.id == str(path) and profile.kind == "cpu"
    assert profile.accelerates("onnxruntime", "linear", "int4_sym_group128", "fp32")
    assert load_profile(str(path)) == profile


@pytest.mark.parametrize(
    ("old", "new", "key", "expected"),
    [
        ("cores = 4", "cores = 4\nthreads = 8", "compute.threads", "unknown key"),
        ("bandwidth_gbs = 50.0", 'bandwidth_gbs = "fast"', "memory.bandwidth_gbs", "'fast'"),
        ("cores = 4", "cores = 4.5", "compute.cores", "positive integer"),
        ('"uint8_per_tensor"]', '"uint8_per_tensr"]', "activation_schemes[1]", "uint8_per_tensor"),
        ('["int4_sym_group128"]', '["int4_group128"]', "weight_only_schemes[0]", "int4_sym_"),
        ("fp32 = { dense = 1.0 }", "fp23 = { dense = 1.0 }", "peak_tops.fp23", "fp32"),
        ('backends = ["onnxruntime"]', 'backends = ["ort"]', "identity.backends[0]", "onnxrunt"),
        (
            'isa_flags = ["avx512f", "avx512_vnni"]',
            'isa_flags = ["avx512vnni"]',
            "isa_flags[0]",
            "avx512_vnni",
        ),
        ("llc_mib = 8\n", "", "memory.llc_mib", "missing required key"),
        ('kind = "cpu"', 'kind = "npu"', "identity.kind", "cpu, gpu"),
        ('kind = "cpu"', 'kind = "gpu"', "identity.isa_flags", "no ISA flags"),
        ("schema_version = 1", "schema_version = 2", "schema_version", "expected 1"),
        (
            'activation_schemes = ["fp32", "uint8_per_tensor"]',
            'activation_schemes = "fp32"',
            "activation_schemes",
            "a list",
        ),
        (
            'weight_only_schemes = ["int4_sym_group128"]',
            'weight_only_schemes = ["int4_sym_group128"]\nweight_only_fused = "no"',
            "capabilities.onnxruntime.linear.weight_only_fused",
            "true or false",
        ),
    ],
)
def test_malformed_profile_names_file_and_key(tmp_path, old, new, key, expected):
    assert old in MINIMAL
    path = write_profile(tmp_path, MINIMAL.replace(old, new, 1))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert str(path) in message
    assert key in message
    assert expected in message


def test_missing_capabilities_for_a_listed_backend(tmp_path):
    text = MINIMAL.replace('backends = ["onnxruntime"]', 'backends = ["openvino", "onnxruntime"]')
    with pytest.raises(ProfileError, match=r"missing required key 'capabilities\.openvino'"):
        load_profile(write_profile(tmp_path, text))


def test_measured_entries_are_checked(tmp_path):
    entry = """
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
    profile = load_profile(write_profile(tmp_path, MINIMAL + entry))
    (measured,) = profile.measured
    assert measured.date == "2025-01-31" and measured.sparsity == "none"
    assert measured.shape == (1, 768, 768)
    bad = MINIMAL + entry.replace("latency_ms = 0.12", "latency_ms = -1")
    with pytest.raises(ProfileError, match=r"measured\.entries\[0\]\.latency_ms"):
        load_profile(write_profile(tmp_path, bad, "bad.toml"))


def test_bad_toml_syntax_names_file(tmp_path):
    path = write_profile(tmp_path, MINIMAL.replace("[memory]", "[memory"))
    with pytest.raises(ProfileError, match="not valid TOML") as info:
        load_profile(path)
    assert str(path) in str(info.value)
    assert info.value.__cause__ is not None


def test_missing_file(tmp_path):
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("typo", "closest"), [("nvidia/a1000", "nvidia/a100"), ("xeon-spr", "intel/xeon-spr")]
)
def test_unknown_id_lists_known_and_closest(typo, closest):
    with pytest.raises(ProfileError) as info:
        load_profile(typo)
    message = str(info.value)
    assert f"Did you mean {closest!r}?" in message
    assert all(pid in message for pid in PACKAGED)


# ---------------------------------------------------------------------------------------------
# detection


def host(flags: str, name: str = "Some CPU", vendor: str = "", gpu=None, cc=None) -> HostInfo:
    return HostInfo(name, tuple(flags.split()), 8, "x86_64", vendor, gpu, cc)


AVX2 = "sse4_2 avx avx2 fma f16c"
AVX512 = AVX2 + " avx512f avx512bw avx512vl avx512dq avx512cd avx512_vnni"


@pytest.mark.parametrize(
    ("flags", "vendor", "expected"),
    [
        (AVX512 + " avx512_bf16 amx_tile amx_int8 amx_bf16 avx_vnni", "intel", "intel/xeon-spr"),
        (AVX512, "intel", "intel/xeon-icx"),
        (AVX512 + " avx512_bf16", "amd", "intel/xeon-icx"),
        (AVX2 + " avx_vnni", "intel", "intel/core-avxvnni"),
        (AVX2, "amd", "generic/x86-64-avx2"),
        (AVX2 + " avx_vnni avx512f avx512bw avx512vl avx512_vnni", "amd", "intel/xeon-icx"),
        ("sse4_2 avx", "intel", "generic/x86-64-avx2"),
    ],
)
def test_cpu_choice_by_instruction_set(profiles, flags, vendor, expected):
    resolution = choose_profile(host(flags, vendor=vendor), profiles)
    assert resolution.profile.id == expected
    assert resolution.is_host
    assert expected in resolution.reason and "Some CPU" in resolution.reason


def test_amd_avx512_reason_says_not_a_vendor_match(profiles):
    epyc = host(AVX512 + " avx512_bf16", name="AMD EPYC", vendor="amd")
    reason = choose_profile(epyc, profiles).reason
    assert "avx512_vnni, avx512_bf16, no amx" in reason
    assert "no vendor profile matches exactly" in reason and "Intel's" in reason


@pytest.mark.parametrize(
    ("gpu", "cc", "expected", "exact"),
    [
        ("NVIDIA A100-SXM4-80GB", (8, 0), "nvidia/a100", True),
        ("NVIDIA A30", (8, 0), "nvidia/a100", False),
        ("NVIDIA GeForce RTX 3090", (8, 6), "nvidia/a10", False),
        ("NVIDIA L4", (8, 9), "nvidia/a10", False),
        ("NVIDIA H100 80GB HBM3", (9, 0), "nvidia/h100", True),
        ("NVIDIA B200", (10, 0), "nvidia/h100", False),
        ("Tesla T4", (7, 5), "nvidia/a100", False),
    ],
)
def test_gpu_choice_by_compute_capability(profiles, gpu, cc, expected, exact):
    resolution = choose_profile(host(AVX2, gpu=gpu, cc=cc), profiles)
    assert resolution.profile.id == expected
    assert gpu in resolution.reason
    assert ("not this GPU's" not in resolution.reason) == exact


def test_parse_cpuinfo():
    text = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fma avx2\n"
    )
    assert parse_cpuinfo(text) == ("AMD EPYC", "amd", ("avx2", "fma"))


def test_resolve_named_target_says_whether_it_is_this_host(profiles):
    spr_host = host(AVX512 + " avx512_bf16 amx_tile amx_int8 amx_bf16", vendor="intel")
    assert resolve_target("intel/xeon-spr", host=spr_host).is_host
    named = resolve_target("intel/xeon-icx", host=spr_host)
    assert named.profile.id == "intel/xeon-icx" and not named.is_host
    assert "different device" in named.reason
    assert not resolve_target("nvidia/a100", host=spr_host).is_host


def test_auto_on_this_host():
    resolution = resolve_target("auto", host=detect_host(include_gpu=False))
    assert resolution.is_host
    assert resolution.profile.id in resolution.reason
    line = describe_host(detect_host(include_gpu=False))
    assert "cores" in line and "\n" not in line
