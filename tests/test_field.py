"""Closed forms of docs/theory.md, section 1 against autodiff (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err, tree_rel_err
from helpers import random_measure, random_params

import mfattn

CASES = [
    # n, d, k, H, beta, uniform
    (1, 3, 2, 1, 1.0, True),
    (6, 4, 3, 1, 0.5, False),
    (7, 3, 5, 4, 5.0, False),
    (9, 5, 2, 3, 50.0, False),
    (8, 2, 2, 2, 20.0, True),
]


def _setup(key, n, d, k, H, beta, uniform):
    k1, k2, k3 = jax.random.split(key, 3)
    measure = random_measure(k1, n, d, uniform, scale=0.7)
    layer = random_params(k2, 1, H, d, k).layer(0)
    x = 0.7 * jax.random.normal(k3, (4, d))
    return mfattn.AttentionField(beta), measure, layer, x


def _natural_scale(field, layer, measure):
    """beta * |O V^T| * |K Q^T| * max|y|^2, the scale of grad_x."""
    OV = jnp.einsum("hdk,hek->hde", layer.O, layer.V)
    KQ = jnp.einsum("hdk,hek->hde", layer.K, layer.Q)
    ymax = jnp.max(jnp.sum(measure.points**2, -1))
    return float(field.beta * jnp.max(jnp.abs(OV)) * jnp.max(jnp.abs(KQ)) * ymax)


@pytest.mark.parametrize("case", CASES)
def test_grad_x_matches_jacfwd(getkey, case):
    field, measure, layer, x = _setup(getkey(), *case)
    closed = field.grad_x(x, measure, layer)
    auto = jax.vmap(jax.jacfwd(lambda xi: field(xi, measure, layer)))(x)
    assert closed.shape == (4, measure.dim, measure.dim)
    assert rel_err(closed, auto, 1e-4 * _natural_scale(field, layer, measure)) < 1e-9
    # single query
    single = field.grad_x(x[0], measure, layer)
    assert rel_err(single, auto[0], 1e-4 * _natural_scale(field, layer, measure)) < 1e-9


@pytest.mark.parametrize("case", CASES)
def test_lions_derivative_is_atom_jacobian(getkey, case):
    field, measure, layer, x = _setup(getkey(), *case)
    closed = field.lions_derivative(x, measure, layer, measure.points)  # (m, n, d, d)

    def gamma_of_atoms(points):
        return field(x, measure.with_points(points), layer)  # (m, d)

    jac = jax.jacfwd(gamma_of_atoms)(measure.points)  # (m, d, n, d)
    jac = jnp.transpose(jac, (0, 2, 1, 3))  # (m, n, d, d)
    weighted = measure.weights[None, :, None, None] * closed
    OV = jnp.einsum("hdk,hek->hde", layer.O, layer.V)
    floor = 1e-4 * float(jnp.max(jnp.abs(OV))) * float(jnp.max(measure.weights))
    assert rel_err(weighted, jac, floor) < 1e-9


def test_lions_derivative_shapes(getkey):
    field, measure, layer, x = _setup(getkey(), 5, 3, 2, 2, 1.0, False)
    d = measure.dim
    assert field.lions_derivative(x[0], measure, layer, x[1]).shape == (d, d)
    assert field.lions_derivative(x, measure, layer, x[1]).shape == (4, d, d)
    assert field.lions_derivative(x[0], measure, layer, x).shape == (4, d, d)


@pytest.mark.parametrize("case", CASES)
def test_param_grad_matches_grad(getkey, case):
    field, measure, layer, x = _setup(getkey(), *case)
    p = jax.random.normal(getkey(), x.shape)
    u = jax.random.uniform(getkey(), (x.shape[0],))
    closed = field.param_grad(x, measure, layer, p, u)

    def pairing(theta):
        return jnp.sum(u * jnp.sum(p * field(x, measure, theta), -1))

    auto = jax.grad(pairing)(layer)
    H = layer.heads
    auto = jax.tree.map(lambda g: H * g, auto)  # Gamma averages heads: g_h = H d/dtheta_h
    assert tree_rel_err(closed, auto) < 1e-9


@pytest.mark.parametrize("case", CASES)
def test_backward_bracket_matches_literal_formula(getkey, case):
    """The fused head-space contraction equals the literal sum (docs/theory.md) of
    grad_x Gamma^T p_i + sum_j w_j d_mu Gamma(x_j)(x_i)^T p_j."""
    field, measure, layer, _ = _setup(getkey(), *case)
    p = jax.random.normal(getkey(), measure.points.shape)
    x = measure.points
    b, _, _ = field.backward(measure, layer, p)
    gx = field.grad_x(x, measure, layer)  # (n, d, d)
    lions = field.lions_derivative(x, measure, layer, x)  # (j, i, d, d)
    literal = jnp.einsum("ide,id->ie", gx, p) + jnp.einsum(
        "j,jide,jd->ie", measure.weights, lions, p
    )
    assert rel_err(b, literal) < 1e-9
    # test-point bracket: a test point placed on an atom gets the atom's bracket
    z = x[:2]
    _, bz, _ = field.backward(measure, layer, p, z, p[:2])
    assert rel_err(bz, b[:2]) < 1e-9


def test_velocity_single_and_batch(getkey):
    field, measure, layer, x = _setup(getkey(), 5, 3, 2, 2, 1.0, False)
    many = field(x, measure, layer)
    assert many.shape == x.shape
    np.testing.assert_allclose(field(x[1], measure, layer), many[1], rtol=1e-12)


def test_low_temperature_is_finite(getkey):
    field, measure, layer, x = _setup(getkey(), 16, 4, 3, 2, 1e3, False)
    assert bool(jnp.all(jnp.isfinite(field(x, measure, layer))))
    assert bool(jnp.all(jnp.isfinite(field.grad_x(x, measure, layer))))
    b, _, g = field.backward(measure, layer, jnp.ones_like(measure.points))
    assert bool(jnp.all(jnp.isfinite(b)))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(g))


def test_zero_weight_atoms_do_not_act(getkey):
    field, measure, layer, x = _setup(getkey(), 5, 3, 2, 2, 3.0, False)
    far = measure.points.at[0].set(100.0)  # an atom with huge scores...
    w = measure.weights.at[0].set(0.0)
    w = w / w.sum()
    with_zero = mfattn.EmpiricalMeasure(far, w)  # ...but zero weight
    without = mfattn.EmpiricalMeasure(far[1:], w[1:])
    assert rel_err(field(x, with_zero, layer), field(x, without, layer)) < 1e-12
