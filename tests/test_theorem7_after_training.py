"""The seed theorem's study after training (`benchmarks/theorem7`): the rate of
the bias from the means at successive depths (no trained limit), and the
adjoint against the distance from the tokens, its terms and the heads that
carry it."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mfattn
from benchmarks.theorem7 import _adjoint_distance, _parts, _summary, _trained_bias
from benchmarks.theorem7._config import Theorem7Config
from benchmarks.theorem7._run import run


def _groups(rng, mean, G, sigma, shape):
    """`G` group means of a random vector with mean `mean` and noise `sigma`."""
    return mean + sigma * rng.standard_normal((G, *shape))


def test_successive_distance_is_unbiased_where_the_plain_one_is_not():
    # one point, d = 8: the means at two depths differ by 0.05 in one
    # coordinate, each group mean has noise 0.2 per coordinate (G = 16): the
    # plain |mean_a - mean_b|^2 is 0.0025 + 2 d 0.04 / G = 0.0425 on average,
    # the U-statistic is unbiased for 0.0025 (its standard error per
    # replication is about 0.005, over 400 replications 2.5e-4)
    rng = np.random.default_rng(0)
    G, d, delta, sigma = 16, 8, 0.05, 0.2
    shift = np.zeros((1, d))
    shift[0, 0] = delta
    est, plain = [], []
    for _ in range(400):
        a = _groups(rng, shift, G, sigma, (1, d))
        b = _groups(rng, 0.0, G, sigma, (1, d))
        est.append(float(_trained_bias._cross(a, b)[0]))
        plain.append(float(np.sum((a.mean(0) - b.mean(0)) ** 2)))
    est, plain = np.array(est), np.array(plain)
    se = est.std(ddof=1) / np.sqrt(est.size)
    assert abs(est.mean() - delta**2) < 4 * se, (est.mean(), se)
    noise = 2 * d * sigma**2 / G
    se_plain = plain.std(ddof=1) / np.sqrt(plain.size)
    assert abs(plain.mean() - delta**2 - noise) < 4 * se_plain < noise


def _synthetic_point(rng, L, G, ref_x, ref_p, c, a, sigma, k_names=("k0", "kK")):
    """A record of `trained_bias_point`'s form whose means are `ref + c L^a u`
    (`u` a fixed unit direction) plus group noise `sigma`."""
    rec = {"L": L, "H": 4, "inits": 4 * G, "groups": G, "steps": 5}
    for k in k_names:
        u = np.ones(ref_x.shape[-1]) / np.sqrt(ref_x.shape[-1])
        rec[k] = {
            "x": _groups(rng, ref_x + c * L**a * u, G, sigma, ref_x.shape),
            "p": _groups(rng, ref_p, G, sigma, ref_p.shape),
            "noise_of_mean": sigma / np.sqrt(G),
        }
    return rec


def test_successive_distances_recover_the_bias_exponent_and_the_exact_one():
    # means ref + 0.5 L^-1 u: the successive distances are 0.5 (1/L - 1/2L) =
    # 0.25 / L at every point, their exponent -1, and so is the bias against ref
    rng = np.random.default_rng(1)
    G, ref_x, ref_p = 16, np.zeros((3, 4)), np.zeros((2, 4))
    pts = [_synthetic_point(rng, L, G, ref_x, ref_p, 0.5, -1.0, 1e-3) for L in (2, 4, 8, 16, 32)]
    ref = {"x": ref_x.tolist(), "p": ref_p.tolist()}
    fits = _trained_bias.trained_bias_fits(pts, ref, min_L=4)
    for key in ("bias_successive_k0_vs_L", "bias_trained_vs_L", "bias_exact_k0_vs_L_same_inits"):
        f = fits[key]
        assert f["ci"][0] < -1.0 < f["ci"][1] and abs(f["slope"] + 1) < 0.05, (key, f)
    assert fits["bias_trained_vs_L"]["points"] == 3  # (4, 8), (8, 16), (16, 32)
    rows = {r["question"]: r for r in _summary.questions({"fits": fits})}
    assert rows["bias after K vs L (means at L and 2L)"]["verdict"] == "consistent"
    assert rows["bias at k=0 vs L (means at L and 2L)"]["claim"] == "-1 (Euler)"
    recs = _trained_bias.trained_bias_records(pts, ref)
    succ = [r for r in recs if r["quantity"] == "successive" and r["k"] == 5]
    assert [r["L"] for r in succ] == [2, 4, 8, 16]
    for r in succ:
        assert abs(r["value"] - 0.25 / r["L"]) < 0.02 * 0.25 / r["L"] + 2e-3, r
        assert r["noise_floor"] < r["value"] / 3  # resolved: the noise is 1e-3 per group
    exact = [r for r in recs if r["quantity"] == "exact"]
    assert [r["L"] for r in exact] == [2, 4, 8, 16, 32]
    # no pairs, no fit; a distance below the noise of the means: no slope, and why
    assert _trained_bias.trained_bias_fits(pts[:1], None, min_L=1) == {}
    flat = [_synthetic_point(rng, L, G, ref_x, ref_p, 0.0, -1.0, 0.0) for L in (4, 8, 16)]
    f = _trained_bias.trained_bias_fits(flat, None, min_L=4)["bias_trained_vs_L"]
    assert f["slope"] is None and "noise" in f["why"]


def test_noise_floor_is_the_estimates_95th_percentile_where_the_means_agree():
    # no difference between the depths, noise 0.1 per group mean: the estimate
    # exceeds its own floor (computed from the same groups) in about 5 % of
    # replications; a difference common to every group does not move the
    # floor; without noise the floor is 0
    rng = np.random.default_rng(3)
    G, shape = 16, (6, 4)
    above = 0
    for _ in range(200):
        a = {"x": _groups(rng, 0.0, G, 0.1, shape), "p": np.zeros((G, 2, 4))}
        b = {"x": _groups(rng, 0.0, G, 0.1, shape), "p": np.zeros((G, 2, 4))}
        above += _trained_bias.distance(a, b) > _trained_bias.noise_floor(a, b, draws=100)
    assert 2 <= above <= 24, above  # 200 x 5 % = 10, binomial sd 3.1
    shifted = {"x": a["x"] + 5.0, "p": a["p"]}
    assert _trained_bias.noise_floor(shifted, b) == pytest.approx(_trained_bias.noise_floor(a, b))
    still = {"x": np.ones((G, *shape)), "p": np.zeros((G, 2, 4))}
    assert _trained_bias.noise_floor(still, None) == 0.0
    other = {"x": np.zeros((G // 2, *shape)), "p": np.zeros((G // 2, 2, 4))}
    with pytest.raises(ValueError, match="groups"):
        _trained_bias.distance(still, other)


def test_trained_bias_point_needs_whole_groups():
    cfg = Theorem7Config(name="t", trained_bias_inits=10, trained_bias_groups=4)
    with pytest.raises(ValueError, match="trained_bias_inits"):
        _trained_bias.trained_bias_point(cfg, 1)
    cfg = Theorem7Config(name="t", trained_bias_inits=4, trained_bias_groups=4)
    with pytest.raises(ValueError, match="at least 2"):
        _trained_bias.trained_bias_point(cfg, 1)


def test_adjoint_increments_rebuild_the_solvers_adjoint():
    # the local and Lions increments of every head, averaged over heads, are
    # the solver's closed-form adjoint recursion at the test points, to rounding
    jax.config.update("jax_enable_x64", True)
    cfg = Theorem7Config(name="t")
    _, probe_key, init_key = _parts.keys_of(cfg, "test")
    measure, loss, z, zl = _parts.probes_of(cfg, probe_key)[0]
    params = _parts.inits_of(cfg, init_key, 3, 2, 2)
    x, p, c, lions, local, rebuilt, solver = _adjoint_distance.adjoint_outputs(
        params, measure, loss, z, zl, 1.0
    )
    assert x.shape == p.shape == (2, z.shape[0], cfg.dim)
    assert c.shape == lions.shape == local.shape == (2, 3, 2, z.shape[0])
    scale = float(jnp.abs(solver).max())
    assert float(jnp.abs(rebuilt - solver).max()) < 1e-12 * scale
    # the Lions part is not zero: a test point's adjoint is the tokens' formula at z
    assert float(lions.min()) > 0
    ref = mfattn.solve_discrete(
        jax.tree.map(lambda a: a[1], params), measure, loss, 1.0, z, test_labels=zl
    )
    assert jnp.allclose(p[1], ref.test_ps[0], rtol=1e-12, atol=0)


def test_carriers_share_and_participation():
    R, L, H, m = 2, 2, 3, 4
    one = np.zeros((R, L, H, m))
    one[:, 1, 2] = 5.0  # one head carries every increment
    share, pr = _adjoint_distance._carriers(one)
    np.testing.assert_allclose(share, 1.0)
    np.testing.assert_allclose(pr, 1.0 / (L * H))
    share, pr = _adjoint_distance._carriers(np.ones((R, L, H, m)))  # all alike
    np.testing.assert_allclose(share, 1.0 / (L * H))
    np.testing.assert_allclose(pr, 1.0)


def test_lions_share_and_spread():
    lions, local = np.ones((2, 2, 3, 4)), 3 * np.ones((2, 2, 3, 4))
    np.testing.assert_allclose(_adjoint_distance._lions_share(lions, local), 0.25)
    local[1] = 0.0
    np.testing.assert_allclose(_adjoint_distance._lions_share(lions, local), [0.25, 1.0])
    # the spread undoes the sample mean: E |v - mean| sqrt(R/(R-1)) = s sqrt(2/pi) in d = 1
    rng = np.random.default_rng(4)
    v = 0.5 * rng.standard_normal((4000, 1, 1))
    spread = _adjoint_distance._spread(v)
    se = spread.std(ddof=1) / np.sqrt(spread.size)
    assert abs(spread.mean() - 0.5 * np.sqrt(2 / np.pi)) < 4 * se


def test_adjoint_fits_recover_a_known_exponent_in_H():
    # per-initialisation spreads c H^-1/2 (near) and c H^+1/2 (far) times
    # independent log-normal noise: the fits find both within their intervals
    rng = np.random.default_rng(5)
    R, Hs = 32, (4, 8, 16, 32)
    pts = []
    for H in Hs:
        rec = {"L": 2, "H": H, "steps": 3, "distances": [0.0, 2.0]}
        for k in ("k0", "kK"):
            noise = lambda: np.exp(0.2 * rng.standard_normal(R))
            rec[k] = {
                "p_spread": [(H**-0.5 * noise()).tolist(), (H**0.5 * noise()).tolist()],
                "x_spread": [(H**-0.5 * noise()).tolist(), (H**-0.5 * noise()).tolist()],
            }
        pts.append(rec)
    fits = _adjoint_distance.adjoint_fits(pts)
    assert [(f["k"], f["distance"]) for f in fits] == [(0, 0.0), (0, 2.0), (3, 0.0), (3, 2.0)]
    for f in fits:
        # within two half-widths of the 95 % interval (about 4 standard errors)
        truth = 0.5 if f["distance"] == 2.0 else -0.5
        for q, t in (("p_spread", truth), ("x_spread", -0.5)):
            lo, hi = f[q + "_ci"]
            assert abs(f[q] - t) < hi - lo < 0.3, (q, f)


def test_distance_points_are_at_the_distance_from_a_token():
    cfg = Theorem7Config(name="t", adjoint_points=32)
    measure, _ = _parts.task_of(cfg).sample(jax.random.key(0))
    radius = _parts.task_of(cfg).radius
    for delta in (0.0, 0.5, 2.0):
        z, zl = _adjoint_distance.distance_points(cfg, jax.random.key(1), measure, delta)
        d = np.linalg.norm(np.asarray(z)[:, None] - np.asarray(measure.points)[None], axis=-1)
        # some token is exactly at distance delta R (the one the point was drawn from)
        assert np.all(np.abs(d - delta * radius).min(axis=1) < 1e-6 * (1 + radius))
        assert np.all(np.linalg.norm(np.asarray(zl), axis=-1) <= radius + 1e-12)


AFTER_TRAINING = Theorem7Config(
    name="tiny",
    L=(),
    H=(),
    inits=8,
    steps=2,
    fit_min_L=2,
    test_points=2,
    bias_L=(1, 2),
    bias_inits=16,
    reference_M=64,
    reference_rtol=1e-6,
    splits=4,
    boots=20,
    uniform_n=(),
    global_LH=(),
    trained_bias_L=(1, 2, 4, 8),
    trained_bias_inits=16,
    trained_bias_groups=4,
    trained_bias_more_H=(2,),
    trained_bias_more_L=(1, 2, 4),
    adjoint_L=2,
    adjoint_H=(2, 4),
    adjoint_distances=(0.0, 1.0),
    adjoint_points=2,
)


@pytest.mark.slow
def test_after_training_parts_end_to_end_resume(tmp_path, monkeypatch):
    jax.config.update("jax_enable_x64", True)
    out = tmp_path / "t7.json"
    data = run(AFTER_TRAINING, out, progress=False)
    assert data["complete"]
    succ = [r for r in data["bias_trained"] if r["quantity"] == "successive"]
    assert {(r["L"], r["k"], r["H"]) for r in succ} == {
        (L, k, 4) for L in (1, 2, 4) for k in (0, 2)
    } | {(L, k, 2) for L in (1, 2) for k in (0, 2)}
    assert set(data["fits"]["bias_trained_vs_L_by_H"]) == {"2"}
    assert {r["L"] for r in data["bias_trained"] if r["quantity"] == "exact"} == {1, 2, 4, 8}
    for key in ("bias_trained_vs_L", "bias_successive_k0_vs_L", "bias_exact_k0_vs_L_same_inits"):
        assert set(data["fits"][key]) >= {"slope", "ci"}
    assert {(r["H"], r["k"], r["distance"]) for r in data["adjoint_distance"]} == {
        (H, k, d) for H in (2, 4) for k in (0, 2) for d in (0.0, 1.0)
    }
    assert len(data["fits"]["adjoint_vs_H_by_distance"]) == 4
    for suffix in ("bias_trained", "adjoint", "adjoint_heads"):
        assert (tmp_path / f"t7_{suffix}.png").stat().st_size > 0
    text = _summary.table(data)
    has_slope = data["fits"]["bias_trained_vs_L"]["slope"] is not None
    assert ("bias after K vs L (means at L and 2L)" in text) == has_slope
    assert "spread of p after K vs H, 1 R from tokens (L=2)" in text
    monkeypatch.setattr(
        _trained_bias, "trained_bias_point", lambda *a, **k: pytest.fail("recomputed")
    )
    monkeypatch.setattr(_adjoint_distance, "adjoint_point", lambda *a: pytest.fail("recomputed"))
    again = run(AFTER_TRAINING, out, progress=False)
    assert json.dumps(again["fits"]) == json.dumps(data["fits"])
    other = dataclasses.replace(AFTER_TRAINING, adjoint_points=3)
    with pytest.raises(RuntimeError, match="adjoint-L2-H2.json"):
        run(other, out, progress=False)
