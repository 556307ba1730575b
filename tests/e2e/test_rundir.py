"""deploycomp never deletes or overwrites what it did not write: run directories are recognised by
a marker, replaced by a swap under a lock, and cleaned up after signals and killed runs."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from deploycomp import rundir
from deploycomp.cli import main
from deploycomp.errors import OutputDirError
from deploycomp.rundir import MARKER, RunDirectory

QUICK = ["--rounds", "1", "--eval-limit", "64", "--batch-sizes", "1", "--backend", "onnxruntime"]

ENTRYPOINT = textwrap.dedent('''
    import time
    from pathlib import Path

    import numpy as np
    import torch

    def good():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4)).eval()
        x = np.random.default_rng(0).standard_normal((64, 1, 4, 4)).astype(np.float32)
        return {"model": model, "example_inputs": {"input": x[:1]},
                "calibration": [{"input": x[:32]}, {"input": x[32:]}]}

    def slow():
        Path(__file__).with_name("started").write_text("")
        time.sleep(120)
''')


@pytest.fixture
def user_model(tmp_path):
    path = tmp_path / "user_model.py"
    path.write_text(ENTRYPOINT)
    return path


def compile_cli(capsys, user_model, out, *extra):
    code = main(["compile", f"{user_model}:good", "-o", str(out), *QUICK, *extra])
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("deploycomp: error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_a_stray_run_json_does_not_make_a_run_directory(capsys, tmp_path, user_model):
    out = tmp_path / "x"
    out.mkdir()
    (out / "run.json").write_text("{}")
    (out / "thesis.tex").write_text("years of work")
    code, err = compile_cli(capsys, user_model, out)
    assert code == 1 and "not a deploycomp run" in one_error_line(err)
    assert (out / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in out.iterdir()) == ["run.json", "thesis.tex"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("where", [".", "..", "~", "/"])
def test_current_ancestor_home_and_root_are_refused(capsys, tmp_path, monkeypatch, where):
    home = tmp_path / "home"
    work = home / "project"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    target = str(home) if where == "~" else where
    code = main(["compile", "fmnist-cnn", "-o", target])
    line = one_error_line(capsys.readouterr().err)
    assert code == 1 and "pass -o with a new directory" in line
    assert (work / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt"]


def test_a_run_is_replaced_whole_and_files_deploycomp_did_not_write_are_kept(
    capsys, tmp_path, user_model
):
    out = tmp_path / "out"
    assert compile_cli(capsys, user_model, out)[0] == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["deploycomp_version"] and marker["run_id"] and "report.md" in marker["files"]
    first_id = marker["run_id"]
    (out / "notes.txt").write_text("my notes")
    code, err = compile_cli(capsys, user_model, out)
    line = one_error_line(err)
    assert code == 1 and "notes.txt" in line and "did not write" in line
    assert (out / "notes.txt").read_text() == "my notes"
    assert json.loads((out / MARKER).read_text())["run_id"] == first_id
    (out / "notes.txt").unlink()
    assert compile_cli(capsys, user_model, out)[0] == 0
    assert json.loads((out / MARKER).read_text())["run_id"] != first_id
    assert leftovers(tmp_path) == []


def test_a_replace_that_fails_midway_leaves_the_old_run_whole(
    capsys, tmp_path, user_model, monkeypatch
):
    out = tmp_path / "out"
    assert compile_cli(capsys, user_model, out)[0] == 0
    before = {p: (out / p).read_bytes() for p in rundir._files_under(out)}
    real_rename = os.rename

    def rename_fails_moving_the_new_run_in(src, dst):
        if str(src).endswith(".partial"):
            raise OSError(28, "No space left on device", str(dst))
        return real_rename(src, dst)

    monkeypatch.setattr(rundir.os, "rename", rename_fails_moving_the_new_run_in)
    code, err = compile_cli(capsys, user_model, out)
    assert code == 1 and "no space is left" in one_error_line(err)
    assert {p: (out / p).read_bytes() for p in rundir._files_under(out)} == before
    assert leftovers(tmp_path) == []


def test_a_second_compile_into_a_locked_output_gets_one_line(tmp_path, user_model):
    out = tmp_path / "out"
    with RunDirectory(out):  # another run holds the lock (flock works across processes)
        proc = subprocess.run(
            [sys.executable, "-m", "deploycomp", "compile", f"{user_model}:good", "-o", str(out),
             *QUICK], capture_output=True, text=True, timeout=300, check=False,
        )
    assert proc.returncode == 1
    assert "another deploycomp run is writing" in one_error_line(proc.stderr)
    assert not out.exists() and leftovers(tmp_path) == []


def _start_slow(tmp_path, user_model):
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploycomp", "compile", f"{user_model}:slow", "-o",
         str(tmp_path / "out")], stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "started").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.1)
    assert [n for n in leftovers(tmp_path) if n.endswith(".partial")]
    return proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signals_clean_up_like_ctrl_c(tmp_path, user_model, signum):
    proc = _start_slow(tmp_path, user_model)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert err.strip().splitlines()[-1].startswith("deploycomp: interrupted")
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_later_run_removes_what_a_killed_run_left(capsys, tmp_path, user_model):
    proc = _start_slow(tmp_path, user_model)
    proc.kill()  # SIGKILL: no clean-up is possible
    proc.communicate(timeout=60)
    assert [n for n in leftovers(tmp_path) if n.endswith(".partial")]
    (tmp_path / ".unrelated.partial").mkdir()  # not deploycomp's: never touched
    assert compile_cli(capsys, user_model, tmp_path / "out")[0] == 0
    assert leftovers(tmp_path) == [".unrelated.partial"]


def test_a_run_moved_aside_by_a_killed_swap_is_restored(tmp_path, user_model, capsys):
    out = tmp_path / "out"
    assert compile_cli(capsys, user_model, out)[0] == 0
    run_id = json.loads((out / MARKER).read_text())["run_id"]
    os.rename(out, tmp_path / ".out.deadbeef.old")  # killed between the swap's two renames
    with RunDirectory(out):
        assert json.loads((out / MARKER).read_text())["run_id"] == run_id


def test_outputs_get_ordinary_permissions_under_the_umask(capsys, tmp_path, user_model):
    old = os.umask(0o022)
    try:
        assert compile_cli(capsys, user_model, tmp_path / "out")[0] == 0
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for name in ("report.md", "report.html", "report.json", "plan.json", "model.onnx", MARKER):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


def test_report_writes_only_into_a_run_directory(capsys, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "run.json").write_text("{}")
    code = main(["report", str(folder)])
    assert code == 1 and "not a deploycomp run directory" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in folder.iterdir()) == ["run.json"]


def test_output_through_a_symlink_or_under_a_file(capsys, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    code = main(["compile", "fmnist-cnn", "-o", str(tmp_path / "link")])
    assert code == 1 and "symbolic link" in one_error_line(capsys.readouterr().err)
    (tmp_path / "file").write_text("x")
    code = main(["compile", "fmnist-cnn", "-o", str(tmp_path / "file" / "out")])
    assert code == 1 and "is a file, not a directory" in one_error_line(capsys.readouterr().err)
    assert (tmp_path / "file").read_text() == "x"


def _unwritable_dir(tmp_path: Path) -> Path:
    """A directory this user may not create files in: a read-only one, or (root ignores modes)
    a kernel file system that refuses new entries."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        return locked
    for candidate in (Path("/sys"), Path("/proc/sys")):
        try:
            (candidate / "deploycomp-probe").mkdir()
        except PermissionError:
            return candidate
        except OSError:
            continue
        (candidate / "deploycomp-probe").rmdir()
    pytest.skip("no directory here refuses writes to this user")


