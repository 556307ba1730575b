"""Run directories: what deploycomp may write, replace and delete, and nothing else.

A run directory is recognised by a marker only deploycomp writes (:data:`MARKER`: a run id, the
version and the list of files the run wrote). A compile builds its run in a hidden ``.partial``
folder beside the output, holding a lock on the output's name, and swaps it in at the end:

1. the old run (if any) is moved aside to a hidden ``.old`` folder,
2. the new run is moved in,
3. the old run is deleted.

A failure at any step leaves the old run whole, and a later run into the same output finishes
what a killed one left: it restores a run left aside and removes stale ``.partial`` folders (the
lock says no process holds them). Files in an old run that deploycomp did not write are never
deleted: the compile is refused and lists them. An output that is the current directory, one of
its ancestors, the home directory or ``/`` is refused outright.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path

from typing_extensions import Self

from deploycomp._version import __version__
from deploycomp.errors import OutputDirError

MARKER = ".deploycomp-run"
_LOCK_SUFFIX = ".lock"
_PARTIAL_SUFFIX = ".partial"
_OLD_SUFFIX = ".old"
# What a write can fail with that is the file system's fault, not the model's.
DISK_ERRNOS = {errno.ENOSPC: "no space is left on the file system",
               errno.EDQUOT: "the disk quota is exhausted",
               errno.EFBIG: "a file exceeded the size limit (ulimit -f) or the file system's",
               errno.EROFS: "the file system is read-only",
               errno.EACCES: "permission was denied",
               errno.EPERM: "permission was denied"}
LOW_SPACE_BYTES = 16 << 20  # under this much free space a failed write is blamed on the disk


def file_mode() -> int:
    """The mode an ordinary new file gets under this process's umask (0o666 & ~umask)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode an ordinary new directory gets under this process's umask."""
    return 0o777 & ~_umask()


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def read_marker(run_dir: Path) -> dict | None:
    """The marker of a run directory, or None when ``run_dir`` holds no readable marker."""
    try:
        data = json.loads((run_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "run_id" in data else None


def _write_marker(run_dir: Path, destination: Path, files: list[str] | None) -> None:
    marker = {
        "run_id": uuid.uuid4().hex,
        "deploycomp_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "destination": str(destination),
        "state": "partial" if files is None else "complete",
        "files": files,
    }
    tmp = run_dir / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=2) + "\n")
    os.chmod(tmp, file_mode())
    os.replace(tmp, run_dir / MARKER)


def _files_under(folder: Path) -> list[str]:
    """Every file and symlink under ``folder``, relative, sorted (directories are implied)."""
    out = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        out += [str(rel / name) for name in files]
        out += [str(rel / name) for name in dirs if (Path(root) / name).is_symlink()]
    return sorted(p.removeprefix("./") for p in out)


def foreign_files(run_dir: Path) -> list[str]:
    """Files in ``run_dir`` that its marker does not list: deploycomp did not write them."""
    marker = read_marker(run_dir) or {}
    written = set(marker.get("files") or ()) | {MARKER}
    return [f for f in _files_under(run_dir) if f not in written]


def require_run_dir(run_dir: Path) -> None:
    """Refuse to write into ``run_dir`` unless it is a deploycomp run directory."""
    if not run_dir.is_dir():
        raise OutputDirError(
            f"run directory {str(run_dir)!r} does not exist or is not a directory; pass the -o "
            "directory of an earlier 'deploycomp compile'."
        )
    if read_marker(run_dir) is None:
        raise OutputDirError(
            f"{str(run_dir)!r} is not a deploycomp run directory (it has no {MARKER} marker); "
            "pass the -o directory of a compile made by this version of deploycomp."
        )


def check_output_dir(out_dir: Path) -> None:
    """Refuse an output that deploycomp must not write, replace or delete. Cheap: runs first."""
    shown = str(out_dir)
    if out_dir.is_symlink():
        raise OutputDirError(
            f"output directory {shown!r} is a symbolic link (to {os.readlink(out_dir)!r}); "
            "deploycomp replaces the output as a whole, so pass -o with the real path."
        )
    resolved = out_dir.resolve()
    for name, place in (("the root directory", Path("/")), ("your home directory", Path.home())):
        if resolved == place.resolve():
            raise OutputDirError(f"-o {shown!r} is {name}; pass -o with a new directory for "
                                 "the run, e.g. -o deploycomp-out.")
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        which = "the current directory" if resolved == cwd else "an ancestor of the current one"
        raise OutputDirError(f"-o {shown!r} is {which}; pass -o with a new directory for the "
                             "run, e.g. -o deploycomp-out.")
    for parent in reversed(resolved.parents):
        if parent.exists() and not parent.is_dir():
            raise OutputDirError(f"cannot create output directory {shown!r}: {str(parent)!r} is "
                                 "a file, not a directory; pass -o under a directory.")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(
            f"output directory {shown!r} is a file; pass -o with a directory path."
        )
    if out_dir.is_dir():
        _check_replaceable(out_dir)


def _check_replaceable(out_dir: Path) -> None:
    if not any(out_dir.iterdir()):
        return
    if read_marker(out_dir) is None:
        raise OutputDirError(
            f"output directory {str(out_dir)!r} is not empty and is not a deploycomp run (it "
            f"has no {MARKER} marker); pass -o with a new or empty directory (an earlier run's "
            "directory is replaced)."
        )
    stray = foreign_files(out_dir)
    if stray:
        listed = ", ".join(stray[:5]) + (f" and {len(stray) - 5} more" if len(stray) > 5 else "")
        raise OutputDirError(
            f"output directory {str(out_dir)!r} holds an earlier run and {len(stray)} file(s) "
            f"deploycomp did not write ({listed}); replacing the run would delete them. Move "
            "them out or pass another -o."
        )


def disk_error(exc: BaseException, out_dir: Path) -> OutputDirError | None:
    """An OutputDirError when ``exc`` (or what caused it) is the file system's fault."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in DISK_ERRNOS:
            where = cause.filename or out_dir.parent
            return OutputDirError(
                f"cannot write the run next to {str(out_dir)!r}: {DISK_ERRNOS[cause.errno]} "
                f"({str(where)!r}, {os.strerror(cause.errno)}); free space or pass -o on a "
                "writable file system with room."
            )
        cause = cause.__cause__ or cause.__context__
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(_existing_parent(out_dir)).free
        if free < LOW_SPACE_BYTES:
            return OutputDirError(
                f"the run failed while the file system holding {str(out_dir)!r} had "
                f"{free >> 20} MiB free ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                "free space or pass -o on another file system, then run again."
            )
    return None


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


