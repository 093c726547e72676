"""The post-normalised transformer and its limit on the sphere (float64): the
closed-form adjoints and gradient maps against autodiff, the tokens on the
sphere, the order of convergence, and training."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import rel_err, tree_rel_err
from helpers import random_loss, random_measure, random_params
from scipy.stats import linregress

import mfattn
from mfattn._sphere import project_tangent_pullback

KERNELS = {
    "dense": mfattn.DenseKernel(),
    "causal": mfattn.DenseKernel(causal=True),
}


def _unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _case(key, n, d, k, L, H, kind, uniform=False):
    k1, k2, k3 = jax.random.split(key, 3)
    measure = random_measure(k1, n, d, uniform)
    measure = measure.with_points(_unit(measure.points))
    params = jax.tree.map(lambda a: 2.0 * a, random_params(k2, L, H, d, k))
    return params, measure, random_loss(k3, kind, measure)


def _tangent_err(x, v):
    """max |<x, v>| / max |v| row by row."""
    return float(jnp.max(jnp.abs(jnp.sum(x * v, -1))) / jnp.max(jnp.abs(v)))


def test_projection_pullback_is_the_vjp(getkey):
    x = 1.7 * jax.random.normal(getkey(), (5, 3))  # off the sphere: the extension's derivative
    v = jax.random.normal(getkey(), (5, 3))
    p = jax.random.normal(getkey(), (5, 3))
    _, vjp = jax.vjp(mfattn.project_tangent, x, v)
    cx, cv = project_tangent_pullback(x, v, p)
    ex, ev = vjp(p)
    assert rel_err(cx, ex) < 1e-13 and rel_err(cv, ev) < 1e-13


def _augmented(measure, z, eps):
    """The tokens plus the points `z` as atoms of weight `eps` each."""
    m = z.shape[0]
    w = jnp.concatenate([(1 - m * eps) * measure.weights, jnp.full((m,), eps)])
    return mfattn.EmpiricalMeasure(jnp.concatenate([measure.points, z]), w)


@pytest.mark.parametrize("kernel", ["dense", pytest.param("causal", marks=pytest.mark.slow)])
def test_projected_bracket_is_the_vjp_of_the_projected_field(getkey, kernel):
    """The limit's bracket and gradient map at any `X` (on the sphere or not)
    are the pullback of `X, theta -> P_X Gamma(X, mu_X)` at the cotangents
    `w p` (the Lions term through the projection included); at test particles
    `Z`, the bracket is the limit of that of atoms of weight `eps -> 0`."""
    n, m, d, k, H, eps = 5, 2, 3, 2, 2, 1e-7
    params, measure, _ = _case(getkey(), n, d, k, 1, H, "denoise")
    layer = params.layer(0)
    X = 1.3 * jax.random.normal(getkey(), (n, d))
    Z = jax.random.normal(getkey(), (m, d))
    P = jax.random.normal(getkey(), (n, d))
    PZ = jax.random.normal(getkey(), (m, d))
    field = mfattn.AttentionField(3.0, KERNELS[kernel])
    path = mfattn.ParamPath(
        jax.tree.map(lambda a: a[None], layer), interpolation=mfattn.PiecewiseConstant()
    )

    def vector_field(measure):
        return mfattn.AttentionVectorField(field, path, measure, geometry=mfattn.Sphere())

    w = measure.weights[:, None]
    aug = _augmented(measure, Z, eps)

    @jax.jit
    def run(X, Z, P, PZ, layer):
        vf, vfe = vector_field(measure), vector_field(aug)
        _, vjp = jax.vjp(lambda X, layer: vf.velocity(0.0, X, layer=(layer, None))[0], X, layer)
        # test particles: atoms of weight eps
        XZ, PP = jnp.concatenate([X, Z]), jnp.concatenate([P, PZ])
        _, vjp_e = jax.vjp(lambda Y: vfe.velocity(0.0, Y, layer=(layer, None))[0], XZ)
        # the closed forms, also from the forward's cache and without test particles
        vx, vz, cache = vf.velocity(0.0, X, Z, layer=(layer, None), return_cache=True)
        return dict(
            vjp=vjp(w * P),
            vjp_eps=vjp_e(aug.weights[:, None] * PP)[0][n:] / eps,
            adjoint=vf.adjoint(0.0, X, Z, P, PZ, layer=(layer, None)),
            cached=vf.adjoint(0.0, X, Z, P, PZ, layer=(layer, None), cache=cache),
            no_test=vf.adjoint(0.0, X, None, P, None, layer=(layer, None))[0],
            velocity=(vx, vz),
        )

    out = run(X, Z, P, PZ, layer)
    (eX, eth), (b, bz, g) = out["vjp"], out["adjoint"]
    assert rel_err(w * b, eX) < 1e-12
    assert tree_rel_err(g, jax.tree.map(lambda a: H * a, eth)) < 1e-12
    assert rel_err(bz, out["vjp_eps"]) < 1e-5
    assert rel_err(out["cached"][0], b) < 1e-13 and rel_err(out["cached"][1], bz) < 1e-13
    assert rel_err(out["no_test"], b) < 1e-13
    vx, vz = out["velocity"]
    assert _tangent_err(X, vx) < 1e-14 and _tangent_err(Z, vz) < 1e-14


CASES = [
    # n, d, k, L, H, beta, loss, kernel
    (6, 3, 2, 3, 2, 2.0, "denoise", "dense"),
    pytest.param((5, 4, 3, 4, 1, 5.0, "mmd", "dense"), marks=pytest.mark.slow),
    (7, 3, 2, 3, 2, 4.0, "mmd", "causal"),
]


@pytest.mark.parametrize("case", CASES)
def test_discrete_adjoint_and_gradient_map_match_autodiff(getkey, case):
    n, d, k, L, H, beta, kind, kernel = case
    params, measure, loss = _case(getkey(), n, d, k, L, H, kind)
    kernel = KERNELS[kernel]
    sol = mfattn.solve_discrete(
        params, measure, loss, beta, kernel=kernel, geometry=mfattn.Sphere()
    )
    # the tokens stay on the sphere and the adjoints are tangent
    assert np.max(np.abs(np.linalg.norm(np.asarray(sol.xs), axis=-1) - 1)) < 1e-12
    assert max(_tangent_err(x, p) for x, p in zip(sol.xs, sol.ps)) < 1e-12
    # the dynamics is not trivial: the tokens moved
    assert float(jnp.max(jnp.abs(sol.xs[-1] - sol.xs[0]))) > 0.05

    @jax.jit
    def autodiff(params, points):
        def f(th, x):
            m = measure.with_points(x)
            return mfattn.discrete_loss(th, m, loss, beta, kernel=kernel, geometry=mfattn.Sphere())

        return f(params, points), jax.grad(f, argnums=(0, 1))(params, points)

    w = measure.weights[:, None]
    value, (g_params, g_points) = autodiff(params, measure.points)
    assert rel_err(sol.loss, value) < 1e-12
    assert rel_err(sol.ps[0], g_points / w) < 1e-9  # unit inputs: ps[0] = (1/w) dLoss/dx_in
    assert tree_rel_err(sol.grads, jax.tree.map(lambda g: L * H * g, g_params)) < 1e-9
    # inputs off the sphere are mapped onto it first: dLoss/dx_in = w ps[0] / |x_in|
    radii = jax.random.uniform(getkey(), (n, 1), minval=0.5, maxval=2.0)
    sol2 = mfattn.solve_discrete(
        params, measure.with_points(radii * measure.points), loss, beta, kernel=kernel,
        geometry=mfattn.Sphere(),
    )  # fmt: skip
    _, (_, g2) = autodiff(params, radii * measure.points)
    assert rel_err(sol2.xs, sol.xs) < 1e-14
    assert rel_err(sol2.ps[0] / radii, g2 / w) < 1e-9


def test_discrete_intermediate_adjoints_and_test_particles(getkey):
    """`ps[l]` is the tangent part of `(1/w) dLoss/dx^l`; test particles move
    like atoms of weight zero and their adjoint is the limit `eps -> 0` of that
    of atoms of weight `eps` (as in the unnormalised model)."""
    n, m, d, L, beta, eps = 6, 3, 3, 4, 3.0, 1e-8
    params, measure, loss = _case(getkey(), n, d, 2, L, 2, "denoise")
    z = _unit(jax.random.normal(getkey(), (m, d)))
    labels = jax.random.normal(getkey(), (m, d))
    sol = mfattn.solve_discrete(
        params, measure, loss, beta, z, test_labels=labels, geometry=mfattn.Sphere()
    )
    field = mfattn.AttentionField(beta)
    w = measure.weights[:, None]
    l = 2

    def from_layer(x):
        for j in range(l, L):
            x = _unit(x + field(x, measure.with_points(x), params.layer(j)) / L)
        return loss(measure.with_points(x))

    g = jax.jit(jax.grad(from_layer))(sol.xs[l])
    assert rel_err(sol.ps[l], mfattn.project_tangent(sol.xs[l], g / w)) < 1e-9
    assert (
        rel_err(
            sol.ps[L],
            mfattn.project_tangent(
                sol.xs[L], loss.lions_derivative(measure.with_points(sol.xs[L]))
            ),
        )
        < 1e-14
    )

    aug_loss = mfattn.DenoisingLoss(jnp.concatenate([loss.targets, labels]))
    sol0 = mfattn.solve_discrete(
        params, _augmented(measure, z, 0.0), aug_loss, beta, geometry=mfattn.Sphere()
    )
    assert rel_err(sol.test_xs, sol0.xs[:, n:]) < 1e-12
    assert rel_err(sol.xs, sol0.xs[:, :n]) < 1e-12
    assert float(jnp.max(jnp.abs(sol.test_xs[-1] - sol.test_xs[0]))) > 1e-2  # they moved

    def eps_adjoint(eps):
        aug = _augmented(measure, z, eps)
        sol = mfattn.solve_discrete(params, aug, aug_loss, beta, geometry=mfattn.Sphere())
        return sol.ps[:, n:]

    # the eps-atom's adjoint is p + O(eps) with a large constant in this case:
    # Richardson extrapolation leaves O(eps^2)
    assert rel_err(sol.test_ps, 2 * eps_adjoint(eps) - eps_adjoint(2 * eps)) < 1e-5


def _limit_case(key, kernel="dense"):
    n, d, k, M, J = 5, 3, 2, 2, 2
    params, measure, loss = _case(key, n, d, k, J + 1, M, "mmd")
    return params, measure, loss, 2.0, KERNELS[kernel]


TIGHT = dict(rtol=1e-11, atol=1e-11, max_steps=20_000)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["dense", "causal"])
def test_limit_gradient_matches_diffrax_autodiff(getkey, kernel):
    params, measure, loss, beta, kernel = _limit_case(getkey(), kernel)
    kw = dict(kernel=kernel, geometry=mfattn.Sphere(), **TIGHT)
    value, grads = mfattn.limit_gradient(params, measure, loss, beta, **kw)
    value_ad, grads_ad = mfattn.limit_gradient(
        params, measure, loss, beta, adjoint=diffrax.RecursiveCheckpointAdjoint(), **kw
    )
    assert rel_err(value, value_ad) < 1e-12
    assert tree_rel_err(grads, grads_ad) < 1e-7
    # and the normalisation matters: the unnormalised limit's gradient differs
    _, grads_flat = mfattn.limit_gradient(params, measure, loss, beta, kernel=kernel, **TIGHT)
    assert tree_rel_err(grads_flat, grads_ad) > 1e-2


def test_solve_limit_adjoint_and_sphere(getkey):
    """`ps[0]` of the limit (here through `MeanFieldTransformer`) is
    `(1/w) dLoss/dx_in`: against central differences of the loss of an
    independent solve of the projected flow (`attention_flow`), the tokens stay
    on the sphere to the solver's tolerance and the saved adjoints are tangent."""
    params, measure, loss, beta, kernel = _limit_case(getkey())
    model = mfattn.MeanFieldTransformer(params, beta, geometry=mfattn.Sphere(), **TIGHT)
    sol = model.solve(measure, loss)
    path = mfattn.ParamPath(params)
    ts = jnp.array([0.0, 1.0])

    def limit_loss(x_in):
        m = measure.with_points(x_in)
        # fixed steps (1e-3, Tsit5: error ~1e-15): smooth in x_in, unlike an adaptive solve
        xs = mfattn.attention_flow(
            path,
            m,
            beta,
            ts,
            geometry=mfattn.Sphere(),
            stepsize_controller=diffrax.ConstantStepSize(),
            dt0=1e-3,
            max_steps=2000,
        )
        return float(loss(measure.with_points(xs[-1])))

    def central(v, h):
        x = measure.points
        return (limit_loss(x + h * v) - limit_loss(x - h * v)) / (2 * h)

    for _ in range(2):
        v = jax.random.normal(getkey(), measure.points.shape)
        fd = (4 * central(v, 5e-5) - central(v, 1e-4)) / 3  # Richardson: O(h^4)
        terms = measure.weights[:, None] * sol.ps[0] * v
        exact, scale = float(jnp.sum(terms)), float(jnp.sum(jnp.abs(terms)))
        assert abs(exact - fd) < 1e-7 * scale, (exact, fd, scale)
    assert np.max(np.abs(np.linalg.norm(np.asarray(sol.xs), axis=-1) - 1)) < 1e-9
    assert max(_tangent_err(x, p) for x, p in zip(sol.xs, sol.ps)) < 1e-9
    assert float(jnp.max(jnp.abs(sol.xs[-1] - sol.xs[0]))) > 0.05


