"""Bad input: one clear message, exit code 1, and no partial artifacts left behind."""

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from deploycomp.cli import main

QUICK = ["--rounds", "1", "--eval-limit", "64", "--batch-sizes", "1", "--backend", "onnxruntime"]


def run_cli(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


def assert_clean(tmp_path, out):
    assert not out.exists()
    assert not list(tmp_path.glob(".*partial"))


def test_unknown_target_names_the_closest(capsys, tmp_path):
    out = tmp_path / "out"
    code, err = run_cli(capsys, "compile", "fmnist-cnn", "--target", "nvidia/a10O", "-o", str(out))
    assert code == 1 and "nvidia/a100" in err and "error:" in err
    assert_clean(tmp_path, out)


def test_unknown_backend_lists_the_known(capsys, tmp_path):
    out = tmp_path / "out"
    code, err = run_cli(capsys, "compile", "fmnist-cnn", "--backend", "openvin", "-o", str(out))
    assert code == 1 and "'openvino'" in err and "onnxruntime" in err
    assert_clean(tmp_path, out)


def test_unknown_model_and_missing_onnx_file(capsys, tmp_path):
    out = tmp_path / "out"
    code, err = run_cli(capsys, "compile", "fmnist-cn", "-o", str(out))
    assert code == 1 and "fmnist-cnn" in err
    code, err = run_cli(capsys, "compile", str(tmp_path / "missing.onnx"), "-o", str(out))
    assert code == 1 and "does not exist" in err
    assert_clean(tmp_path, out)


def test_corrupt_onnx_file(capsys, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not a protobuf at all" * 10)
    out = tmp_path / "out"
    code, err = run_cli(capsys, "compile", str(bad), "-o", str(out))
    assert code == 1 and "not a valid ONNX model" in err
    assert_clean(tmp_path, out)


def test_operator_onnxruntime_cannot_run(capsys, tmp_path):
    node = helper.make_node("FancyOp", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    data = tmp_path / "data.npz"
    np.savez(data, x=np.ones((8, 4), np.float32))
    out = tmp_path / "out"
    code, err = run_cli(capsys, "compile", str(path), "--data", str(data), "-o", str(out))
    assert code == 1 and "FancyOp" in err
    assert_clean(tmp_path, out)


ENTRYPOINT = textwrap.dedent('''
    import numpy as np
    import torch

    def model():
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))

    def wrong():
        return 42

    def nan_data():
        x = np.ones((4, 1, 4, 4), np.float32)
        x[0, 0, 0, 0] = np.nan
        return {"model": model(), "example_inputs": {"input": x[1:2]}, "calibration": [{"input": x}]}

    def bad_shape():
        return {"model": model(), "example_inputs": {"input": np.ones((1, 1, 4, 4), np.float32)},
                "calibration": [{"input": np.ones((4, 3, 4, 4), np.float32)}]}
''')


@pytest.mark.parametrize(
    "func, expected",
    [("wrong", "returned int"), ("nan_data", "NaN"), ("bad_shape", "has shape (4, 3, 4, 4)"),
     ("nothing", "has no function 'nothing'")],
)
def test_bad_entrypoints(capsys, tmp_path, func, expected):
    (tmp_path / "user_model.py").write_text(ENTRYPOINT)
    out = tmp_path / "out"
    code, err = run_cli(capsys, "compile", f"{tmp_path / 'user_model.py'}:{func}", "-o", str(out))
    assert code == 1 and expected in err, err
    assert [line for line in err.splitlines() if "error" in line] == [err.strip().splitlines()[-1]]
    assert_clean(tmp_path, out)


def test_output_dir_that_is_a_file(capsys, tmp_path):
    out = tmp_path / "out"
    out.write_text("not a directory")
    code, err = run_cli(capsys, "compile", "fmnist-cnn", "-o", str(out))
    assert code == 1 and "is a file" in err
    assert out.read_text() == "not a directory"
    assert not list(tmp_path.glob(".*partial"))


def test_exit_code_from_the_real_command(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "deploycomp", "compile", "no-such-model", "-o", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("deploycomp: error: unknown model 'no-such-model'")
    assert "Traceback" not in proc.stderr


def test_user_entrypoint_compiles_end_to_end(tmp_path):
    (tmp_path / "user_model.py").write_text(ENTRYPOINT + textwrap.dedent('''
        def good():
            rng = np.random.default_rng(0)
            x = rng.standard_normal((64, 1, 4, 4)).astype(np.float32)
            return {"model": model(), "example_inputs": {"input": x[:1]},
                    "calibration": [{"input": x[:32]}, {"input": x[32:]}]}
    '''))
    code = main(["compile", f"{tmp_path / 'user_model.py'}:good", "-o", str(tmp_path / "out"),
                 *QUICK])
    assert code == 0
    assert (tmp_path / "out" / "report.md").is_file()
