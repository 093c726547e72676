"""The log-sum-exp criterion and the tangent kernel (docs/theory.md, section 12)."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from conftest import rel_err, tree_rel_err

import mfattn
from mfattn._probe import _check

EPS = float(jnp.finfo(jnp.float64).eps)
_POOL = 1024


# Every eager `jax.random` call with a new shape is a new compilation (about a
# second on a loaded machine); these draw a fixed-size pool from the key and cut
# the requested shape out of it, so that every shape costs one compilation.
def _normal(key, shape, scale=1.0):
    size = int(np.prod(shape))
    assert size <= _POOL
    pool = np.asarray(jax.random.normal(key, (_POOL,), jnp.float64))
    return jnp.asarray(scale * pool[:size].reshape(shape))


def _uniform(key, shape, minval=0.0, maxval=1.0):
    size = int(np.prod(shape))
    assert size <= _POOL
    pool = np.asarray(jax.random.uniform(key, (_POOL,), jnp.float64))
    return jnp.asarray(minval + (maxval - minval) * pool[:size].reshape(shape))


def _random_batch(key, N, n, d):
    """`N` measures of `n` atoms with non-uniform weights."""
    kx, kw = jax.random.split(key)
    w = _uniform(kw, (N, n), 0.2, 1.0)
    return _batch(_normal(kx, (N, n, d)), w / w.sum(axis=1, keepdims=True))


def _batch(points, weights=None):
    if weights is None:
        return jax.vmap(mfattn.EmpiricalMeasure)(points)
    return jax.vmap(mfattn.EmpiricalMeasure)(points, weights)


def _rounding(radius, scale):
    """A generous rounding level for the singular values: `F` has entries of size
    about `radius * scale` (plus a log of order one); a thousand ulps. Dependent
    examples must fall below it, independent ones must stay 1e4 times above it
    (the measured values are 1e-16 and 1e-6 to 1e-1 relative)."""
    return 1e3 * EPS * (1.0 + radius * scale)


ABOVE = 1e4


# ------------------------------------------------------------------ criterion
@pytest.mark.parametrize("radius", [0.3, 1.0, 3.0])
def test_dependent_examples_are_at_rounding_level(getkey, radius):
    N, n, d = 5, 6, 2
    cases = {}
    y = _normal(getkey(), (N, 1, d))
    cases["dirac"] = (_batch(y), 3.0)
    base = _normal(getkey(), (n, d))
    w = _uniform(getkey(), (n,), minval=0.2, maxval=1.0)
    shifts = 2.0 * _normal(getkey(), (N, 1, d))
    cases["translates"] = (_batch(base[None] + shifts, jnp.broadcast_to(w / w.sum(), (N, n))), 6.0)
    A = _normal(getkey(), (d, d))
    cov = A @ A.T / d + 0.1 * jnp.eye(d)
    means = _normal(getkey(), (N, 1, d))
    cases["gaussians, common covariance"] = (
        mfattn.GaussianMixtureLaw(means, jnp.broadcast_to(cov, (N, 1, d, d))),
        3.0 + radius * float(jnp.max(jnp.abs(cov))),
    )
    lo = _normal(getkey(), (N, d))
    sides = _uniform(getkey(), (1, d), minval=0.5, maxval=2.0)
    cases["box translates"] = (mfattn.UniformBoxLaw(lo, lo + sides), 4.0)
    for name, (meas, scale) in cases.items():
        s = mfattn.lse_independence(meas, getkey(), radius=radius)
        assert s.shape == (N,)
        assert np.all(np.diff(np.asarray(s)) <= 0), name
        assert s[-1] < _rounding(radius, scale), (name, s)
        if name != "dirac":  # one function survives: the others differ from it by affine ones
            assert s[0] > ABOVE * _rounding(radius, scale), (name, s)
            assert s[1] < _rounding(radius, scale), (name, s)


def test_gaussians_with_distinct_covariances(getkey):
    """Mod affine, a Gaussian's log-Laplace transform is the quadratic form
    `z^T S z / 2`: `d (d + 1) / 2` of them can be independent, one more cannot."""
    d = 2
    q = d * (d + 1) // 2
    for N, dependent in [(q, False), (q + 1, True)]:
        A = _normal(getkey(), (N, 1, d, d))
        covs = A @ jnp.swapaxes(A, -1, -2) + 0.1 * jnp.eye(d)[None, None]
        law = mfattn.GaussianMixtureLaw(_normal(getkey(), (N, 1, d)), covs)
        s = mfattn.lse_independence(law, getkey(), radius=1.0)
        scale = 3.0 + float(jnp.max(jnp.abs(covs)))
        if dependent:
            assert s[-1] < _rounding(1.0, scale), s
        else:
            assert s[-1] > ABOVE * _rounding(1.0, scale), s


def test_independent_examples(getkey):
    N, d = 5, 2
    generic = _batch(_normal(getkey(), (N, 6, d)))
    mixtures = mfattn.GaussianMixtureLaw(
        _normal(getkey(), (N, 3, d)),
        0.1 * jnp.broadcast_to(jnp.eye(d), (N, 3, d, d)),
    )
    lo = _normal(getkey(), (N, d))
    sides = _uniform(getkey(), (N, d), minval=0.5, maxval=2.0)
    boxes = mfattn.UniformBoxLaw(lo, lo + sides)
    # boxes are sums of one-dimensional functions of z_i: their dependence is
    # only broken at high order in |z|, so they need a larger radius (docstring)
    for name, meas, radius in [
        ("generic", generic, 1.0),
        ("gmm", mixtures, 1.0),
        ("boxes", boxes, 3.0),
    ]:
        s = mfattn.lse_independence(meas, getkey(), radius=radius)
        assert s[-1] > ABOVE * _rounding(radius, 6.0), (name, s)


def test_modulo_constants(getkey):
    """`N <= d` Diracs at independent points, and `N <= d + 1` translates, are
    dependent modulo affine functions but independent modulo constants."""
    d = 2
    diracs = _batch(_normal(getkey(), (d, 1, d)))
    base = _normal(getkey(), (6, d))
    translates = _batch(base[None] + _normal(getkey(), (d + 1, 1, d)))
    for meas in (diracs, translates):
        aff = mfattn.lse_independence(meas, getkey())
        const = mfattn.lse_independence(meas, getkey(), modulo="constants")
        assert aff[-1] < _rounding(1.0, 5.0)
        assert const[-1] > ABOVE * _rounding(1.0, 5.0)


@pytest.mark.parametrize("N, order", [(3, 2), (5, 3), (8, 4)])
def test_small_radius_order(N, order):
    """Near `z = 0` the functions are their cumulant expansions; in `d = 2`, mod
    affine, the quadratic forms span 3 dimensions and the cubics 4 more, so the
    smallest singular value of `N` generic measures scales like `r^2` for `N <= 3`,
    `r^3` for `N <= 7` and `r^4` for `N <= 12`."""
    meas = _batch(_normal(jax.random.key(N), (N, 6, 2)))
    rs = np.array([0.02, 0.04, 0.08, 0.16])
    s = [float(mfattn.lse_independence(meas, jax.random.key(1), radius=r)[-1]) for r in rs]
    slope = scipy.stats.linregress(np.log(rs), np.log(s)).slope
    assert abs(slope - order) < 0.1, (slope, s)


def test_coefficients_give_the_dependence(getkey):
    """For translates `mu + c_a`, `F_a = F + <z, c_a>`: the null vectors are the
    coefficients with `sum_a c_a = 0`."""
    N = 5
    base = _normal(getkey(), (6, 2))
    meas = _batch(base[None] + _normal(getkey(), (N, 1, 2)))
    s, V = mfattn.lse_independence(meas, getkey(), return_coefficients=True)
    assert V.shape == (N, N)
    null = V[:, 1:]
    assert np.max(np.abs(np.sum(null, axis=0))) < 1e-10
    assert abs(abs(float(jnp.sum(V[:, 0]))) - np.sqrt(N)) < 1e-10


def test_criterion_bad_inputs(getkey):
    meas = _batch(_normal(getkey(), (5, 6, 2)))
    with pytest.raises(ValueError, match="num_probes"):
        mfattn.lse_independence(meas, getkey(), num_probes=8)
    with pytest.raises(ValueError, match="batch axis"):
        mfattn.lse_independence(mfattn.EmpiricalMeasure(jnp.ones((3, 2))), getkey())
    with pytest.raises(ValueError, match="modulo"):
        mfattn.lse_independence(meas, getkey(), modulo="linear")
    with pytest.raises(TypeError):
        mfattn.lse_independence(jnp.ones((4, 3, 2)), getkey())
    with pytest.raises(ValueError, match="lower < upper"):
        mfattn.UniformBoxLaw(jnp.ones((2, 2)), jnp.zeros((2, 2)))


def test_box_log_laplace_against_quadrature(getkey):
    lo = jnp.array([[-0.3, 0.2]])
    hi = jnp.array([[0.9, 0.25]])
    law = mfattn.UniformBoxLaw(lo, hi)
    z = jnp.array([[0.0, 0.0], [1e-5, -2e-4], [3.0, -40.0], [-700.0, 1.0]])
    u = (np.arange(20000) + 0.5) / 20000
    for i, zi in enumerate(np.asarray(z)):
        terms = []
        for j in range(2):
            y = lo[0, j] + (hi[0, j] - lo[0, j]) * u
            s = zi[j] * y
            terms.append(np.max(s) + np.log(np.mean(np.exp(s - np.max(s)))))
        assert abs(float(law.log_laplace(z)[i, 0]) - sum(terms)) < 1e-6 * (1 + abs(sum(terms)))


# ------------------------------------------------------------- tangent kernel
@eqx.filter_jit
def _output_jacobian(model, measures, probes):
    """`d Phi / d theta` by `jax.jacrev` through the discrete model (one compile)."""

    def outputs(params):
        m = model.with_params(params)
        return jax.vmap(lambda mu: mfattn.probe_outputs(m, mu, probes))(measures).reshape(-1)

    return jax.jacrev(outputs)(model.params)


def _jacobian_kernel(model, J, blocks):
    F = jnp.concatenate([getattr(J, b).reshape(J.Q.shape[0], -1) for b in blocks], axis=1)
    L, H = model.params.depth, model.params.heads
    return L * H * F @ F.T


def test_discrete_kernel_against_jacrev(getkey):
    """`K = (1/(L H)) sum <G, G> = L H J J^T` with `J` the Jacobian of the probe
    outputs, for all blocks and for the score blocks; non-uniform weights. The
    probe risk's gradient map is `L H J^T r / N` (`r` the residuals)."""
    L, H, d, k, n, m, N = 2, 2, 2, 3, 4, 2, 3
    params = jax.tree.map(
        lambda a: 2 * a, mfattn.AttentionParams.xavier_uniform(getkey(), L, H, d, k)
    )
    model = mfattn.DiscreteTransformer(params, 1.3)
    measures = _random_batch(getkey(), N, n, d)
    probes = _normal(getkey(), (m, d))
    J = _output_jacobian(model, measures, probes)
    for blocks in [("Q", "K", "V", "O"), ("Q", "K")]:
        K = mfattn.tangent_kernel(model, measures, probes, blocks=blocks)
        assert K.shape == (N * m * d, N * m * d)
        assert rel_err(K, _jacobian_kernel(model, J, blocks)) < 1e-12

    targets = _normal(getkey(), (N, m, d))
    risk = mfattn.ProbeRisk(measures, probes, targets)
    outputs = risk.outputs(model)
    r = (outputs - targets).reshape(-1)
    value, g = risk.value_and_gradient_map(model)
    assert rel_err(value, 0.5 * jnp.sum(r**2) / N) < 1e-14
    assert rel_err(risk(model), value) < 1e-14
    expected = jax.tree.map(lambda a: L * H * jnp.tensordot(r, a, axes=1) / N, J)
    assert tree_rel_err(g, expected) < 1e-12