@pytest.mark.slow
def test_discrete_converges_to_the_limit_at_order_one(getkey):
    """`flow_error(geometry=mfattn.Sphere())` (state and adjoint of test
    particles) between the post-normalised transformer, with one layer per
    node of a linear path, and the projected flow decays like `1/L`."""
    d, H, n, m, beta = 3, 2, 6, 3, 1.0
    grid = jax.tree.map(lambda a: 1.5 * a, random_params(getkey(), 2, H, d, 2))
    path = mfattn.ParamPath(grid)
    measure = mfattn.EmpiricalMeasure(_unit(jax.random.normal(getkey(), (n, d))))
    loss = mfattn.MMDLoss(mfattn.EmpiricalMeasure(jax.random.normal(getkey(), (4, d))), 1.3)
    z = jax.random.normal(getkey(), (m, d))
    Ls = np.array([8, 16, 32, 64])
    errs = []
    for L in Ls:
        layers = jax.vmap(path)(jnp.arange(L) / L)  # the layer l is the path at l / L
        e = mfattn.flow_error(
            layers, grid, measure, loss, beta, z, geometry=mfattn.Sphere(), rtol=1e-10, atol=1e-10
        )
        errs.append(float(jnp.max(e)))
    slope = linregress(np.log(Ls), np.log(errs)).slope
    assert -1.15 < slope < -0.85, (slope, errs)


