"""The primitives of the seed theorem's study (`benchmarks/theorem7`): the
split-half bias, the fluctuation among initialisations, the quasi-Monte-Carlo
sample of `nu_0`, the exact limit of heads i.i.d. in depth, the spread along
training on shared and independent streams, the optimisers of the sweep in
`d`, and the study end to end (resumable, a foreign file refused)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mfattn
from benchmarks.theorem7 import _global, _lemma6, _parts, _summary, _summary_training
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
    global_LH=((1, 2),),
    global_checkpoints=(0, 2),
    global_fit_from=1,
    trained_bias_L=(),
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
        # no interval from fewer than 8 initialisations
        assert min(cfg.inits, cfg.uniform_inits, cfg.global_inits, cfg.lemma6_inits) >= 8
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["quick"].inits = 2
    with pytest.raises(ValueError, match="preset"):
        run("medium", None)


# --- parts 4 and 5 -------------------------------------------------------------------
def test_spread_quantities_split_part_one_by_place():
    rng = np.random.default_rng(2)
    out = {k: rng.standard_normal((8, 3, 2)) for k in ("x_tokens", "p_tokens", "x_test", "p_test")}
    s = _global.spread_quantities(out)
    f = _parts.fluctuation_per_init(out)
    np.testing.assert_array_equal(s["state"], f["state"])
    np.testing.assert_array_equal(np.maximum(s["adjoint_tokens"], s["adjoint_far"]), f["adjoint"])
    assert all(v.shape == (8,) for v in s.values())
    sizes = _global.scale_quantities(out)
    mean_norm = lambda v: np.linalg.norm(v.mean(0), axis=-1).max()
    assert sizes["adjoint_far"] == mean_norm(out["p_test"])
    assert sizes["state"] == max(mean_norm(out["x_tokens"]), mean_norm(out["x_test"]))


def test_stream_keys_and_schedule():
    key = jax.random.key(3)
    draw = lambda keys: np.asarray(jax.vmap(lambda k: jax.random.normal(k, (2,)))(keys))
    shared = draw(_global.stream_keys(key, 4, "shared"))
    indep = draw(_global.stream_keys(key, 4, "independent"))
    assert np.all(shared == shared[0])
    assert len({tuple(r) for r in indep}) == 4 and not np.any(np.all(indep == shared[0], axis=1))
    with pytest.raises(ValueError, match="stream"):
        _global.stream_keys(key, 4, "other")
    eta = _global.inverse_sqrt_schedule(0.1, 100.0)
    np.testing.assert_allclose([eta(0), eta(300)], [0.1, 0.05])


def test_trainer_in_chunks_is_one_run_and_streams_do_what_they_say():
    # two copies of one initialisation: equal on one shared stream, apart on
    # independent streams; steps 0-1 then 2-3 are steps 0-3 at once
    cfg = Theorem7Config(name="t", batch=2)
    p = _parts.inits_of(cfg, jax.random.key(4), 1, 2, 1)
    params = jax.tree.map(lambda a: jnp.concatenate([a, a]), p)
    opt = optax.adamw(_global.inverse_sqrt_schedule(0.01, 2.0), weight_decay=1e-3)
    advance = _global.make_trainer(_parts.task_of(cfg), opt, cfg.beta, cfg.batch)
    state = jax.vmap(opt.init)(params)
    for stream in _global.STREAMS:
        keys = _global.stream_keys(jax.random.key(5), 2, stream)
        whole, _, loss = advance(params, state, keys, 0, 4)
        half, s, _ = advance(params, state, keys, 0, 2)
        half, _, _ = advance(half, s, keys, 2, 4)
        assert eqx_equal(whole, half)
        q = np.asarray(whole.Q)
        assert np.all(np.isfinite(q)) and np.all(np.isfinite(loss))
        assert (stream == "shared") == bool(np.array_equal(q[0], q[1]))


def eqx_equal(a, b):
    return all(
        np.allclose(x, y, rtol=1e-12, atol=0)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


@pytest.mark.parametrize(
    "name,ref",
    [
        ("adamw", lambda eps: optax.adamw(0.005, eps=eps, weight_decay=1e-3)),
        (
            "blockwise_sum",
            lambda eps: mfattn.blockwise_adamw(0.02, eps=eps, weight_decay=1e-3, reduction="sum"),
        ),
        (
            "blockwise_mean",
            lambda eps: mfattn.blockwise_adamw(0.005, eps=eps, weight_decay=1e-3, reduction="mean"),
        ),
    ],
)
def test_theorem_optimizer_is_the_named_one_at_a_fixed_step(name, ref):
    # the same per-entry step 0.005 at every d (per block 0.005 sqrt(4 k) = 0.02
    # for the blockwise sum), eps in the state: equal to the plain optimiser
    cfg = Theorem7Config(name="t")
    for d in (2, 16):
        p = mfattn.AttentionParams.xavier_uniform(jax.random.key(d), 2, 2, d, 4)
        g = jax.tree.map(lambda a: 1e-3 * jnp.cos(7 * a), p)
        for eps in (1e-8, 1e-3):
            a, b = _lemma6.theorem_optimizer(cfg, name, eps), ref(eps)
            sa, sb = a.init(p), b.init(p)
            for _ in range(2):
                ua, sa = a.update(g, sa, p)
                ub, sb = b.update(g, sb, p)
            assert eqx_equal(ua, ub)
    with pytest.raises(ValueError, match="name"):
        _lemma6.theorem_optimizer(cfg, "sgd", 1e-8)


def test_head_drift_and_eps_names():
    p = mfattn.AttentionParams.xavier_uniform(jax.random.key(6), 2, 3, 4, 4)
    p = jax.tree.map(lambda a: jnp.stack([a, a]), p)  # two initialisations
    moved = jax.tree.map(lambda a: a.at[1].multiply(1.5), p)
    np.testing.assert_allclose(_global.head_drift(moved, p), [0.0, 0.5])
    assert [_lemma6.eps_name(e) for e in (1e-8, 1e-5, 3e-3)] == ["1e-8", "1e-5", "3e-3"]


def _synthetic_global(slope, R=16, stream="shared", seed=0):
    rng = np.random.default_rng(seed)
    ks = [0, 10, 20, 40, 80, 160]
    base = np.exp(rng.normal(0, 0.05, R))  # one factor per initialisation
    per = {
        q: [(np.maximum(k, 10) ** slope * base * c).tolist() for k in ks]
        for q, c in zip(_global.QUANTITIES, (1.0, 2.0, 3.0))
    }
    return {
        "L": 2,
        "H": 2,
        "stream": stream,
        "inits": R,
        "checkpoints": ks,
        "per_init": per,
        "train_loss": [None] + [0.1] * 5,
    }


def test_global_fits_read_the_trend_in_k():
    pts = [_synthetic_global(0.3), _synthetic_global(-0.2, stream="independent", seed=1)]
    recs = _summary_training.global_records(pts)
    assert len(recs) == 2 * 6 * 3
    assert {"L", "H", "k", "stream", "quantity", "value", "ci_low", "ci_high", "inits"} <= set(
        recs[0]
    )
    fits = {(f["stream"], f["quantity"]): f for f in _summary_training.global_fits(pts, 20)}
    up, down = fits[("shared", "state")], fits[("independent", "state")]
    assert up["k_from"] == 20 and up["k_to"] == 160
    np.testing.assert_allclose([up["slope"], down["slope"]], [0.3, -0.2], atol=1e-10)
    assert up["trend"] == "grows" and down["trend"] == "falls"
    np.testing.assert_allclose(up["last_over_first_fitted"], 8**0.3)
    assert "shared_over_independent" in up and "shared_over_independent" not in down
    rows = _summary_training.training_rows({"fits": {"global_in_K": list(fits.values())}})
    verdicts = {r["question"]: r["verdict"] for r in rows}
    assert verdicts["spread vs k>=20 (x, shared, 2x2)"] == "excluded (grows)"
    assert verdicts["spread vs k>=20 (x, indep., 2x2)"] == "consistent (falls)"


def test_lemma6_fits_per_optimiser():
    rng = np.random.default_rng(3)
    pts = []
    for opt, slope in (("adamw", 0.5), ("blockwise_sum", 0.0)):
        for d in (2, 4, 8, 16):
            per = (d**slope * np.exp(rng.normal(0, 0.02, 8))).tolist()
            pts.append(
                {
                    "d": d,
                    "optimizer": opt,
                    "eps": 1e-8,
                    "inits": 8,
                    "k0": {q: per for q in _global.QUANTITIES},
                    "kK": {q: per for q in _global.QUANTITIES},
                    "head_drift": per,
                    "identity_loss": 0.03,
                    "train_loss_first": 0.1,
                    "train_loss_last": 0.05,
                }
            )
    recs = _summary_training.lemma6_records(pts)
    assert {"d", "optimizer", "eps", "value", "ci_low", "ci_high", "inits", "quantity"} <= set(
        recs[0]
    )
    fits = _summary_training.lemma6_fits(pts)
    assert set(fits) == {"adamw", "blockwise_sum", "init"}
    state = {
        o: next(f for f in fits[o] if f["quantity"] == "state") for o in ("adamw", "blockwise_sum")
    }
    assert abs(state["adamw"]["slope"] - 0.5) < 0.05 and state["adamw"]["trend"] == "grows"
    assert abs(state["blockwise_sum"]["slope"]) < 0.05
    rows = _summary_training.training_rows({"fits": {"fluctuation_vs_d": fits}})
    assert any(r["claim"].startswith("<=0 (Lemma 6") and r["verdict"] == "consistent" for r in rows)
    assert any(r["claim"] == "none (may grow)" and r["verdict"] == "grows" for r in rows)
    late = _summary_training.lemma6_fits(pts, 8)  # and from d = 8 on
    assert {f["d_from"] for f in late["adamw"]} == {2, 8}
    rows = _summary_training.training_rows({"fits": {"fluctuation_vs_d": late}})
    assert "spread at K vs d>=8 (AdamW, 1e-08)" in {r["question"] for r in rows}


NEW_PARTS = dataclasses.replace(
    TINY,
    L=(),
    H=(),
    bias_L=(),
    uniform_n=(),
    global_LH=((1, 2),),
    global_inits=8,
    global_checkpoints=(0, 1, 3),
    global_fit_from=1,
    lemma6_d=(2, 3),
    lemma6_L=1,
    lemma6_H=2,
    lemma6_steps=2,
    lemma6_optimizers=("adamw",),
    lemma6_eps=(1e-8, 1e-3),
)


@pytest.mark.slow
def test_new_parts_end_to_end_resume(tmp_path, monkeypatch):
    jax.config.update("jax_enable_x64", True)
    out = tmp_path / "t7.json"
    data = run(NEW_PARTS, out, progress=False)
    assert data["complete"]
    assert {r["stream"] for r in data["global_in_K"]} == {"shared", "independent"}
    assert {r["k"] for r in data["global_in_K"]} == {0, 1, 3}
    assert {(r["d"], r["eps"]) for r in data["lemma6_d"]} == {
        (2, 1e-8),
        (3, 1e-8),
        (2, 1e-3),
        (3, 1e-3),
    }
    assert len(data["fits"]["global_in_K"]) == 2 * 3
    assert set(data["fits"]["fluctuation_vs_d"]) == {"adamw", "init"}
    for suffix in ("global", "lemma6"):
        assert (tmp_path / f"t7_{suffix}.png").stat().st_size > 0
    assert "spread at K vs d (AdamW, 1e-08)" in _summary.table(data)
    monkeypatch.setattr(_global, "global_point", lambda *a: pytest.fail("recomputed"))
    monkeypatch.setattr(_lemma6, "lemma6_point", lambda *a: pytest.fail("recomputed"))
    again = run(NEW_PARTS, out, progress=False)
    assert again["fits"] == data["fits"]
    other = dataclasses.replace(NEW_PARTS, global_decay=7.0)
    with pytest.raises(RuntimeError, match="global-L1-H2-shared.json"):
        run(other, out, progress=False)


def test_owner_splits_conditions_by_name():
    """Under several processes a condition belongs to one process, by a hash of
    its name: the same on every call, within range, and spread over both."""
    from benchmarks.theorem7._run import owner

    names = [f"fluctuation-L{L}-H{H}" for L in (1, 2, 4, 8) for H in (4, 8, 16)]
    owners = [owner(n, 2) for n in names]
    assert owners == [owner(n, 2) for n in names] and set(owners) == {0, 1}
    assert all(owner(n, 1) == 0 for n in names)
    assert all(0 <= owner(n, 5) < 5 for n in names)
