"""The convergence study (mfattn.studies.scaling): orchestration (fast) and a
tiny preset end to end (slow; run with `python -m pytest -m slow`)."""

import json

import numpy as np
import pytest

from mfattn.studies import scaling

TINY = dict(
    scaling.PRESETS["quick"],
    dim=2,
    tokens=4,
    batch=2,
    steps=2,
    record_every=1,
    nodes=4,
    particles=4,
    L=[1, 2],
    H=[2, 4],
    inits=4,
    probes=1,
    restarts=1,
    adversarial_steps=2,
)


def test_conditions_share_points_and_sweeps():
    cfg = dict(TINY, n_sweep=[4, 6], causal_sweep=True, d_sweep=[2, 3], sweep_LH=[2, 2])
    cfg["optimizers"] = ["adamw", "blockwise_sum"]
    conds = scaling.conditions(cfg)
    main = conds["d2-n4-adamw"]
    # the main grid, with the sweep point merged into it (not repeated)
    assert main[4] == [(1, 2), (1, 4), (2, 2), (2, 4)]
    assert set(conds) == {
        "d2-n4-adamw",
        "d2-n4-adamw-causal",
        "d2-n6-adamw",
        "d2-n6-adamw-causal",
        "d3-n4-adamw",
        "d2-n4-blockwise_sum",
        "d3-n4-blockwise_sum",
    }
    assert conds["d2-n4-adamw-causal"][3] is True


def test_failed_conditions_are_recorded_and_skipped(tmp_path, monkeypatch):
    calls = []

    def boom(self, log=print):
        calls.append(self.dim)
        raise RuntimeError("diverged")

    monkeypatch.setattr(scaling.Condition, "run", boom)
    out = tmp_path / "s.json"
    data = scaling.run(TINY, out, progress=False)
    assert list(data["failed"]) == ["d2-n4-adamw"] and data["points"] == {}
    assert "diverged" in data["failed"]["d2-n4-adamw"]["error"]
    assert json.loads(out.read_text())["config"]["K"] == TINY["steps"]
    scaling.run(TINY, out, progress=False)  # skipped on resume
    assert len(calls) == 1
    scaling.run(TINY, out, progress=False, retry_failed=True)
    assert len(calls) == 2
    with pytest.raises(ValueError, match="another configuration"):
        scaling.run(dict(TINY, steps=3), out, progress=False)


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path):
    out = tmp_path / "tiny.json"
    data = scaling.run(TINY, out, progress=False)
    assert not data["failed"]
    c = data["points"]["d2-n4-adamw"]
    for name in ("_LH.png", "_horizon.png"):
        assert out.with_name(out.stem + name).exists()
    assert len(c["reference"]["M_vs_4M"]) == len(c["steps"]) == TINY["steps"] + 1
    assert c["displacement"][0] == 0 and c["displacement"][-1] > 0
    for p in c["points"].values():
        # the adversarial ascent never lowers the sup over random z
        assert np.all(np.asarray(p["total"]) >= np.asarray(p["total_random"]) - 1e-12)
        # total <= bias + fluctuation, per initialisation (random z)
        assert np.all(
            np.asarray(p["total_random"]) <= p["bias"] + np.asarray(p["fluctuation"]) + 1e-9
        )
        assert len(p["lemma6"]) == TINY["inits"]
    # a resumed run redoes nothing
    before = json.loads(out.read_text())["points"]
    scaling.run(TINY, out, progress=False)
    assert json.loads(out.read_text())["points"] == before