@pytest.mark.slow
def test_training_lowers_the_loss(getkey):
    """A few AdamW steps of `mfattn.train` on a post-normalised transformer
    lower the held-out loss of denoising on the sphere."""
    d, n, L, H = 3, 8, 4, 2

    def sampler(key, batch):
        kc, kn = jax.random.split(key)
        centres = _unit(jax.random.normal(kc, (batch, 1, d)))
        clean = jnp.broadcast_to(centres, (batch, n, d))
        noisy = _unit(clean + 0.4 * jax.random.normal(kn, (batch, n, d)))
        return jax.vmap(mfattn.EmpiricalMeasure)(noisy), jax.vmap(mfattn.DenoisingLoss)(clean)

    params = mfattn.AttentionParams.xavier_uniform(getkey(), L, H, d, d)
    model = mfattn.DiscreteTransformer(params, 4.0, geometry=mfattn.Sphere())
    held_out = getkey()
    before = float(mfattn.evaluate(model, sampler, held_out, 256))
    result = mfattn.train(
        model, sampler, optax.adam(3e-2), 20, getkey(), batch_size=8, progress=False
    )
    after = float(mfattn.evaluate(result.model, sampler, held_out, 256))
    assert after < 0.8 * before, (before, after)


def test_bad_input(getkey):
    params, measure, loss, beta, _ = _limit_case(getkey())
    with pytest.raises(ValueError, match="geometry"):
        mfattn.DiscreteTransformer(params, beta, geometry="ball")
    with pytest.raises(ValueError, match="geometry"):
        mfattn.MeanFieldTransformer(params, beta, geometry="ball")
    with pytest.raises(ValueError, match="geometry"):
        mfattn.solve_discrete(params, measure, loss, beta, geometry="ball")
    with pytest.raises(ValueError, match="geometry"):
        mfattn.limit_gradient(params, measure, loss, beta, geometry="Sphere")
    limit = mfattn.MeanFieldTransformer(params, beta, geometry=mfattn.Sphere())
    with pytest.raises(ValueError, match="sphere"):
        mfattn.probe_outputs(limit, measure, measure.points)
    with pytest.raises(ValueError, match="sphere"):
        mfattn.train_coupled(limit, [], None, optax.sgd(0.1), 1, getkey())
