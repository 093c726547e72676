"""The primitives of the seed theorem's study (`benchmarks/theorem7`): the
split-half bias, the fluctuation among initialisations, the quasi-Monte-Carlo
sample of `nu_0`, the exact limit of heads i.i.d. in depth, and the study end
to end (resumable, a foreign file refused)."""

import json

import jax
import numpy as np
import pytest

from benchmarks.theorem7 import _parts, _summary
from benchmarks.theorem7._config import PRESETS, Theorem7Config
from benchmarks.theorem7._run import run


def test_split_half_bias_is_unbiased_where_the_plain_estimate_is_not():
    # one point, d = 8, bias of norm 0.1, unit noise, R = 2000: the plain
    # |mean - ref|^2 is |b|^2 + d / R = 0.014 on average, the split-half
    # estimate of |b|^2 is unbiased (standard error per replication about
    # sqrt(4 |b|^2 / R + 2 d / R^2) = 0.005)
    rng = np.random.default_rng(0)
    R, d, b = 2000, 8, 0.1
    ref = np.zeros((1, d))
    p = np.zeros((R, 1, 2))
    est, plain = [], []
    for _ in range(60):
        x = rng.standard_normal((R, 1, d))
        x[:, 0, 0] += b
        est.append(_parts.split_half_bias(x, p, ref, np.zeros((1, 2)), rng, 16) ** 2)
        plain.append(float(np.sum(x.mean(0) ** 2)))
    est, plain = np.array(est), np.array(plain)
    se = est.std(ddof=1) / np.sqrt(est.size)
    assert abs(est.mean() - b**2) < 4 * se, (est.mean(), se)
    se_plain = plain.std(ddof=1) / np.sqrt(plain.size)
    # the plain estimate is off by the noise of the mean, d / R, and this test sees it
    assert abs(plain.mean() - b**2 - d / R) < 4 * se_plain < d / R


def test_fluctuation_per_init_undoes_the_sample_mean():
    # one point in d = 1, x ~ N(0, s^2): E |x - mean| sqrt(R / (R - 1)) = s sqrt(2 / pi)
    rng = np.random.default_rng(1)
    R, s = 4000, 0.3
    out = {
        k: s * rng.standard_normal((R, 1, 1)) for k in ("x_tokens", "p_tokens", "x_test", "p_test")
    }
    f = _parts.fluctuation_per_init(out)
    v = f["state"]  # the larger of two independent |deviations| per init
    single = np.abs(out["x_tokens"][:, 0, 0] - out["x_tokens"].mean()) * np.sqrt(R / (R - 1))
    se = single.std(ddof=1) / np.sqrt(R)
    assert abs(single.mean() - s * np.sqrt(2 / np.pi)) < 4 * se
    assert np.all(v >= single - 1e-15)
    assert all(v.shape == (R,) for v in f.values())


def test_sobol_sample_is_nu0():
    cfg = Theorem7Config(name="t")
    M, d, k = 4096, cfg.dim, cfg.head_dim
    h = _parts.sobol_nu0(jax.random.key(0), M, d, k)
    assert h.Q.shape == (M, d, k)
    assert np.array_equal(np.asarray(h.O), np.asarray(h.V))
    a = np.sqrt(6 / (d + k))
    for m in (h.Q, h.K, h.V):
        m = np.asarray(m)
        assert np.all(np.abs(m) <= a)
        # uniform on [-a, a]: mean 0, variance a^2 / 3 (a scrambled Sobol
        # sample: far closer than the Monte-Carlo error a / sqrt(3 M d k))
        assert abs(m.mean()) < 0.1 * a / np.sqrt(3 * m.size)
        assert abs(m.var() - a**2 / 3) < 0.1 * a**2 / np.sqrt(m.size)


