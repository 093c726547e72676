"""The --quick scaling study end to end (slow: about 5 minutes on 2 cores;
run with `python -m pytest -m slow`)."""

import sys

import numpy as np
import pytest


@pytest.mark.slow
def test_quick_scaling_study_sanity(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parents[1]))
    from benchmarks import scaling

    data = scaling.main(["--quick", "--out", str(tmp_path / "quick.json")])
    s = data["summary"]
    assert (tmp_path / "quick.png").exists()
    # errors fall with L at large H, and with H at fixed L (first vs last point)
    for key in ("uniform_vs_L", "pointwise_vs_L", "uniform_vs_H", "pointwise_vs_H"):
        mean = np.asarray(s[key]["mean"])
        assert mean[-1] < mean[0], (key, mean)
    assert sys.modules["benchmarks.scaling"] is scaling
