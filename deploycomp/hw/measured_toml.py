"""Write a hardware profile file with measured layer timings, atomically and verified.

Takes a base hardware profile and ``MeasuredEntry`` rows (from :func:`deploycomp.hw.sweep.sweep`)
and writes the base's TOML text, comments included, with its ``[measured]`` table replaced by the
base's entries merged with the new ones (:func:`merge_entries`). The file is written under a
temporary name, loaded back and compared with what was meant, and only then renamed into place;
:func:`write_measured_profile` returns the path written.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.resources
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from deploycomp.errors import OutputDirError, ProfileError
from deploycomp.hw.detect import describe_host
from deploycomp.hw.loader import NUMBER_BOUNDS, load_profile
from deploycomp.hw.profile import HardwareProfile, MeasuredEntry
from deploycomp.rundir import file_mode

HEADER_MARK = "# Written by `deploycomp calibrate-target`"
_TABLE_HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(#.*)?$")


def _base_text(hw_profile: HardwareProfile) -> str:
    """The TOML text ``hw_profile`` was loaded from (packaged data or a user's file)."""
    if hw_profile.source == f"hw_profiles/{hw_profile.id}.toml":
        item = importlib.resources.files("deploycomp.hw_profiles")
        for part in f"{hw_profile.id}.toml".split("/"):
            item = item.joinpath(part)
        return item.read_text(encoding="utf-8")
    try:
        return Path(hw_profile.source).read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(
            f"cannot read the base hardware profile {hw_profile.id!r} from "
            f"{hw_profile.source!r}: {exc.strerror or exc}. Pass a profile loaded with "
            f"load_profile() from a packaged id or an existing .toml file."
        ) from exc


def _without_measured(text: str) -> str:
    """``text`` less a header written by this tool and every ``[measured...]`` table."""
    lines = text.splitlines()
    if lines and lines[0].startswith(HEADER_MARK):
        end = next((i for i, line in enumerate(lines) if not line.strip()), len(lines))
        lines = lines[end + 1 :]
    kept, in_measured = [], False
    for line in lines:
        match = _TABLE_HEADER.match(line)
        if match:
            name = match.group(1).replace('"', "").replace("'", "").replace(" ", "")
            in_measured = name == "measured" or name.startswith("measured.")
        if not in_measured:
            kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    return "\n".join(kept) + "\n"


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string (ASCII, escaped) is a valid TOML basic string


def _entry_toml(entry: MeasuredEntry) -> str:
    bounds = NUMBER_BOUNDS["measured.entries[].latency_ms"]
    if not bounds.admits(entry.latency_ms):
        raise ProfileError(
            f"measured latency {entry.latency_ms!r} ms of {entry.backend} {entry.op_kind} "
            f"{entry.shape} ({entry.weight_scheme}, {entry.activation_scheme}) is not "
            f"{bounds.describe()}; measure again (rounds >= 1) before writing the profile."
        )
    fields = {f.name: getattr(entry, f.name) for f in dataclasses.fields(entry)}
    lines = ["[[measured.entries]]"]
    for name, value in fields.items():
        if isinstance(value, str):
            lines.append(f"{name} = {_toml_string(value)}")
        elif isinstance(value, tuple):
            lines.append(f"{name} = [{', '.join(str(int(v)) for v in value)}]")
        else:
            lines.append(f"{name} = {float(value)!r}")
    return "\n".join(lines) + "\n"


def _lookup_key(e: MeasuredEntry) -> tuple:
    return (e.backend, e.op_kind, e.shape, e.weight_scheme, e.activation_scheme, e.sparsity)


def merge_entries(
    base: Sequence[MeasuredEntry], new: Sequence[MeasuredEntry]
) -> tuple[MeasuredEntry, ...]:
    """The new entries plus the base's entries of the same device(s) for other lookup keys.

    A written profile holds timings of one machine: a base entry measured on another device is
    dropped, and one with the lookup key of a new entry (backend, op kind, shape, schemes,
    sparsity) is replaced. Re-running calibrate-target on its own output with another model
    therefore accumulates that model's shapes.
    """
    devices = {e.device for e in new}
    keys = {_lookup_key(e) for e in new}
    kept = [e for e in base if e.device in devices and _lookup_key(e) not in keys]
    return tuple(kept) + tuple(new)


def check_out_path(out_path: str | Path) -> Path:
    """Validate where a profile will be written, before any work; returns it as a Path.

    Raises:
        OutputDirError: Not a ``.toml`` path, a directory, or its folder is missing or a file.
    """
    out = Path(out_path)
    parent = out.parent
    if out.suffix != ".toml":
        raise OutputDirError(
            f"hardware profile output {str(out)!r} does not end in .toml; pass -o with a path "
            f"such as {str(out.with_suffix('.toml'))!r} (--target reads a .toml path as a file)."
        )
    if out.is_dir():
        raise OutputDirError(
            f"hardware profile output {str(out)!r} is a directory; pass -o with a file path "
            f"such as {str(out / 'my-cpu.toml')!r}."
        )
    if not parent.is_dir():
        what = "is a file, not a directory" if parent.exists() else "does not exist"
        raise OutputDirError(
            f"cannot write hardware profile {str(out)!r}: folder {str(parent)!r} {what}. "
            "Create the folder first or pass -o with a path in an existing folder."
        )
    if out.is_file() and not _written_by_calibrate(out):
        raise OutputDirError(
            f"hardware profile output {str(out)!r} exists and was not written by "
            "'deploycomp calibrate-target'; deploycomp does not overwrite it. Pass -o with a new "
            "path, or move the file away."
        )
    try:  # a writable folder is checked now, not after the timing
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        raise OutputDirError(
            f"cannot write hardware profile {str(out)!r}: folder {str(parent)!r} is not writable "
            f"({exc.strerror or exc}). Pass -o with a path in a folder you can write to."
        ) from exc
    return out


def _written_by_calibrate(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(HEADER_MARK)).decode("utf-8", "replace") == HEADER_MARK
    except OSError:
        return False


def write_measured_profile(
    base: HardwareProfile, entries: Sequence[MeasuredEntry], out_path: str | Path
) -> Path:
    """Write ``base``'s TOML with its ``[measured]`` table replaced by ``entries``, atomically.

    The file keeps every other table of the base text, comments included, and starts with a
    comment naming this tool, the date and the host. Base entries are merged as
    :func:`merge_entries` says. The file is written to a temporary name, loaded back with
    ``load_profile`` and compared with the base and the entries, and only then renamed into
    place: a file the loader would reject is never left behind.

    Args:
        base: The profile the timings refine (``load_profile`` / ``resolve_target``).
        entries: The new timings, e.g. from :func:`deploycomp.hw.sweep.sweep`.
        out_path: A ``.toml`` path in an existing folder; an existing file is replaced.

    Returns:
        The path written.

    Raises:
        OutputDirError: The path cannot be written. ProfileError: The base text cannot be read,
            a latency is not positive and finite, or the written file does not load back equal.

    Example:
        >>> write_measured_profile(load_profile("intel/xeon-icx"), entries, "my-cpu.toml")
        PosixPath('my-cpu.toml')
    """
    out = check_out_path(out_path)
    merged = merge_entries(base.measured, entries)
    body = _without_measured(_base_text(base))
    devices = sorted({" ".join(e.device.split()) for e in entries}) or [describe_host()]
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    header = (
        f"{HEADER_MARK} on {when}, host {'; '.join(devices)}.\n"
        f"# Base profile: {base.id} ({base.source}). [measured] holds {len(merged)} timings of "
        "that host; every other table is copied from the base.\n\n"
    )
    measured = "[measured]\n" + "".join(f"\n{_entry_toml(e)}" for e in merged)
    text = f"{header}{body}\n{measured}"
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}.", suffix=".toml")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            loaded = load_profile(tmp)
        except ProfileError as exc:
            raise ProfileError(
                f"the hardware profile written for {str(out)!r} does not load ({exc}); nothing "
                f"was written. This is a bug: report it with the base profile {base.id!r}."
            ) from exc
        same_base = (
            dataclasses.replace(loaded, id=base.id, source=base.source, measured=base.measured)
            == base
        )
        if not same_base or loaded.measured != merged:
            raise ProfileError(
                f"the hardware profile written for {str(out)!r} does not load back as written "
                f"(base tables equal: {same_base}; measured entries equal: "
                f"{loaded.measured == merged}). This is a bug: report it with the base profile "
                f"{base.id!r}."
            )
        os.chmod(tmp, file_mode())
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputDirError(
            f"cannot write hardware profile {str(out)!r}: {exc.strerror or exc}. Pass -o with "
            "a writable path."
        ) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
