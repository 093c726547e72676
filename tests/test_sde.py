"""The stochastic regime (docs/theory.md, section 9): the `1/sqrt(L)` model with
random per-layer parameters and its common-noise SDE limit. Tolerances are
Monte-Carlo standard errors (4.5 of them where many entries are tested at once)."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats

import mfattn

BETA = 1.0


def _slope(dts, errs, ses):
    """Least-squares slope of log(err) against log(dt), and its standard error
    propagated from the Monte-Carlo errors of each point (treated as
    independent, which over-states the error of a slope of positively
    correlated points)."""
    x, y = np.log(dts), np.log(errs)
    fit = scipy.stats.linregress(x, y)
    c = (x - x.mean()) / np.sum((x - x.mean()) ** 2)
    return fit.slope, float(np.sqrt(np.sum(c**2 * (np.asarray(ses) / errs) ** 2)))


def _solver_run(solver, mlp, mu):
    """`X_1` over a batch of keys, one compile for every step size."""

    @eqx.filter_jit
    def run(keys, dt0):
        def one(key):
            sol = mfattn.solve_sde(
                None, mu, BETA, key, mlp=mlp, dt0=dt0, solver=solver, max_steps=1026
            )
            return sol.xs[-1]

        return jax.vmap(one)(keys)

    return run


def _strong_errors(run, ref, keys, dts):
    errs, ses = [], []
    for dt in dts:
        e = np.linalg.norm(np.asarray(run(keys, jnp.asarray(dt)) - ref), axis=(1, 2))
        errs.append(e.mean())
        ses.append(e.std(ddof=1) / np.sqrt(e.size))
    return np.array(errs), ses


def _one_noise_problem(getkey):
    """Three tokens in d = 2 and one MLP feature: one Brownian motion."""
    mlp = mfattn.MLPParams.init(getkey(), 1, 2, 4, scale=2.0)
    mu = mfattn.EmpiricalMeasure(jax.random.normal(getkey(), (3, 2)))
    return mlp, mu, jax.random.split(getkey(), 64)


def test_strong_order_euler_maruyama(getkey):
    """Euler-Maruyama has strong order 1/2 on a fixed Brownian path per key
    (the same path at every step size), against its own fine solve."""
    mlp, mu, keys = _one_noise_problem(getkey)
    euler = _solver_run(diffrax.Euler(), mlp, mu)
    ref = euler(keys, jnp.asarray(2.0**-10))
    dts = 2.0 ** -np.arange(3, 7)
    errs, ses = _strong_errors(euler, ref, keys, dts)
    slope, se = _slope(dts, errs, ses)
    assert abs(slope - 0.5) < 4 * se, (slope, se, errs)


@pytest.mark.slow
def test_strong_order_heun_and_ito_correction(getkey):
    """Heun, a Stratonovich solver given the Itô correction drift, has strong
    order 1 for this commutative noise (one Brownian motion), and Euler-
    Maruyama converges, with order 1/2, to Heun's fine solve: both reach the
    same Itô solution (without the correction Euler's error would stall at
    the Itô-Stratonovich gap)."""
    mlp, mu, keys = _one_noise_problem(getkey)
    euler = _solver_run(diffrax.Euler(), mlp, mu)
    heun = _solver_run(diffrax.Heun(), mlp, mu)
    ref = heun(keys, jnp.asarray(2.0**-10))
    dts = 2.0 ** -np.arange(3, 7)
    for run, order in ((euler, 0.5), (heun, 1.0)):
        errs, ses = _strong_errors(run, ref, keys, dts)
        slope, se = _slope(dts, errs, ses)
        assert abs(slope - order) < 4 * se, (order, slope, se, errs)


def test_tangent_is_the_linearised_flow(getkey):
    """`log_tangent` (attention noise and a mean-field drift) against the
    finite difference of two solves on the same Brownian path."""
    feats = mfattn.AttentionParams.xavier_uniform(getkey(), 1, 2, 2, 2).layer(0)
    drift = mfattn.AttentionParams.xavier_uniform(getkey(), 2, 3, 2, 2)
    mu = mfattn.EmpiricalMeasure(jax.random.normal(getkey(), (3, 2)))
    key = getkey()
    delta = jax.random.normal(getkey(), (3, 2))
    kw = dict(drift=drift, dt0=1 / 32, ts=jnp.linspace(0.0, 1.0, 5), tangent=delta)
    sol = mfattn.solve_sde(feats, mu, BETA, key, **kw)
    eps = 1e-6
    bumped = mfattn.solve_sde(feats, mu.with_points(mu.points + eps * delta), BETA, key, **kw)
    fd = np.log(np.linalg.norm(np.asarray(bumped.xs - sol.xs), axis=(1, 2)))
    fd = fd - np.log(eps * np.linalg.norm(delta))
    assert sol.log_tangent[0] == 0
    assert np.max(np.abs(np.asarray(sol.log_tangent) - fd)) < 1e-5


def _signed_draws(key, features, mlp, L, H):
    """Per-layer parameters drawn uniformly from the `M` features with a random
    sign on `O` (and on `W_2` for the MLP): mean-zero layers whose covariance
    is the noise covariance of the `M`-feature SDE."""
    ki, ks, kj, kt = jax.random.split(key, 4)
    M = features.Q.shape[0]
    idx = jax.random.randint(ki, (L, H), 0, M)
    sign = jax.random.rademacher(ks, (L, H, 1, 1), dtype=features.dtype)
    params = jax.tree.map(lambda a: a[idx], features)
    params = eqx.tree_at(lambda p: p.O, params, params.O * sign)
    jdx = jax.random.randint(kj, (L,), 0, mlp.W1.shape[0])
    tsign = jax.random.rademacher(kt, (L, 1, 1), dtype=features.dtype)
    blocks = jax.tree.map(lambda a: a[jdx], mlp)
    return params, eqx.tree_at(lambda p: p.W2, blocks, blocks.W2 * tsign)


def test_linear_case_discrete_and_sde_laws(getkey):
    """One token and linear MLPs make the SDE linear: `E[x x^T]` solves a
    linear ODE, `dS/dt = A(S)`, and both the `L`-layer model (random signed
    features) and Euler-Maruyama with `dt = 1/L` give exactly
    `(I + A/L)^L S_0`, an order-1 approximation of `exp(A) S_0`. Both
    Monte-Carlo estimates (`B` paths) must match it."""
    d, M, Mp, H, L, B = 2, 2, 2, 2, 4, 10000
    feats = mfattn.AttentionParams.xavier_uniform(getkey(), 1, M, d, 2).layer(0)
    feats = jax.tree.map(lambda a: 1.5 * a, feats)
    mlp = mfattn.MLPParams.init(getkey(), Mp, d, 3, scale=1.5)
    x0 = jnp.array([[0.7, -0.4]])
    mu = mfattn.EmpiricalMeasure(x0)
    # the generator on (vec S, 1): single atom, so G(x; theta) = O V^T x0
    A = np.asarray(jnp.einsum("mdk,mek->mde", feats.O, feats.V))
    Bm = np.asarray(jnp.einsum("mhd,meh->mde", mlp.W2, mlp.W1))
    c = np.asarray(jnp.einsum("mhd,mh->md", mlp.W2, mlp.b1))
    m0 = np.asarray(x0[0])

    def gen(S):
        out = sum(a @ S @ a.T for a in A) / (H * M)
        for b, cc in zip(Bm, c):
            out = (
                out
                + (b @ S @ b.T + np.outer(b @ m0, cc) + np.outer(cc, b @ m0) + np.outer(cc, cc))
                / Mp
            )
        return out

    S0 = np.outer(m0, m0)
    S_L = S0
    for _ in range(L):
        S_L = S_L + gen(S_L) / L
    # exact SDE moment: exp of the affine generator on vec(S)
    basis = np.eye(d * d).reshape(-1, d, d)
    const = gen(np.zeros((d, d)))
    lin = np.stack([(gen(E) - const).ravel() for E in basis], axis=1)
    big = np.zeros((d * d + 1, d * d + 1))
    big[:-1, :-1], big[:-1, -1] = lin, const.ravel()
    S_inf = (scipy.linalg.expm(big) @ np.append(S0.ravel(), 1.0))[:-1].reshape(d, d)
    assert np.max(np.abs(S_L - S_inf)) > 0.02 * np.max(np.abs(S_inf))  # a real O(1/L) gap

    loss = mfattn.MMDLoss(mu, 1.0)

    @jax.jit
    def discrete(key):
        params, blocks = _signed_draws(key, feats, mlp, L, H)
        sol = mfattn.solve_discrete(
            params,
            mu,
            loss,
            BETA,
            mlp=blocks,
            activation="linear",
            residual_scaling=mfattn.InverseSqrtDepth(),
        )
        return sol.xs[-1, 0]

    @jax.jit
    def sde(key):
        sol = mfattn.solve_sde(
            feats, mu, BETA, key, heads=H, mlp=mlp, activation="linear", dt0=1 / L
        )
        return sol.xs[-1, 0]

    for run in (discrete, sde):
        x = np.asarray(jax.vmap(run)(jax.random.split(getkey(), B)))
        xx = x[:, :, None] * x[:, None, :]
        mean, se = xx.mean(0), xx.std(0, ddof=1) / np.sqrt(B)
        assert np.all(np.abs(mean - S_L) < 4.5 * se), (run, mean, S_L, se)
        # the martingale identity E[x^L] = x^0
        assert np.all(np.abs(x.mean(0) - m0) < 4.5 * x.std(0, ddof=1) / np.sqrt(B))


def test_quadratic_covariation_and_martingale(getkey):
    """The `1/sqrt(L)` model with i.i.d. Xavier heads and MLP blocks per layer
    (tanh, attention and MLP): `E[x^L] = x^0`, and the quadratic covariation
    `sum_l (x_i^{l+1} - x_i^l)(x_j^{l+1} - x_j^l)^T` has the mean of
    `(1/L) sum_l C(x_i^l, x_j^l; mu^l)`, with `C` estimated without bias at
    every layer by `noise_covariance` on fresh independent features. Both hold
    exactly at every `L` (martingale differences)."""
    L, H, n, d, k, m, B, Mc = 4, 2, 3, 2, 2, 3, 4000, 16
    mu = mfattn.EmpiricalMeasure(jax.random.normal(getkey(), (n, d)))
    loss = mfattn.MMDLoss(mu, 1.0)

    @jax.jit
    @jax.vmap
    def path(key):
        k1, k2, k3 = jax.random.split(key, 3)
        params = mfattn.AttentionParams.xavier_uniform(k1, L, H, d, k)
        blocks = mfattn.MLPParams.init(k2, L, d, m)
        xs = mfattn.solve_discrete(
            params, mu, loss, BETA, mlp=blocks, residual_scaling=mfattn.InverseSqrtDepth()
        ).xs
        dx = jnp.diff(xs, axis=0)
        qv = jnp.einsum("lia,ljb->ijab", dx, dx)

        def layer_cov(x, key):
            ka, km = jax.random.split(key)
            feats = mfattn.AttentionParams.xavier_uniform(ka, 1, Mc, d, k).layer(0)
            mlp = mfattn.MLPParams.init(km, Mc, d, m)
            return mfattn.noise_covariance(feats, mu.with_points(x), BETA, x, heads=H, mlp=mlp)

        cint = jnp.mean(jax.vmap(layer_cov)(xs[:-1], jax.random.split(k3, L)), axis=0)
        return xs[-1] - xs[0], qv, cint

    drift, qv, cint = (np.asarray(a) for a in path(jax.random.split(getkey(), B)))
    se = lambda a: a.std(0, ddof=1) / np.sqrt(B)
    assert np.all(np.abs(drift.mean(0)) < 4.5 * se(drift))
    gap = qv - cint
    assert np.all(np.abs(gap.mean(0)) < 4.5 * se(gap))
    # the test has power: the covariation is far from zero (it would be L
    # times smaller with a 1/L residual)
    diag = qv.mean(0)[np.arange(n), np.arange(n)][:, np.arange(d), np.arange(d)]
    assert np.all(diag > 20 * se(qv)[np.arange(n), np.arange(n)][:, np.arange(d), np.arange(d)])


def test_feature_covariance_converges(getkey):
    """`Sigma_M Sigma_M^T` of `M` i.i.d. features is unbiased for `C` and its
    mean squared error decays like `1/M` (reference: `2^13` features)."""
    n, d, k, m, H, R, Mmax = 3, 2, 2, 3, 2, 64, 32
    mu = mfattn.EmpiricalMeasure(jax.random.normal(getkey(), (n, d)))

    def cov(feats, mlp):
        return mfattn.noise_covariance(
            feats, mu, BETA, mu.points, heads=H, mlp=mlp, activation="gelu"
        )

    @jax.jit
    def draws(key):
        ka, km, kr, kq = jax.random.split(key, 4)
        feats = mfattn.AttentionParams.xavier_uniform(ka, R, Mmax, d, k)  # R sets of Mmax
        mlp = mfattn.MLPParams.init(km, R * Mmax, d, m)
        mlp = jax.tree.map(lambda a: a.reshape((R, Mmax) + a.shape[1:]), mlp)
        big = mfattn.AttentionParams.xavier_uniform(kr, 1, 2**13, d, k).layer(0)
        return feats, mlp, cov(big, mfattn.MLPParams.init(kq, 2**13, d, m))

    feats, mlp, ref = draws(getkey())
    ref = np.asarray(ref)
    batched = jax.jit(jax.vmap(cov))
    Ms, mse, ses = [2, 8, 32], [], []
    for M in Ms:
        C = np.asarray(batched(*jax.tree.map(lambda a: a[:, :M], (feats, mlp))))
        if M == 2:  # unbiased
            assert np.all(np.abs(C.mean(0) - ref) < 4.5 * C.std(0, ddof=1) / np.sqrt(R))
        e2 = np.sum((C - ref) ** 2, axis=(1, 2, 3, 4))
        mse.append(e2.mean())
        ses.append(e2.std(ddof=1) / np.sqrt(R))
    slope, se = _slope(np.array(Ms, float), np.array(mse), ses)
    assert abs(slope + 1) < 4 * se, (slope, se, mse)


def test_errors(getkey):
    mu = mfattn.EmpiricalMeasure(jnp.zeros((3, 2)))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="noise features"):
        mfattn.solve_sde(None, mu, 1.0, key)
    feats = mfattn.AttentionParams(*[jnp.zeros((2, 3, 2))] * 4)
    with pytest.raises(ValueError, match="d=3"):
        mfattn.solve_sde(feats, mu, 1.0, key)
    with pytest.raises(ValueError, match=r"\(M, d, k\)"):
        mfattn.solve_sde(mfattn.AttentionParams(*[jnp.zeros((1, 2, 2, 2))] * 4), mu, 1.0, key)
    feats = mfattn.AttentionParams(*[jnp.zeros((2, 2, 2))] * 4)
    with pytest.raises(ValueError, match="tangent"):
        mfattn.solve_sde(feats, mu, 1.0, key, tangent=jnp.zeros((2, 2)))
    with pytest.raises(TypeError, match="drift"):
        mfattn.solve_sde(feats, mu, 1.0, key, drift=feats.Q)