def test_an_output_the_user_may_not_write(capsys, tmp_path, user_model):
    parent = _unwritable_dir(tmp_path)
    before = sorted(p.name for p in parent.iterdir())
    code, err = compile_cli(capsys, user_model, parent / "deploycomp-out")
    assert code == 1 and "permission was denied" in one_error_line(err)
    assert sorted(p.name for p in parent.iterdir()) == before


def test_a_full_disk_is_blamed_on_the_disk_not_the_model(tmp_path, user_model):
    # A file size limit makes every large write fail as a full file system does (EFBIG).
    import resource

    def limit_writes():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    proc = subprocess.run(
        [sys.executable, "-m", "deploycomp", "compile", f"{user_model}:good", "-o",
         str(tmp_path / "out"), *QUICK], capture_output=True, text=True, timeout=300, check=False,
        preexec_fn=limit_writes,
    )
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc.stderr)
    assert "size limit" in line and "free space" in line
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_run_directory_refuses_before_any_work(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.txt").write_text("a")
    with pytest.raises(OutputDirError, match="not a deploycomp run"), RunDirectory(tmp_path / "out"):
        pytest.fail("the block must not run")
    assert leftovers(tmp_path) == []


def test_ctrl_c_while_modules_import_is_one_line(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploycomp", "compile", "fmnist-cnn", "-o", str(tmp_path / "out")],
        stderr=subprocess.PIPE, text=True,
    )
    time.sleep(1.5)  # past start-up, while torch, onnx and the backends import
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("deploycomp: interrupted")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def _mount_prefix(folder: Path, options: str) -> list[str] | None:
    """A command prefix that runs the rest in a mount namespace where ``folder`` is a tmpfs
    mounted with ``options``, or None where this machine allows no such namespace."""
    import shutil

    if shutil.which("unshare") is None:
        return None
    for flags in (["--user", "--map-root-user", "--mount"], ["--mount"]):
        mount = f'mount -t tmpfs -o {options} tmpfs "{folder}"'
        probe = ["unshare", *flags, "sh", "-c", f"{mount} && true"]
        if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
            return ["unshare", *flags, "sh", "-c", f'{mount} && exec "$0" "$@"']
    return None


@pytest.mark.parametrize(
    "options, phrases",
    [("ro", ("the file system is read-only",)),
     # a full disk: ENOSPC, or a runtime's own words while 0 MiB are free
     ("size=16k", ("free space or pass -o", "no space is left|MiB free"))],
    ids=["read-only", "full"],
)
def test_an_output_on_a_read_only_or_full_file_system(tmp_path, user_model, options, phrases):
    folder = tmp_path / "mounted"
    folder.mkdir()
    prefix = _mount_prefix(folder, options)
    if prefix is None:
        pytest.skip("no mount namespace can be made here to hold a small or read-only tmpfs")
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "deploycomp", "compile", f"{user_model}:good", "-o",
         str(folder / "out"), *QUICK], capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc.stderr)
    for phrase in phrases:
        assert any(p in line for p in phrase.split("|")), line
