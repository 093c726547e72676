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
    sweep_particles=4,
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
    for name in ("_LH.png", "_horizon.png", "_reference.png"):
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
        # each part alone: the same split, and never above the sum of both
        for part in ("state", "adjoint"):
            q = p[part]
            assert np.all(
                np.asarray(q["total_random"]) <= q["bias"] + np.asarray(q["fluctuation"]) + 1e-9
            )
            assert np.all(np.asarray(q["total_random"]) <= np.asarray(p["total_random"]) + 1e-12)
    r = c["reference"]
    assert np.all(np.asarray(r["M_vs_4M_state"]) <= np.asarray(r["M_vs_4M"]) + 1e-12)
    # a resumed run redoes nothing
    before = json.loads(out.read_text())["points"]
    scaling.run(TINY, out, progress=False)
    assert json.loads(out.read_text())["points"] == before


def _synthetic_run(self, log=print):
    """A condition's record with known answers: state bias `0.5 / L`, error and
    fluctuation `c_r (L H)^-1/2` (`c_r` one factor per initialisation), Lemma 6
    `0.1 d^0.5` (blockwise "sum": `0.1`), no growth with `n`; the limit's own
    error is tiny, its test parameters' too except at `(1, 2)`."""
    cfg, R = self.cfg, self.R
    S = cfg["steps"] // cfg["record_every"] + 1
    c = np.exp(0.1 * np.random.default_rng(0).standard_normal(R))
    growth = {"adamw": 0.5, "blockwise_sum": 0.0}[self.opt_name]

    def split(scale, bias):
        per_step = np.outer(c * scale, np.ones(S))
        return {
            "total_random": per_step.max(axis=1).tolist(),
            "per_step_random": per_step.tolist(),
            "bias": bias,
            "bias_loo": [bias] * R,
            "bias_noise": bias / 10,
            "bias_per_step": [bias] * S,
            "fluctuation": (c * scale).tolist(),
            "fluctuation_per_step": [(c * scale).tolist()] * S,
        }

    ref = [1e-4] * S
    out = {
        "steps": list(range(0, cfg["steps"] + 1, cfg["record_every"])),
        "reference": {
            f"{k}{p}": ref for k in ("M_vs_4M", "J_vs_2J") for p in ("", "_state", "_adjoint")
        },
        "displacement": [0.0] + [0.1] * (S - 1),
        "limit_loss": [0.1] * cfg["steps"],
        "points": {},
    }
    out["reference"].update(nodes=cfg["nodes"], particles=self.particles)
    for L, H in self.grid:
        scale = (L * H) ** -0.5
        pt = dict(split(scale, 0.5 / L), L=L, H=H, peak_step=[0] * R)
        pt["total"] = pt["total_random"]
        pt["state"] = split(scale, 0.5 / L)
        pt["adjoint"] = split(2 * scale, 1.0 / L)
        lem = 0.1 * c * self.dim**growth
        pt.update(
            lemma6=lem.tolist(),
            lemma6_per_step=np.outer(lem, np.ones(S)).tolist(),
            lemma6_reference=[0.0] + [1e-5] * (S - 1),
        )
        if (L, H) == (1, 2):  # the limit's own error disqualifies this point
            pt["lemma6_reference"] = [1.0] * S
        out["points"][f"L{L}/H{H}"] = pt
    return out


def test_summary_recovers_known_answers(tmp_path, monkeypatch):
    cfg = dict(TINY, L=[1, 2, 4], H=[2, 4, 8], n_sweep=[4, 8], causal_sweep=True)
    cfg.update(d_sweep=[2, 8], optimizers=["adamw", "blockwise_sum"], sweep_LH=[2, 4])
    monkeypatch.setattr(scaling.Condition, "run", _synthetic_run)
    out = tmp_path / "s.json"
    data = scaling.run(cfg, out, progress=False)
    fits = data["fits"]
    for prefix in ("", "state_"):
        f = fits[prefix + "bias_vs_L"]
        assert f["L"] == [1, 2, 4] and abs(f["slope"] + 1) < 1e-9
        f = fits[prefix + "fluctuation_vs_LH"]
        assert abs(f["L"] + 0.5) < 1e-9 and abs(f["H"] + 0.5) < 1e-9
    # the point whose reference disqualifies Lemma 6 is left out of its fit
    assert "L1/H2" not in fits["lemma6_vs_LH"]["points_used"]
    assert data["marks"]["d2-n4-adamw"]["L1/H2"]["lemma6"]
    # no growth with n, masked or not; Lemma 6 against d per optimiser
    for tag in ("unmasked", "causal"):
        assert abs(fits[f"total_vs_n_{tag}"]["total"]["slope"]) < 1e-9
    assert abs(fits["lemma6"]["adamw"]["lemma6"]["slope"] - 0.5) < 1e-9
    assert abs(fits["lemma6"]["blockwise_sum"]["lemma6"]["slope"]) < 1e-9
    for name in ("_LH", "_LH_state", "_horizon", "_reference", "_n", "_d"):
        assert out.with_name(out.stem + name + ".png").exists()
    text = scaling.report(data)
    assert "bias vs L" in text and "lemma6 vs d (adamw" in text
    assert "| 1 | 2 |" in scaling.table(data)