def test_limit_kernel_at_mean_field_init(getkey):
    """At the antithetic mean-field initialisation the limit's velocity is zero:
    tokens, probe and adjoints do not move, and the gradient map of the output
    `<c, z(1)>` is `grad_theta <c, G(z, mu; theta)>` at every depth. So

    1. `K = (1/M) sum_m <grad_theta G_a(theta_m), grad_theta G_b(theta_m)>`
       (one attention layer, by `jax.grad`), and
    2. the null spaces are the known ones (docs/theory.md, section 12): for
       translates `mu + c_a` of one measure, nullity `(N - 1) d` for the score
       blocks (the criterion: dependent modulo affine functions) and
       `(N - d - 1) d` for the full kernel (dependent modulo constants);
       generic measures give neither.
    """
    d, k, M, N, n = 2, 2, 16, 5, 4
    grid = mfattn.antithetic_mean_field(getkey(), 2, M, d, k)
    model = mfattn.MeanFieldTransformer(grid, 1.0, rtol=1e-10, atol=1e-12)
    z = jnp.array([[0.8, -0.5]])
    base = _normal(getkey(), (n, d))
    translates = _batch(base[None] + 0.7 * _normal(getkey(), (N, 1, d)))
    generic = _batch(_normal(getkey(), (N, n, d)))
    field = mfattn.AttentionField(1.0)

    def feature(points, c):
        mu = mfattn.EmpiricalMeasure(points)
        g = jax.grad(lambda layer: jnp.sum(c * field.velocity(z, mu, layer)))(grid.layer(0))
        return jnp.concatenate([M * getattr(g, b).reshape(M, -1) for b in "QKVO"], axis=1)

    eye = jnp.eye(d).reshape(d, 1, d)
    F = jax.jit(jax.vmap(lambda p: jax.vmap(lambda c: feature(p, c))(eye)))(generic.points)
    F = F.reshape(N * d, M, -1)
    assert (
        rel_err(mfattn.tangent_kernel(model, generic, z), jnp.einsum("amf,bmf->ab", F, F) / M)
        < 1e-12
    )

    for meas, null_full, null_qk in [
        (translates, (N - d - 1) * d, (N - 1) * d),
        (generic, 0, 0),
    ]:
        for blocks, null in [(("Q", "K", "V", "O"), null_full), (("Q", "K"), null_qk)]:
            K = mfattn.tangent_kernel(model, meas, z, blocks=blocks)
            ev = np.linalg.eigvalsh(np.asarray(K))
            assert np.sum(ev < 1e-10 * ev[-1]) == null, (blocks, ev)
            if null < len(ev):
                assert ev[null] > 1e-5 * ev[-1], (blocks, ev)


