"""The convergence study (benchmarks/scaling): orchestration (fast) and a
tiny preset end to end (slow; run with `python -m pytest -m slow`)."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import scaling

replace = dataclasses.replace
TINY = replace(
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
    cfg = replace(TINY, n_sweep=[4, 6], causal_sweep=True, d_sweep=[2, 3], sweep_LH=[2, 2])
    cfg = replace(cfg, optimizers=["adamw", "blockwise_sum"])
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
    assert json.loads(out.read_text())["config"]["K"] == TINY.steps
    scaling.run(TINY, out, progress=False)  # skipped on resume
    assert len(calls) == 1
    scaling.run(TINY, out, progress=False, retry_failed=True)
    assert len(calls) == 2
    with pytest.raises(ValueError, match="another configuration"):
        scaling.run(replace(TINY, steps=3), out, progress=False)


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path):
    out = tmp_path / "tiny.json"
    data = scaling.run(TINY, out, progress=False)
    assert not data["failed"]
    c = data["points"]["d2-n4-adamw"]
    for name in ("_LH.png", "_horizon.png", "_reference.png"):
        assert out.with_name(out.stem + name).exists()
    assert len(c["reference"]["M_vs_4M"]) == len(c["steps"]) == TINY.steps + 1
    assert c["displacement"][0] == 0 and c["displacement"][-1] > 0
    for p in c["points"].values():
        # the adversarial ascent never lowers the sup over random z
        assert np.all(np.asarray(p["total"]) >= np.asarray(p["total_random"]) - 1e-12)
        # total <= bias + fluctuation, per initialisation (random z)
        assert np.all(
            np.asarray(p["total_random"]) <= p["bias"] + np.asarray(p["fluctuation"]) + 1e-9
        )
        assert len(p["lemma6"]) == TINY.inits
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
    S = cfg.steps // cfg.record_every + 1
    c = np.exp(0.1 * np.random.default_rng(0).standard_normal(R))
    growth = {"adamw": 0.5, "blockwise_sum": 0.0}[self.opt_name]

    def split(scale, bias):
        per_step = np.outer(c * scale, np.ones(S))
        return scaling.Split(
            total_random=per_step.max(axis=1).tolist(),
            per_step_random=per_step.tolist(),
            bias=bias,
            bias_loo=[bias] * R,
            bias_noise=bias / 10,
            bias_per_step=[bias] * S,
            fluctuation=(c * scale).tolist(),
            fluctuation_per_step=[(c * scale).tolist()] * S,
        )

    ref = [1e-4] * S
    reference = scaling.Reference(*[ref] * 6, nodes=cfg.nodes, particles=self.particles)
    points = {}
    for L, H in self.grid:
        scale = (L * H) ** -0.5
        both = split(scale, 0.5 / L)
        lem = 0.1 * c * self.dim**growth
        # the limit's own error disqualifies Lemma 6 at (1, 2)
        lem_ref = [1.0] * S if (L, H) == (1, 2) else [0.0] + [1e-5] * (S - 1)
        points[f"L{L}/H{H}"] = scaling.GridPoint(
            L=L,
            H=H,
            total=both.total_random,
            peak_step=[0] * R,
            state=split(scale, 0.5 / L),
            adjoint=split(2 * scale, 1.0 / L),
            lemma6=lem.tolist(),
            lemma6_per_step=np.outer(lem, np.ones(S)).tolist(),
            lemma6_reference=lem_ref,
            discrete_loss=[0.1] * S,
            **both._asdict(),
        )
    return scaling.ConditionResult(
        condition=scaling.condition_name(self.dim, self.tokens, self.opt_name, self.causal),
        dim=self.dim,
        tokens=self.tokens,
        opt=self.opt_name,
        causal=self.causal,
        steps=list(range(0, cfg.steps + 1, cfg.record_every)),
        reference=reference,
        displacement=[0.0] + [0.1] * (S - 1),
        limit_loss=[0.1] * cfg.steps,
        points=points,
        wall_seconds=0.0,
    )


def test_summary_recovers_known_answers(tmp_path, monkeypatch):
    cfg = replace(TINY, L=[1, 2, 4], H=[2, 4, 8], n_sweep=[4, 8], causal_sweep=True)
    cfg = replace(cfg, d_sweep=[2, 8], optimizers=["adamw", "blockwise_sum"], sweep_LH=[2, 4])
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
    base = replace(TINY, n_sweep=[3, 4], causal_sweep=True, sweep_LH=[1, 2])
    # shared settings: the point (1, 2) at n = 4 joins the main condition
    assert "d2-n4-adamw-sweep" not in scaling.conditions(base)
    for key, value in [("sweep_steps", 1), ("sweep_nodes", 2), ("sweep_record_every", 2)]:
        conds = scaling.conditions(replace(base, **{key: value}))
        assert conds["d2-n4-adamw"][4] == [(1, 2), (1, 4), (2, 2), (2, 4)]
        assert conds["d2-n4-adamw-sweep"][4] == [(1, 2)]
        assert conds["d2-n4-adamw-causal"][4] == [(1, 2)]
        names = [
            scaling.sweep_condition_name(replace(base, **{key: value}), 2, n, "adamw")
            for n in (3, 4)
        ]
        assert names == ["d2-n3-adamw", "d2-n4-adamw-sweep"]


@pytest.mark.slow
def test_sweeps_use_their_own_reference_and_training_length(tmp_path):
    cfg = replace(TINY, L=[1], H=[2], n_sweep=[3, 4], sweep_LH=[1, 2])
    cfg = replace(cfg, sweep_nodes=2, sweep_particles=3, sweep_steps=2, sweep_record_every=2)
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
        # above a fifth of every bias 0.5 / L, for both parts and each alone
        coarse = [0.2] * len(out.steps)
        return out._replace(
            reference=out.reference._replace(**dict.fromkeys(out.reference._fields[:6], coarse))
        )

    cfg = replace(TINY, L=[1, 2, 4], H=[2, 4])
    monkeypatch.setattr(scaling.Condition, "run", coarse_reference)
    data = scaling.run(cfg, tmp_path / "s.json", progress=False)
    for prefix in ("", "state_"):
        f = data["fits"][prefix + "bias_vs_L"]
        assert f["slope"] is None and f["excluded"] == [1, 2, 4] and "five times" in f["why"]
    assert "bias vs L (H = 4): not fitted" in scaling.report(data)


@pytest.mark.slow
def test_limit_evaluation_in_blocks_matches_one_solve():
    cfg = replace(TINY, test_points=10)  # 40 test particles per probe
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


BENCHMARKS = pathlib.Path(scaling.__file__).resolve().parents[1]
RESULTS = BENCHMARKS / "results"


@pytest.mark.parametrize("preset", ["quick", "medium", "full"])
def test_committed_results_load_and_summarize_to_their_own_fits(preset):
    # the committed study JSONs: their configuration is the preset's, and the
    # summary rebuilt from their raw records gives their marks and exponents
    data = json.loads((RESULTS / f"scaling_{preset}.json").read_text())
    assert scaling.StudyConfig.from_json(data["config"]) == scaling.PRESETS[preset]
    assert scaling.PRESETS[preset].study_json() == data["config"]
    again = scaling.summarize(data)
    assert again["marks"] == data["marks"]
    fitted = [k for k in data["fits"] if k.endswith("_vs_LH")]
    assert fitted and sorted(k for k in again["fits"] if k.endswith("_vs_LH")) == sorted(fitted)
    for k in fitted:
        for q in ("L", "H"):
            assert np.isclose(again["fits"][k][q], data["fits"][k][q], rtol=1e-9, atol=1e-12)
    assert "| L | H |" in scaling.table(data) and "conditions done" in scaling.report(data)


def test_corrupt_condition_file_is_computed_again_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(scaling.Condition, "run", _synthetic_run)
    out = tmp_path / "s.json"
    first = scaling.run(TINY, out, progress=False)
    f = tmp_path / "s_points" / "d2-n4-adamw.json"
    f.write_text(f.read_text()[:100])  # truncated
    calls = []
    monkeypatch.setattr(
        scaling.Condition, "run", lambda self, log=print: (calls.append(1), _synthetic_run(self))[1]
    )
    with pytest.warns(RuntimeWarning, match="d2-n4-adamw.json is truncated or corrupt"):
        again = scaling.run(TINY, out, progress=False)
    assert calls == [1] and again["points"] == first["points"]
    assert json.loads(f.read_text())["status"] == "done"
    # with --summarize nothing is computed: the corrupt condition is left out, said so
    f.write_text("{")
    with pytest.warns(RuntimeWarning, match="left out of the summary"):
        data = scaling.run(TINY, out, progress=False, summarize_only=True)
    assert calls == [1] and data["not_run"] == ["d2-n4-adamw"]


def test_json_files_are_written_atomically(tmp_path):
    f = tmp_path / "r.json"
    scaling.write_json(f, {"a": [1, 2]})
    assert json.loads(f.read_text()) == {"a": [1, 2]}
    with pytest.raises(TypeError):  # fails while serialising: the old file stays whole
        scaling.write_json(f, {"a": object()})
    assert json.loads(f.read_text()) == {"a": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="`optimizers`"):
        replace(TINY, optimizers=["sgd"])
    with pytest.raises(ValueError, match="`inits`"):
        replace(TINY, inits=1)
    with pytest.raises(ValueError, match="`steps`"):
        replace(TINY, steps=0)
    with pytest.raises(ValueError, match="unknown settings \\['stepz'\\]"):
        scaling.StudyConfig.from_json(dict(TINY.to_json(), stepz=3))
    with pytest.raises(ValueError, match="`preset`"):
        scaling.run("quik", progress=False)
    # lists are stored as tuples, and a mapping of the settings is a configuration
    assert TINY.L == (1, 2) and scaling.as_config(TINY.to_json()) == TINY


def test_the_study_imports_no_plotting_library():
    code = (
        "import sys, benchmarks.scaling; "
        "print(any(m.split('.')[0] == 'matplotlib' for m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=BENCHMARKS.parent,
    )
    assert out.stdout.strip() == "False"
