"""The pathwise coupling of the `1/sqrt(L)` model and its SDE, and the
coercivity of the common noise (docs/theory.md, section 9). Tolerances are
Monte-Carlo standard errors where a law is estimated, rounding otherwise."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mfattn

BETA = 1.0


def _problem(getkey, n=4, d=2, M=3, Mp=2):
    feats = mfattn.AttentionParams.xavier_uniform(getkey(), 1, M, d, d).layer(0)
    mlp = mfattn.MLPParams.init(getkey(), Mp, d, 4, scale=1.5)
    mu = mfattn.EmpiricalMeasure(jax.random.normal(getkey(), (n, d)))
    drift = mfattn.AttentionParams.xavier_uniform(getkey(), 2, 2, d, d)
    return feats, mlp, mu, drift


def test_coupled_pair_is_each_models_own_output(getkey):
    """With the SDE's step equal to the layer spacing (Gaussian multipliers)
    the discrete model and the SDE are one Euler-Maruyama path; the SDE side
    is `solve_sde` on the same key, the discrete side `solve_discrete` on the
    returned layers."""
    feats, mlp, mu, drift = _problem(getkey)
    key = getkey()
    kw = dict(heads=2, mlp=mlp, drift=drift, activation="gelu")
    L, t1 = 8, 2.0
    c = mfattn.pathwise_coupling(feats, mu, BETA, key, L, t1=t1, dt0=t1 / L, **kw)
    assert np.max(np.abs(np.asarray(c.discrete - c.sde))) < 1e-12
    assert float(jnp.max(jnp.abs(c.discrete[-1] - c.discrete[0]))) > 0.1  # it moved
    ref = mfattn.solve_sde(feats, mu, BETA, key, t1=t1, dt0=t1 / L, ts=c.ts, **kw)
    assert np.max(np.abs(np.asarray(c.sde - ref.xs))) == 0.0
    disc = mfattn.solve_discrete(
        c.params,
        mu,
        None,
        BETA,
        mlp=c.mlp,
        activation="gelu",
        residual_scaling=mfattn.InverseSqrtDepth(),
    )
    assert np.max(np.abs(np.asarray(c.discrete - disc.xs))) == 0.0
    assert c.params.heads == 2 + 3 and c.mlp.depth == L  # drift heads, then features
    assert c.multipliers.shape == (L, 3 + 2)


def _strong_slope(feats, mlp, mu, keys, Ls, dt0):
    """Slope of `log E sup |X^L - X|` against `log L` and its standard error
    (delta method over the paths, which are shared by the depths: paired)."""
    e = []
    for L in Ls:
        run = jax.vmap(
            lambda k, L=L: mfattn.pathwise_coupling(
                feats, mu, BETA, k, L, mlp=mlp, activation="tanh", dt0=dt0
            ).sup_distance()
        )
        e.append(np.asarray(run(keys)))
    e = np.stack(e)  # (len(Ls), paths)
    x = np.log(Ls)
    c = (x - x.mean()) / np.sum((x - x.mean()) ** 2)
    # the slope is c . log(mean e); its gradient in the means is c / mean
    g = c / e.mean(axis=1)
    se = float(np.sqrt(g @ np.cov(e) @ g / e.shape[1]))
    return float(c @ np.log(e.mean(axis=1))), se, e.mean(axis=1)


def test_strong_order_one_half(getkey):
    """Gaussian multipliers: the discrete model is Euler-Maruyama, so
    `E sup_l |X^L_l - X_{t_l}|` falls like `L^{-1/2}` against a fine SDE
    solve on the same path (MLP noise, `L = 4, 32`, 96 paths; tolerance 4
    standard errors plus 0.03 for the fine solve's own error)."""
    _, mlp, mu, _ = _problem(getkey, n=3, Mp=3)
    keys = jax.random.split(getkey(), 96)
    slope, se, errs = _strong_slope(None, mlp, mu, keys, (4, 32), 1 / 256)
    assert abs(slope + 0.5) < 4 * se + 0.03, (slope, se, errs)
    assert 4 * se < 0.2, se  # resolved: order 1 would fail


@pytest.mark.slow
def test_strong_order_one_half_attention_and_mlp(getkey):
    """As above with attention and MLP noise, four depths."""
    feats, mlp, mu, _ = _problem(getkey, n=3, M=2, Mp=2)
    keys = jax.random.split(getkey(), 96)
    slope, se, errs = _strong_slope(feats, mlp, mu, keys, (4, 8, 16, 32), 1 / 512)
    assert abs(slope + 0.5) < 4 * se + 0.03, (slope, se, errs)


def _walk(key, L, K=3, paths=1000):
    inc = jax.random.normal(key, (paths, L, K)) / np.sqrt(L)
    return jnp.concatenate([jnp.zeros((paths, 1, K)), jnp.cumsum(inc, axis=1)], axis=1)


def test_rademacher_multipliers_law_and_path(getkey):
    """Signs, mean zero and uncorrelated (within 4.5 standard errors), and
    their walk follows the Brownian path: `sup |S_k - B(t_k)|` shrinks with
    `L` (the dyadic coupling: `O(log L / sqrt(L))`), far below the walk's
    own spread (an independent walk sits at distance `O(1)`)."""
    law = mfattn.RademacherMultipliers()
    sups = []
    for L in (16, 128):
        W = _walk(getkey(), L)
        xi = np.asarray(jax.jit(jax.vmap(lambda w, L=L: law.multipliers(w, 1.0 / L)))(W))
        assert set(np.unique(xi)) == {-1.0, 1.0}
        se = 1 / np.sqrt(xi.size)
        assert abs(xi.mean()) < 4.5 * se
        assert abs((xi[:, 1:] * xi[:, :-1]).mean()) < 4.5 * se  # neighbouring layers
        assert abs((xi[..., 1:] * xi[..., :-1]).mean()) < 4.5 * se  # neighbouring features
        S = np.concatenate([np.zeros_like(xi[:, :1]), np.cumsum(xi, axis=1)], axis=1)
        sups.append(np.max(np.abs(S / np.sqrt(L) - np.asarray(W)), axis=(1, 2)).mean())
    assert sups[1] < 0.6 * sups[0] and sups[1] < 0.35, sups


@pytest.mark.slow
def test_rademacher_coupling_runs_the_model(getkey):
    feats, mlp, mu, _ = _problem(getkey)
    c = mfattn.pathwise_coupling(
        feats, mu, BETA, getkey(), 8, mlp=mlp, multipliers=mfattn.RademacherMultipliers()
    )
    assert set(np.unique(np.asarray(c.multipliers))) == {-1.0, 1.0}
    assert c.multipliers.shape == (8, 3 + 2)
    assert np.isfinite(float(c.sup_distance()))


def test_coercivity_is_the_drift_of_log_tangent(getkey):
    """`drift + noise` against Monte Carlo: `E log |dX_h| / h` for one
    Euler-Maruyama step of `solve_sde`'s linearised flow, 10000 antithetic
    pairs (the features with `O`, `W_2` negated: the same step with `-dB`),
    within 4.5 standard errors plus the step's `O(h)` bias; each part
    matters (either alone is many standard errors away)."""
    feats, mlp, mu, drift = _problem(getkey, n=3)
    drift = mfattn.AttentionParams(drift.Q, drift.K, drift.V, 3.0 * drift.O)
    U = jax.random.normal(getkey(), (3, 2))
    kw = dict(heads=2, drift=drift, activation="tanh")
    c = mfattn.coercivity(feats, mu, BETA, U, mlp=mlp, **kw)
    h = 1 / 1024
    signs = jnp.array([1.0, -1.0])

    def log_growth(key):
        def one(sign):
            f = mfattn.AttentionParams(feats.Q, feats.K, feats.V, sign * feats.O)
            m = mfattn.MLPParams(mlp.W1, mlp.b1, sign * mlp.W2)
            sol = mfattn.solve_sde(f, mu, BETA, key, mlp=m, t1=h, dt0=h, tangent=U, **kw)
            return sol.log_tangent[-1]

        return jnp.mean(jax.vmap(one)(signs)) / h

    v = np.asarray(jax.jit(jax.vmap(log_growth))(jax.random.split(getkey(), 10000)))
    se = v.std(ddof=1) / np.sqrt(v.size)
    tol = 4.5 * se + 0.01
    assert abs(v.mean() - float(c.rate)) < tol, (v.mean(), float(c.rate), se)
    assert min(abs(float(c.drift)), abs(float(c.noise))) > 3 * tol, (c.drift, c.noise, tol)


def test_coercivity_parts_by_finite_differences(getkey):
    """The drift's expansion against a central difference of the SDE's drift
    field, and the MLP noise's part against second differences of the public
    `noise_covariance` (MLP noise does not read the measure, so
    `sum_k <a, D sigma_k b>...` are mixed differences of `C(x, y)`)."""
    _, mlp, mu, drift = _problem(getkey, n=3, d=3)
    X = mu.points
    U = jax.random.normal(getkey(), X.shape)
    u = U / jnp.linalg.norm(U)
    c = mfattn.coercivity(None, mu, BETA, U, mlp=mlp, drift=drift, activation="relu", t=0.3)
    vf = mfattn.AttentionVectorField(mfattn.AttentionField(BETA), mfattn.ParamPath(drift), mu)
    eps = 1e-5
    v = lambda Y: vf.velocity(0.3, Y)[0]
    Du = (v(X + eps * u) - v(X - eps * u)) / (2 * eps)
    assert abs(float(c.drift) - float(jnp.sum(u * Du))) < 1e-7
    # C at the points x_i and x_i + eps u_i
    P = jnp.concatenate([X, X + eps * u], axis=0)
    C = np.asarray(mfattn.noise_covariance(None, mu, BETA, P, mlp=mlp, activation="relu"))
    n = X.shape[0]
    un = np.asarray(u)
    # mixed difference: Delta_i Delta_j C = sum_k (sigma_k(x_i + eps u_i) - sigma_k(x_i)) (...)_j^T
    DD = C[n:, n:] - C[n:, :n] - C[:n, n:] + C[:n, :n]  # (n, n, d, d)
    sq = sum(np.trace(DD[i, i]) for i in range(n)) / eps**2
    inner = sum(un[i] @ DD[i, j] @ un[j] for i in range(n) for j in range(n)) / eps**2
    assert abs(float(c.noise) - (0.5 * sq - inner)) < 1e-4 * max(1.0, abs(float(c.noise)))
    # the noise part is quadratic in the MLP's output scale
    mlp2 = mfattn.MLPParams(mlp.W1, mlp.b1, 2.0 * mlp.W2)
    c2 = mfattn.coercivity(None, mu, BETA, U, mlp=mlp2, drift=drift, activation="relu", t=0.3)
    assert abs(float(c2.noise) - 4 * float(c.noise)) < 1e-12 * max(1.0, abs(float(c2.noise)))


def test_bad_inputs_name_the_argument(getkey):
    feats, mlp, mu, _ = _problem(getkey)
    key = getkey()
    with pytest.raises(ValueError, match="depth"):
        mfattn.pathwise_coupling(feats, mu, BETA, key, 0)
    with pytest.raises(ValueError, match="depth"):
        mfattn.pathwise_coupling(feats, mu, BETA, key, -2)
    with pytest.raises(TypeError, match="multipliers"):
        mfattn.pathwise_coupling(feats, mu, BETA, key, 4, multipliers="gaussian")
    with pytest.raises(ValueError, match="depth"):
        mfattn.pathwise_coupling(
            feats, mu, BETA, key, 6, multipliers=mfattn.RademacherMultipliers()
        )
    with pytest.raises(ValueError, match="t1"):
        mfattn.pathwise_coupling(feats, mu, BETA, key, 4, t1=-1.0)
    with pytest.raises(ValueError, match="dt0"):
        mfattn.pathwise_coupling(feats, mu, BETA, key, 4, dt0=0.0)
    with pytest.raises(ValueError, match="features"):
        mfattn.pathwise_coupling(None, mu, BETA, key, 4)
    with pytest.raises(ValueError, match="beta"):
        mfattn.pathwise_coupling(feats, mu, -1.0, key, 4)
    U = jnp.ones(mu.points.shape)
    with pytest.raises(ValueError, match="tangent"):
        mfattn.coercivity(feats, mu, BETA, U[:2])
    traced = (ValueError, eqx.EquinoxRuntimeError)  # inside jit: a runtime error
    with pytest.raises(traced, match="tangent"):
        mfattn.coercivity(feats, mu, BETA, 0.0 * U)
    with pytest.raises(ValueError, match="mlp"):
        mfattn.coercivity(None, mu, BETA, U, mlp=mfattn.MLPParams.init(key, 2, 3, 4))
