"""Every JSON artifact is strict JSON: a non-finite number is written as null, never as the
NaN / Infinity tokens that other JSON readers refuse."""

import json
import math
import stat

import numpy as np

from deploycomp.artifacts import write_json_atomic


def _strict_loads(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_become_null(tmp_path):
    data = {"a": math.nan, "b": [1.0, math.inf, -math.inf], "c": {"d": np.float64("nan")},
            "e": (2.5, np.float32(1.5)), "f": "NaN"}
    path = write_json_atomic(tmp_path / "x.json", data)
    loaded = _strict_loads(path.read_text())
    assert loaded == {"a": None, "b": [1.0, None, None], "c": {"d": None}, "e": [2.5, 1.5],
                      "f": "NaN"}


def test_json_artifacts_get_the_umask_mode(tmp_path):
    import os

    old = os.umask(0o027)
    try:
        path = write_json_atomic(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
