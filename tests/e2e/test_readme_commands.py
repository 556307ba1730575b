"""Every command in README.md's bash blocks runs as written.

Training is shortened to a few steps (``--steps``, ``--prune-steps``) and latency to one round, so
the suite stays short; a few steps cannot reach the accuracy the full command reaches, so those
runs also pass ``--no-accuracy-guard``. Everything else is the README's text. ``scripts/test.sh``
is what runs this file (and CI runs it), so it is not run again here.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FEW_STEPS = "3"
BUDGET_FLAGS = ("--latency-target", "--size-target", "--max-accuracy-drop")


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.DOTALL)


def readme_commands() -> list[str]:
    commands = []
    for block in readme_blocks("bash"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] != "scripts/test.sh":
                commands.append(shlex.join(words))
    return commands


def shortened(words: list[str]) -> list[str]:
    """The command with training cut to a few steps and latency to one round."""
    if words[:2] != ["deploycomp", "compile"]:
        return words
    out, trains, i = [], False, 0
    while i < len(words):
        flag = words[i]
        if flag in ("--epochs", "--steps", "--prune-steps"):
            out += ["--prune-steps" if flag == "--prune-steps" else "--steps", FEW_STEPS]
            trains, i = True, i + 2
            continue
        out.append(flag)
        i += 1
    if any(f in words for f in BUDGET_FLAGS) and "--steps" not in out:
        out += ["--steps", FEW_STEPS]
        trains = True
    if "--prune" in words and "--prune-steps" not in out and "--steps" not in out:
        out += ["--prune-steps", FEW_STEPS]
        trains = True
    out += ["--rounds", "1"]
    return out + (["--no-accuracy-guard"] if trains else [])


@pytest.fixture
def readme_workdir(tmp_path):
    """A directory holding what the README's commands read: my_model.py (the README's entrypoint
    example) and its images.npy / labels.npy, made from real Fashion-MNIST test images."""
    from deploycomp.zoo.fashion_mnist import load_split

    example = next(b for b in readme_blocks("python") if "def build" in b)
    (tmp_path / "my_model.py").write_text(example)
    images, labels = load_split("test")
    rgb = np.repeat(np.pad(images[:1256], ((0, 0), (2, 2), (2, 2))).astype(np.float32)[:, None]
                    / 255.0, 3, axis=1)
    np.save(tmp_path / "images.npy", rgb)
    np.save(tmp_path / "labels.npy", labels[:1256].astype(np.int64))
    return tmp_path


def test_the_readme_has_commands():
    commands = readme_commands()
    assert "scripts/demo.sh" in commands
    assert sum(c.startswith("deploycomp compile") for c in commands) >= 5


@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs(command, readme_workdir):
    words = shortened(shlex.split(command))
    if words[0] == "deploycomp":
        words = [sys.executable, "-m", "deploycomp", *words[1:]]
    else:
        words = ["bash", str(ROOT / words[0]), *words[1:]]
    proc = subprocess.run(words, cwd=readme_workdir, capture_output=True, text=True,
                          timeout=1200, check=False)
    assert proc.returncode == 0, f"{shlex.join(words)}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
