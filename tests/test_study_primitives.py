"""Measurement primitives of the convergence study against known answers:
t and jackknife intervals, power-law fits, the bias/fluctuation split, and the
adversarial sup with restarts."""

import jax.numpy as jnp
import numpy as np
import pytest

import mfattn


def _coverage_tolerance(level, trials):
    return 4 * np.sqrt(level * (1 - level) / trials)


def test_t_interval_covers_the_mean_at_its_level():
    rng = np.random.default_rng(0)
    trials, R = 2000, 5
    hits = 0
    for _ in range(trials):
        ci = mfattn.t_interval(3.0 + 2.0 * rng.standard_normal(R))["ci"]
        hits += ci[0] <= 3.0 <= ci[1]
    assert abs(hits / trials - 0.95) < _coverage_tolerance(0.95, trials)


def test_jackknife_of_the_mean_is_the_t_interval():
    x = np.random.default_rng(1).standard_normal(7)
    jk = mfattn.jackknife(lambda idx: x[idx].mean(), 7)
    t = mfattn.t_interval(x)
    assert np.allclose(jk["se"], t["se"]) and np.allclose(jk["ci"], t["ci"])
    assert np.isclose(jk["bias_corrected"], x.mean())


def test_jackknife_removes_the_first_order_bias_of_the_plug_in_variance():
    # the plug-in variance (ddof=0) has bias -sigma^2/R; the jackknife's
    # bias-corrected value is exactly the unbiased (ddof=1) variance
    x = np.random.default_rng(2).standard_normal(9)
    jk = mfattn.jackknife(lambda idx: x[idx].var(), 9)
    assert np.isclose(jk["bias_corrected"], x.var(ddof=1))


def test_too_few_samples_give_no_interval():
    with pytest.raises(ValueError, match="at least 4"):
        mfattn.t_interval([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="at least 4"):
        mfattn.jackknife(lambda idx: 0.0, 3)
    assert mfattn.t_interval([1.0, 2.0, 3.0], min_samples=2)["n"] == 3


def test_power_law_fit_recovers_exponents_and_covers_them():
    rng = np.random.default_rng(3)
    Ls, Hs = np.meshgrid([2, 4, 8, 16], [4, 16, 64], indexing="ij")
    Ls, Hs = Ls.ravel(), Hs.ravel()
    trials, hits = 300, 0
    for _ in range(trials):
        per = 0.8 * Ls[:, None] ** -0.4 * Hs[:, None] ** -0.5
        per = per * np.exp(0.05 * rng.standard_normal((Ls.size, 6)))
        fit = mfattn.power_law_fit({"L": Ls, "H": Hs}, per)
        hits += fit["L_ci"][0] <= -0.4 <= fit["L_ci"][1]
    assert abs(fit["L"] + 0.4) < 0.05 and abs(fit["H"] + 0.5) < 0.05
    assert abs(fit["coefficient"] - 0.8) < 0.1
    # the jackknife interval of a smooth statistic has about its coverage
    assert abs(hits / trials - 0.95) < _coverage_tolerance(0.95, trials) + 0.03


def test_bias_fluctuation_antithetic_known_answer():
    # samples ref + b +- delta u (antithetic): the mean is ref + b exactly,
    # so bias = |b|, every fluctuation is delta, the totals |b +- delta u|
    rng = np.random.default_rng(4)
    ref = rng.standard_normal((3, 5, 2))  # (layers, points, d)
    b = np.array([0.3, -0.4])
    u = np.array([0.6, 0.8])
    signs = np.array([1, -1, 1, -1])
    xs = ref[None] + b + 0.1 * signs[:, None, None, None] * u
    ps = np.broadcast_to(ref, xs.shape)  # the second component agrees exactly
    out = mfattn.bias_fluctuation((jnp.asarray(xs), jnp.asarray(ps)), (ref, ref))
    assert np.isclose(out.bias, 0.5)
    assert np.allclose(out.fluctuation, 0.1)
    expect = np.linalg.norm(b + 0.1 * signs[:, None] * u, axis=-1)
    assert np.allclose(out.total, expect)
    assert np.all(out.total <= out.bias + out.fluctuation + 1e-12)
    assert np.isclose(out.noise, 0.1 * np.sqrt(4 / 3) / 2)  # sqrt(var / R)


def test_bias_fluctuation_identical_samples_and_gaussian_noise():
    rng = np.random.default_rng(5)
    ref = rng.standard_normal((4, 3))
    same = np.broadcast_to(ref + 0.2, (6, 4, 3))
    out = mfattn.bias_fluctuation((same,), (ref,))
    assert np.allclose(out.fluctuation, 0) and np.isclose(out.bias, 0.2 * np.sqrt(3))
    # unbiased noise: the bias is at the level of the noise estimate
    noisy = ref[None] + 0.5 * rng.standard_normal((400, 4, 3))
    out = mfattn.bias_fluctuation((noisy,), (ref,))
    assert out.bias < 4 * out.noise
    with pytest.raises(ValueError, match="at least 2"):
        mfattn.bias_fluctuation((noisy[:1],), (ref,))


def test_adversarial_sup_finds_the_farthest_point_of_the_ball():
    # max over |z| <= R of |z - a| is R + |a|, at -R a / |a|
    a = jnp.array([0.3, -0.2, 0.1])
    err = lambda z: jnp.linalg.norm(z - a[None, :], axis=-1)
    starts = jnp.array([[0.1, 0.0, 0.0], [0.0, 0.5, 0.2]])
    out = mfattn.adversarial_sup(err, starts, 2.0, steps=30, step_size=0.3)
    best = 2.0 + float(jnp.linalg.norm(a))
    assert best - 1e-3 < out.value <= best + 1e-12
    assert np.allclose(out.point, -2.0 * a / jnp.linalg.norm(a), atol=0.05)
    assert np.all(out.values >= out.initial)
    # central differences give the same answer
    vg = mfattn.central_difference(err, 1e-6)
    fd = mfattn.adversarial_sup(None, starts, 2.0, steps=30, step_size=0.3, value_and_grad=vg)
    assert abs(fd.value - out.value) < 1e-6
    # given both, the last step is evaluated by `error_fn` alone (no stencil),
    # and the answer is the same
    calls = []
    spy = lambda z: (calls.append(z.shape), err(z))[1]
    both = mfattn.adversarial_sup(spy, starts, 2.0, steps=30, step_size=0.3, value_and_grad=vg)
    assert calls == [(2, 3)] and both.value == fd.value
    assert np.allclose(both.values, fd.values, rtol=1e-12, atol=0)


def test_adversarial_sup_restarts_escape_a_local_maximum():
    # a wide low bump at a and a narrow high one at b: the ascent from near a
    # stays at a's height; a restart near b finds the global maximum
    a, b = jnp.array([-0.5, 0.0]), jnp.array([0.6, 0.3])

    def err(z):
        da = jnp.sum((z - a[None, :]) ** 2, axis=-1)
        db = jnp.sum((z - b[None, :]) ** 2, axis=-1)
        return jnp.exp(-da) + 2.0 * jnp.exp(-db / 0.05)

    one = mfattn.adversarial_sup(err, jnp.array([[-0.4, -0.1]]), 1.0, steps=40, step_size=0.05)
    assert one.value < 1.1
    both = mfattn.adversarial_sup(
        err, jnp.array([[-0.4, -0.1], [0.45, 0.3]]), 1.0, steps=40, step_size=0.05
    )
    assert both.value > 1.99 and int(np.argmax(both.values)) == 1