def test_sweeps_with_their_own_settings_are_not_merged_into_the_main_grid():
    base = dict(TINY, n_sweep=[3, 4], causal_sweep=True, sweep_LH=[1, 2])
    # shared settings: the point (1, 2) at n = 4 joins the main condition
    assert "d2-n4-adamw-sweep" not in scaling.conditions(base)
    for key, value in [("sweep_steps", 1), ("sweep_nodes", 2), ("sweep_record_every", 2)]:
        conds = scaling.conditions(dict(base, **{key: value}))
        assert conds["d2-n4-adamw"][4] == [(1, 2), (1, 4), (2, 2), (2, 4)]
        assert conds["d2-n4-adamw-sweep"][4] == [(1, 2)]
        assert conds["d2-n4-adamw-causal"][4] == [(1, 2)]
        names = [
            scaling.sweep_condition_name(dict(base, **{key: value}), 2, n, "adamw") for n in (3, 4)
        ]
        assert names == ["d2-n3-adamw", "d2-n4-adamw-sweep"]


@pytest.mark.slow
def test_sweeps_use_their_own_reference_and_training_length(tmp_path):
    cfg = dict(TINY, L=[1], H=[2], n_sweep=[3, 4], sweep_LH=[1, 2])
    cfg.update(sweep_nodes=2, sweep_particles=3, sweep_steps=2, sweep_record_every=2)
    data = scaling.run(cfg, tmp_path / "s.json", progress=False)
    assert not data["failed"]
    main = data["points"]["d2-n4-adamw"]
    assert main["steps"] == [0, 1, 2] and main["reference"]["nodes"] == 4
    for name in ("d2-n3-adamw", "d2-n4-adamw-sweep"):
        sweep = data["points"][name]
        assert sweep["steps"] == [0, 2] and sweep["reference"]["nodes"] == 2
        assert sweep["reference"]["particles"] == 3
    assert set(data["fits"]["total_vs_n_unmasked"]["state_total"]["x"]) <= {3, 4}


def test_bias_against_depth_is_recorded_when_the_reference_cannot_resolve_it(tmp_path, monkeypatch):
    def coarse_reference(self, log=print):
        out = _synthetic_run(self, log)
        for k in ("M_vs_4M", "J_vs_2J"):
            for p in ("", "_state", "_adjoint"):  # above a fifth of every bias 0.5 / L
                out["reference"][k + p] = [0.2] * len(out["steps"])
        return out

    cfg = dict(TINY, L=[1, 2, 4], H=[2, 4])
    monkeypatch.setattr(scaling.Condition, "run", coarse_reference)
    data = scaling.run(cfg, tmp_path / "s.json", progress=False)
    for prefix in ("", "state_"):
        f = data["fits"][prefix + "bias_vs_L"]
        assert f["slope"] is None and f["excluded"] == [1, 2, 4] and "five times" in f["why"]
    assert "bias vs L (H = 4): not fitted" in scaling.report(data)


def test_limit_evaluation_in_blocks_matches_one_solve():
    cfg = dict(TINY, test_points=10)  # 40 test particles per probe
    c = scaling.Condition(cfg, 2, 4, "adamw", False, [(1, 2)])
    measure, loss, z, zl = c.probes()[0]
    grid = c.limit_model(4, 4, c.limit_key).params
    whole = scaling.limit_eval_blocks(grid, measure, loss, z, zl, 1.0, None, 4)
    # 26 bytes x 16 parameter particles x d^2 = 4: blocks of 3 test particles
    blocks = scaling.limit_eval_blocks(grid, measure, loss, z, zl, 1.0, None, 4, memory=26 * 64 * 3)
    assert z.shape[0] % 3 != 0  # the last block is padded
    for a, b in zip(whole, blocks):
        assert a.shape == b.shape == (5, z.shape[0], 2)
        # the same solves up to the adaptive solver's steps (rtol 1e-6)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert np.std(whole[1]) > 0
    # `block=` caps the particles per solve below the memory's cap (the
    # study's `limit_block`): the same answer
    capped = scaling.limit_eval_blocks(grid, measure, loss, z, zl, 1.0, None, 4, block=7)
    assert z.shape[0] % 7 != 0
    for a, b in zip(whole, capped):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
