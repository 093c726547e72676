"""The --quick scaling study end to end (slow: about 5 minutes on 2 cores;
run with `python -m pytest -m slow`)."""

import json

import numpy as np
import pytest


@pytest.mark.slow
def test_quick_scaling_study_sanity(tmp_path):
    from mfattn.__main__ import main

    out = tmp_path / "quick.json"
    assert main(["scaling", "--quick", "--out", str(out), "--no-progress"]) == 0
    data = json.loads(out.read_text())
    s = data["summary"]
    assert out.with_suffix(".png").exists()
    # errors fall with L at large H, and with H at fixed L (first vs last point)
    for key in ("uniform_vs_L", "pointwise_vs_L", "uniform_vs_H", "pointwise_vs_H"):
        mean = np.asarray(s[key]["mean"])
        assert mean[-1] < mean[0], (key, mean)
    # the adversarial ascent never lowers the sup over z
    for p in data["points"].values():
        if "adversarial" in p:
            assert p["uniform"] >= p["uniform_random"]
    # the limit's own error is measured and recorded for every condition
    assert s["reference"]["base_error"] > 0
    # a resumed run (everything already in the JSON) redoes nothing
    before = dict(data["points"])
    assert main(["scaling", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["points"] == before
