"""The discrete transformer and its closed-form adjoint against jax.grad (float64)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err, tree_rel_err
from helpers import random_loss, random_measure, random_params

import mfattn

CASES = [
    # n, d, k, L, H, beta, uniform, loss
    (1, 3, 2, 3, 2, 1.0, True, "denoise"),
    (6, 4, 3, 1, 3, 2.0, False, "mmd"),
    (7, 3, 5, 4, 1, 5.0, False, "denoise"),
    (8, 3, 2, 3, 2, 50.0, False, "mmd"),
    (5, 2, 4, 2, 3, 10.0, False, "denoise"),
]


def _case(key, n, d, k, L, H, beta, uniform, kind):
    k1, k2, k3 = jax.random.split(key, 3)
    measure = random_measure(k1, n, d, uniform, scale=0.7)
    params = random_params(k2, L, H, d, k)
    # Heads large enough that the tokens move visibly.
    params = jax.tree.map(lambda a: 2.0 * a, params)
    return params, measure, random_loss(k3, kind, measure), beta


@pytest.mark.parametrize("case", CASES)
def test_adjoint_and_gradient_map_match_autodiff(getkey, case):
    params, measure, loss, beta = _case(getkey(), *case)
    sol = mfattn.solve_discrete(params, measure, loss, beta)
    L, H = params.depth, params.heads
    n, d = measure.points.shape
    assert sol.xs.shape == (L + 1, n, d) and sol.ps.shape == (L + 1, n, d)
    assert sol.grads.Q.shape == params.Q.shape

    @jax.jit
    def autodiff(params, points):
        f = lambda th, x: mfattn.discrete_loss(th, measure.with_points(x), loss, beta)
        return f(params, points), jax.grad(f, argnums=(0, 1))(params, points)

    value, (g_params, g_points) = autodiff(params, measure.points)
    assert rel_err(sol.loss, value) < 1e-12
    # p^0 = (1/w) dLoss/dx^0
    assert rel_err(sol.ps[0], g_points / measure.weights[:, None]) < 1e-9
    # grads = L * H * dLoss/dtheta
    expected = jax.tree.map(lambda g: L * H * g, g_params)
    assert tree_rel_err(sol.grads, expected) < 1e-9


def test_intermediate_adjoints_match_autodiff(getkey):
    params, measure, loss, beta = _case(getkey(), 6, 3, 2, 4, 2, 3.0, False, "mmd")
    sol = mfattn.solve_discrete(params, measure, loss, beta)
    L = params.depth
    for l in (1, 2, L):
        tail = jax.tree.map(lambda a: a[l:], params)

        def from_layer(x):
            if l == L:
                return loss(measure.with_points(x))
            # the remaining layers keep the step 1/L of the full model
            field = mfattn.AttentionField(beta)
            for j in range(L - l):
                x = x + field(x, measure.with_points(x), tail.layer(j)) / L
            return loss(measure.with_points(x))

        g = jax.jit(jax.grad(from_layer))(sol.xs[l])
        assert rel_err(sol.ps[l], g / measure.weights[:, None]) < 1e-9


@pytest.mark.parametrize("kind", ["denoise", "mmd"])
def test_test_particles_are_zero_weight_atoms(getkey, kind):
    """Test particles move like atoms of zero weight; their adjoint is the
    limit eps -> 0 of the rescaled adjoint of an atom of weight eps."""
    params, measure, loss, beta = _case(getkey(), 6, 3, 2, 3, 2, 2.0, False, kind)
    z = 0.5 * jax.random.normal(getkey(), (2, 3))
    zlab = jax.random.normal(getkey(), (2, 3))
    sol = mfattn.solve_discrete(params, measure, loss, beta, test_points=z, test_labels=zlab)
    assert sol.test_xs.shape == (params.depth + 1, 2, 3)

    def augmented(eps):
        w = jnp.concatenate([(1 - 2 * eps) * measure.weights, jnp.array([eps, eps])])
        m = mfattn.EmpiricalMeasure(jnp.concatenate([measure.points, z]), w)
        if kind == "denoise":
            lo = mfattn.DenoisingLoss(jnp.concatenate([loss.targets, zlab]))
        else:
            lo = loss
        return m, lo

    m0, lo0 = augmented(0.0)
    sol0 = mfattn.solve_discrete(params, m0, lo0, beta)
    assert rel_err(sol.test_xs, sol0.xs[:, 6:]) < 1e-12
    assert rel_err(sol.xs, sol0.xs[:, :6]) < 1e-12
    eps = 1e-7
    me, loe = augmented(eps)
    sole = mfattn.solve_discrete(params, me, loe, beta)
    assert rel_err(sol.test_ps, sole.ps[:, 6:]) < 1e-5


def test_jit_vmap_grad(getkey):
    params, _, _, beta = _case(getkey(), 5, 3, 2, 3, 2, 2.0, False, "denoise")
    B = 4
    pts = jax.random.normal(getkey(), (B, 5, 3))
    tgt = jax.random.normal(getkey(), (B, 5, 3))
    measures = jax.vmap(mfattn.EmpiricalMeasure)(pts)
    losses = jax.vmap(mfattn.DenoisingLoss)(tgt)
    batched = jax.jit(jax.vmap(lambda m, lo: mfattn.solve_discrete(params, m, lo, beta)))
    sols = batched(measures, losses)
    assert sols.xs.shape == (B, 4, 5, 3)
    one = mfattn.solve_discrete(
        params, mfattn.EmpiricalMeasure(pts[2]), mfattn.DenoisingLoss(tgt[2]), beta
    )
    assert rel_err(sols.ps[2], one.ps) < 1e-12
    # grad through solve_discrete
    g = jax.grad(lambda th: mfattn.solve_discrete(th, one_measure(pts), one_loss(tgt), beta).loss)(
        params
    )
    assert tree_rel_err(jax.tree.map(lambda a: a * 3 * 2, g), one.grads) < 1e-9


def one_measure(pts):
    return mfattn.EmpiricalMeasure(pts[2])


def one_loss(tgt):
    return mfattn.DenoisingLoss(tgt[2])


def test_float32(getkey):
    params, measure, loss, beta = _case(getkey(), 6, 3, 2, 3, 2, 2.0, False, "denoise")
    f32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)
    sol32 = mfattn.solve_discrete(f32(params), f32(measure), f32(loss), beta)
    sol64 = mfattn.solve_discrete(params, measure, loss, beta)
    assert sol32.xs.dtype == jnp.float32 and sol32.grads.Q.dtype == jnp.float32
    assert rel_err(sol32.ps, sol64.ps) < 1e-4
    assert tree_rel_err(sol32.grads, sol64.grads) < 1e-4


def test_low_temperature_all_finite(getkey):
    params, measure, loss, _ = _case(getkey(), 16, 4, 3, 4, 3, 1.0, False, "mmd")
    z = jax.random.normal(getkey(), (3, 4))
    sol = mfattn.solve_discrete(params, measure, loss, 1e3, test_points=z)
    for leaf in jax.tree.leaves(sol):
        assert bool(jnp.all(jnp.isfinite(leaf)))


def test_no_retrace_on_new_values(getkey):
    params, measure, loss, beta = _case(getkey(), 6, 3, 2, 3, 2, 2.0, False, "denoise")

    @eqx.debug.assert_max_traces(max_traces=1)
    def run(params, measure, loss):
        return mfattn.solve_discrete(params, measure, loss, beta).loss

    run = jax.jit(run)
    run(params, measure, loss)
    run(jax.tree.map(lambda a: a + 1.0, params), measure, loss)


# ----------------------------------------------------------------- bad input
def test_bad_input_errors(getkey):
    params, measure, loss, beta = _case(getkey(), 6, 3, 2, 3, 2, 2.0, False, "denoise")
    x = measure.points
    with pytest.raises(ValueError, match="params"):
        mfattn.solve_discrete(random_params(getkey(), 3, 2, 4, 2), measure, loss, beta)
    with pytest.raises(ValueError, match="weights"):
        mfattn.EmpiricalMeasure(x, jnp.ones(5) / 5)
    with pytest.raises(ValueError, match="weights"):
        mfattn.EmpiricalMeasure(x, jnp.array([0.5, 0.5, 0.5, -0.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match="sum to 1"):
        mfattn.EmpiricalMeasure(x, jnp.ones(6))
    with pytest.raises(ValueError, match="empty"):
        mfattn.EmpiricalMeasure(jnp.zeros((0, 3)))
    with pytest.raises(TypeError, match="points"):
        mfattn.EmpiricalMeasure(jnp.zeros((4, 3), dtype=jnp.int32))
    for bad_beta in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            mfattn.solve_discrete(params, measure, loss, bad_beta)
    with pytest.raises(ValueError, match="AttentionParams.K"):
        mfattn.AttentionParams(params.Q, params.K[..., :1], params.V, params.O)
    with pytest.raises(ValueError, match="params"):
        mfattn.solve_discrete(params.layer(0), measure, loss, beta)
    with pytest.raises(ValueError, match="targets"):
        mfattn.solve_discrete(params, measure, mfattn.DenoisingLoss(x[:3]), beta)
    with pytest.raises(ValueError, match="depth|>= 1"):
        mfattn.AttentionParams.xavier_uniform(getkey(), 0, 2, 3, 2)
    with pytest.raises(TypeError, match="loss"):
        mfattn.solve_discrete(params, measure, lambda m: 0.0, beta)
    with pytest.raises(ValueError, match="test_labels"):
        mfattn.solve_discrete(params, measure, loss, beta, test_points=x[:2])


def test_traced_weights_checked_at_runtime():
    @jax.jit
    def make(w):
        return mfattn.EmpiricalMeasure(jnp.zeros((3, 2)), w).weights

    np.testing.assert_allclose(make(jnp.ones(3) / 3), np.ones(3) / 3)
    with pytest.raises(Exception, match="weights"):
        make(jnp.array([2.0, -0.5, -0.5]))
