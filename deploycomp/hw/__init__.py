"""Hardware profiles: what a target device computes fast, loaded strictly from TOML, and detection
of this machine. ``resolve_target("auto")`` picks the packaged profile closest to this machine and
says why; ``load_profile`` takes a packaged id (``nvidia/a100``) or a user's ``.toml`` file."""

from deploycomp.hw.detect import (
    HostInfo,
    TargetResolution,
    choose_profile,
    describe_host,
    detect_host,
    resolve_target,
)
from deploycomp.hw.loader import list_profiles, load_profile
from deploycomp.hw.profile import HardwareProfile

__all__ = [
    "HardwareProfile",
    "HostInfo",
    "TargetResolution",
    "choose_profile",
    "describe_host",
    "detect_host",
    "list_profiles",
    "load_profile",
    "resolve_target",
]