@pytest.mark.slow
def test_limit_probe_adjoint_against_autodiff_through_diffrax(getkey):
    """`d z(1)/d theta_j^m = (1/M) int b_j(t) g(theta^m(t), t) dt` for the nodes of
    a piecewise-linear path; the right side from the closed-form adjoint at many
    times (trapezoid), the left by `jax.grad` through `diffrax.diffeqsolve`."""
    d, k, M, J1 = 2, 2, 3, 3
    grid = jax.tree.map(lambda a: 2.0 * a, mfattn.AttentionParams.mean_field(getkey(), J1, M, d, k))
    grid = jax.tree.map(lambda a: a + 0.3 * _normal(getkey(), a.shape), grid)
    model = mfattn.MeanFieldTransformer(grid, 1.0, rtol=1e-11, atol=1e-12)
    mu = jax.tree.map(lambda a: a[0], _random_batch(getkey(), 1, 4, d))
    z = _normal(getkey(), (2, d))
    c = _normal(getkey(), (2, d))
    ts = jnp.linspace(0.0, 1.0, 2001)
    measure, probes = _check(model, mu, z)
    # the gradient map at every t of `ts`, from the probes' forward and adjoint solves
    prob = model.problem(measure, test_points=probes, probes=True)
    fwd = prob.forward(diffrax.SaveAt(t1=True, dense=True))
    bwd = prob.backward(fwd, jnp.zeros_like(fwd.ys[0][-1]), c)
    g_t = prob.node_grads(fwd, bwd, ts=ts)  # leaves (T, M, d, k)
    path = mfattn.ParamPath(grid)
    basis = jax.vmap(path.basis)(ts)  # (T, J1)
    integrand = jax.tree.map(lambda a: jnp.einsum("tj,tm...->tjm...", basis, a) / M, g_t)
    # the trapezoid rule, written out (jnp.trapezoid broadcasts `ts` by rank promotion)
    closed = jax.tree.map(
        lambda a: jnp.einsum("t,t...->...", jnp.diff(ts), (a[1:] + a[:-1]) / 2), integrand
    )
    field = mfattn.AttentionField(1.0)

    def terminal(params):
        p = mfattn.ParamPath(params)
        term = diffrax.ODETerm(
            lambda t, y, args: field.forward(mfattn.EmpiricalMeasure(y[0], mu.weights), p(t), y[1])
        )
        sol = diffrax.diffeqsolve(
            term,
            diffrax.Tsit5(),
            0.0,
            1.0,
            None,
            (mu.points, z),
            stepsize_controller=diffrax.ClipStepSizeController(
                diffrax.PIDController(rtol=1e-11, atol=1e-12), jump_ts=p.breakpoints()
            ),
            max_steps=4096,
        )
        return jnp.sum(c * sol.ys[1][-1])

    auto = jax.grad(terminal)(grid)
    # trapezoid error O(h^2) on an integrand with kinks at the nodes (grid points)
    assert tree_rel_err(closed, auto) < 1e-6


