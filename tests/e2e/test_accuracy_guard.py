"""A compile whose engines ruined the model writes its report and exits 1; the user can accept
the loss explicitly."""

from deploycomp.cli import main
from deploycomp.rundir import MARKER

# keeping 10% of every channel group with two training steps loses about half of fmnist's top-1
RUINED = ["compile", "fmnist-cnn", "--prune", "10%", "--prune-steps", "2", "--rounds", "1",
          "--eval-limit", "300", "--batch-sizes", "1", "--backend", "onnxruntime"]


def test_a_ruined_model_exits_1_with_its_report(capsys, tmp_path):
    out = tmp_path / "out"
    assert main([*RUINED, "-o", str(out)]) == 1
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("deploycomp: error: the compiled model lost too much accuracy")
    assert "onnxruntime on fashion-mnist-test drops" in last and "--no-accuracy-guard" in last
    assert "# " in captured.out  # the report was printed
    assert (out / "report.md").is_file() and (out / MARKER).is_file()


def test_the_loss_can_be_accepted(capsys, tmp_path):
    assert main([*RUINED, "--no-accuracy-guard", "-o", str(tmp_path / "out")]) == 0
    assert "error" not in capsys.readouterr().err