@pytest.mark.slow
def test_mean_of_iid_depth_models_converges_like_one_over_L_to_the_exact_limit():
    # heads i.i.d. in depth: the mean of the discrete models is an Euler scheme
    # of the limit's time-independent field, so its distance to the limit at
    # the tokens falls like 1/L (measured: 0.080, 0.041, 0.021 at L = 8, 16, 32);
    # the noise of the mean of 8 models of 512 heads, about 0.004 at L = 32, and
    # the reference's error (4096 heads) are well below the bias
    cfg = Theorem7Config(name="t", probes=1, test_points=2)
    _, pk, ik = _parts.keys_of(cfg, "bias")
    probes = _parts.probes_of(cfg, pk)
    ref = _parts.limit_outputs(cfg, _parts.sobol_nu0(ik, 4096, cfg.dim, cfg.head_dim), probes)
    err = {}
    for L in (8, 32):
        o = _parts.probe_outputs(_parts.inits_of(cfg, ik, L, 512, 8), probes, cfg.beta)
        err[L] = np.linalg.norm(o["x_tokens"].mean(0) - ref["x_tokens"][0], axis=-1).max()
    assert 3.0 < err[8] / err[32] < 5.3, err


def test_verdicts():
    assert _summary.verdict([-0.6, -0.4], -0.5) == "consistent"
    assert _summary.verdict([-0.3, -0.1], -0.5) == "excluded"
    assert _summary.verdict([-2.0, 0.5], -0.5) == "too wide to tell"
    assert _summary.verdict([np.nan, 0.5], -0.5) == "no interval"


TINY = Theorem7Config(
    name="tiny",
    L=(2, 4),
    H=(2, 4),
    inits=8,
    steps=2,
    fit_min_L=2,
    test_points=2,
    bias_L=(2, 4, 8),
    bias_inits=16,
    reference_M=64,
    reference_rtol=1e-6,
    splits=4,
    uniform_n=(4, 8, 16),
    uniform_L=2,
    uniform_H=2,
    uniform_inits=8,
    ascent_steps=2,
    ascent_restarts=1,
    causal=(False,),
    boots=20,
)


@pytest.mark.slow
def test_study_end_to_end_resumes_and_refuses_a_foreign_file(tmp_path, monkeypatch):
    jax.config.update("jax_enable_x64", True)
    out = tmp_path / "t7.json"
    data = run(TINY, out, progress=False)
    assert data["complete"] and data["skipped"] == []
    for key in ("config", "fluctuation", "bias_init", "fits", "uniform", "questions"):
        assert key in data
    for key in ("L", "H", "inits", "K", "n", "d", "device"):
        assert key in data["config"]
    rec = data["fluctuation"][0]
    assert {"L", "H", "k", "value", "ci_low", "ci_high", "inits"} <= set(rec)
    assert {rec["k"] for rec in data["fluctuation"]} == {0, 2}
    assert {"L", "value", "ci_low", "ci_high", "reference_M"} <= set(data["bias_init"][0])
    for name in ("fluctuation_k0_vs_LH", "fluctuation_kK_vs_LH"):
        assert set(data["fits"][name]) >= {"L", "L_ci", "H", "H_ci"}
    assert set(data["fits"]["bias_init_vs_L"]) >= {"slope", "ci"}
    for suffix in ("fluctuation", "bias", "uniform"):
        assert (tmp_path / f"t7_{suffix}.png").stat().st_size > 0
    # a resumed run computes nothing: every condition is read back
    monkeypatch.setattr(_parts, "fluctuation_point", lambda *a: pytest.fail("recomputed"))
    again = run(TINY, out, progress=False)
    assert again["fits"] == json.loads(out.read_text())["fits"] == data["fits"]
    # a condition file written by another configuration is refused, by name
    other = Theorem7Config(**{**TINY.to_dict(), "eta": 0.05})
    with pytest.raises(RuntimeError, match="fluctuation-L2-H2.json"):
        run(other, out, progress=False)


def test_presets_are_frozen_and_named():
    assert set(PRESETS) == {"quick", "full", "gpu"}
    for name, cfg in PRESETS.items():
        assert cfg.name == name
        assert cfg.inits >= 8 and cfg.uniform_inits >= 8  # no interval from fewer
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["quick"].inits = 2
    with pytest.raises(ValueError, match="preset"):
        run("medium", None)