@pytest.mark.slow
def test_discrete_near_null_eigenvalues_fall_with_depth_and_width():
    """For translates the discrete model's kernel has `(N - d - 1) d` eigenvalues
    that vanish in the limit: they fall roughly like `1/(L H)` (averaged over 3
    initialisations, from `L H = 64` to `4096` by more than 16x)."""
    N, n, d, k = 6, 4, 2, 2
    z = jnp.array([[0.8, -0.5]])
    base = _normal(jax.random.key(1), (n, d))
    neg = _batch(base[None] + 0.5 * _normal(jax.random.key(2), (N, 1, d)))
    null = (N - d - 1) * d
    small = []
    for L, H in [(4, 16), (16, 256)]:
        evs = []
        for s in range(3):
            params = mfattn.AttentionParams.xavier_uniform(jax.random.key(100 + s), L, H, d, k)
            K = mfattn.tangent_kernel(mfattn.DiscreteTransformer(params, 1.0), neg, z)
            evs.append(np.linalg.eigvalsh(np.asarray(K)))
        evs = np.mean(evs, axis=0)
        assert evs[null] > 1e3 * evs[null - 1]  # a clear gap after the near-null block
        small.append(evs[:null])
    assert np.all(small[1] < small[0] / 16), small


def test_kernel_bad_inputs(getkey):
    params = mfattn.AttentionParams.xavier_uniform(getkey(), 2, 2, 2, 2)
    model = mfattn.DiscreteTransformer(params, 1.0)
    meas = _batch(_normal(getkey(), (3, 4, 2)))
    with pytest.raises(ValueError, match="blocks"):
        mfattn.tangent_kernel(model, meas, jnp.ones((1, 2)), blocks=("W",))
    with pytest.raises(ValueError, match="probes"):
        mfattn.tangent_kernel(model, meas, jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="N, n, d"):
        mfattn.tangent_kernel(model, mfattn.EmpiricalMeasure(jnp.ones((4, 2))), jnp.ones((1, 2)))