class RunDirectory:
    """The output of one compile: a locked, hidden ``.partial`` folder swapped in at the end.

    Use as a context manager around the run; write into :attr:`path`, then call :meth:`commit`.
    Leaving the block without committing removes the partial folder and keeps the old run whole.
    """

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.path: Path | None = None  # the partial folder the run writes into
        self._lock_fd: int | None = None

    def __enter__(self) -> Self:
        check_output_dir(self.out_dir)
        parent = self.out_dir.absolute().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.destination = parent.resolve() / self.out_dir.name
            self._lock()
            self._recover()
            self.path = parent / f".{self.out_dir.name}.{uuid.uuid4().hex[:8]}{_PARTIAL_SUFFIX}"
            self.path.mkdir(mode=dir_mode())
            _write_marker(self.path, self.destination, None)
        except OSError as exc:
            self._release()
            raise _os_error(exc, self.out_dir) from exc
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.path is not None and self.path.exists():
                shutil.rmtree(self.path, ignore_errors=True)
        finally:
            self._release()
        if isinstance(exc, Exception) and not isinstance(exc, OutputDirError):
            blamed = disk_error(exc, self.out_dir)  # a full disk is not the model's fault
            if blamed is not None:
                raise blamed from exc

    def commit(self) -> None:
        """Swap the finished run into place; on any failure the old run stays whole."""
        if self.path is None:
            raise RuntimeError("RunDirectory.commit() called outside its with block")
        if self.out_dir.is_dir():
            _check_replaceable(self.out_dir)  # files may have appeared while the run ran
        _write_marker(self.path, self.destination, _files_under(self.path))
        aside = None
        if self.out_dir.exists():
            aside = self.path.with_name(f".{self.out_dir.name}.{uuid.uuid4().hex[:8]}{_OLD_SUFFIX}")
            os.rename(self.out_dir, aside)
        try:
            os.rename(self.path, self.out_dir)
        except BaseException:
            if aside is not None:
                os.rename(aside, self.out_dir)
            raise
        self.path = None
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)

    def _lock(self) -> None:
        lock = self.destination.with_name(f".{self.out_dir.name}{_LOCK_SUFFIX}")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputDirError(
                f"another deploycomp run is writing {str(self.out_dir)!r} (it holds "
                f"{lock.name!r}); wait for it to finish or pass another -o."
            ) from None
        self._lock_fd, self._lock_path = fd, lock

    def _release(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                self._lock_path.unlink()
            os.close(self._lock_fd)
            self._lock_fd = None

    def _recover(self) -> None:
        """Finish what a killed run into the same output left (we hold the lock: nobody else
        is writing it): restore a run moved aside, remove stale partial and old folders."""
        destination = str(self.destination)
        for leftover in sorted(self.destination.parent.glob(f".{self.out_dir.name}.*")):
            marker = read_marker(leftover) if leftover.is_dir() else None
            if marker is None or marker.get("destination") != destination:
                continue
            if leftover.name.endswith(_OLD_SUFFIX) and not self.out_dir.exists():
                os.rename(leftover, self.out_dir)  # killed between the two renames
            elif leftover.name.endswith((_PARTIAL_SUFFIX, _OLD_SUFFIX)):
                shutil.rmtree(leftover, ignore_errors=True)


def _os_error(exc: OSError, out_dir: Path) -> OutputDirError:
    reason = DISK_ERRNOS.get(exc.errno or 0, exc.strerror or str(exc))
    return OutputDirError(
        f"cannot write output directory {str(out_dir)!r}: {reason} ({exc.strerror}: "
        f"{exc.filename!r}); pass -o in a directory you can write to."
    )
