"""The equiangular reduction: construction of equiangular tokens, the scalar ODE
for their inner product, and the particle dynamics on the sphere against it."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sphere_reference import identity_heads, projected_rk4

import mfattn


@pytest.mark.parametrize(
    "n,dim",
    [
        (3, 3),
        (5, 7),
        pytest.param(2, 2, marks=pytest.mark.slow),
        pytest.param(8, 8, marks=pytest.mark.slow),
    ],
)
def test_equiangular_points_gram(getkey, n, dim):
    for rho in (-1.0 / (n - 1), -0.5 / (n - 1), 0.0, 0.37, 1.0):
        for key in (None, getkey()):
            x = np.asarray(mfattn.equiangular_points(n, dim, rho, key=key))
            assert x.shape == (n, dim)
            gram = (1 - rho) * np.eye(n) + rho * np.ones((n, n))
            assert np.max(np.abs(x @ x.T - gram)) < 1e-14


def test_equiangular_points_errors():
    with pytest.raises(ValueError, match="dim"):
        mfattn.equiangular_points(4, 3, 0.0)
    with pytest.raises(ValueError, match="rho"):
        mfattn.equiangular_points(4, 4, -0.5)  # below -1/(n-1) = -1/3
    with pytest.raises(ValueError, match="rho"):
        mfattn.equiangular_rho([0.0, 1.0], 1.5, 1.0, 3)
    with pytest.raises(ValueError, match="beta"):
        mfattn.equiangular_rho([0.0, 1.0], 0.1, -1.0, 3)


@pytest.mark.parametrize("n", [2, 3, 10])
def test_equiangular_rho_beta_zero_closed_form(n):
    """At beta = 0, (1 + (n-1) rho) / (1 - rho) = r0 e^{2t}."""
    ts = np.linspace(0, 3, 31)
    for rho0 in (-0.9 / (n - 1), 0.0, 0.5):
        r = (1 + (n - 1) * rho0) / (1 - rho0) * np.exp(2 * ts)
        exact = (r - 1) / (r + n - 1)
        got = mfattn.equiangular_rho(ts, rho0, 0.0, n)
        assert np.max(np.abs(got - exact)) < 1e-11, np.max(np.abs(got - exact))


def test_equiangular_velocity_forms_agree():
    """The overflow-free form equals the ODE as written in docs/theory.md."""
    rho = np.linspace(-0.2, 0.99, 50)
    for n, beta in [(3, 0.5), (5, 4.0), (9, 20.0)]:
        direct = (
            2
            * np.exp(beta * rho)
            * (1 - rho)
            * ((n - 1) * rho + 1)
            / (np.exp(beta) + (n - 1) * np.exp(beta * rho))
        )
        assert np.max(np.abs(mfattn.equiangular_velocity(rho, beta, n) - direct)) < 1e-14
    # finite at beta = 1e4, and zero at the fixed points rho = 1, rho = -1/(n-1)
    assert np.all(np.isfinite(mfattn.equiangular_velocity(rho, 1e4, 5)))
    assert mfattn.equiangular_velocity(1.0, 3.0, 5) == 0.0
    assert mfattn.equiangular_velocity(-0.25, 3.0, 5) == 0.0


def _offdiag(x):
    g = np.asarray(x @ jnp.swapaxes(x, -1, -2))
    n = g.shape[-1]
    return g[..., ~np.eye(n, dtype=bool)]


@pytest.mark.parametrize(
    "n,dim,beta,rho0",
    [
        (5, 5, 9.0, 0.6),
        pytest.param(2, 2, 1.0, -0.6, marks=pytest.mark.slow),
        pytest.param(3, 4, 4.0, 0.0, marks=pytest.mark.slow),
        pytest.param(8, 9, 2.0, -0.1, marks=pytest.mark.slow),
    ],
)
def test_particles_stay_equiangular_and_follow_the_ode(getkey, n, dim, beta, rho0):
    """Projected RK4 of the particle system (Q = K = V = O = I, one head, uniform
    weights) from equiangular tokens: the tokens stay equiangular and their
    inner product is the scalar ODE's, to the integrator's O(dt^4) error."""
    x0 = mfattn.equiangular_points(n, dim, rho0, key=getkey())
    T, steps = 2.0, 1000
    ts, xs = projected_rk4(x0, beta, T, steps, save_every=100)
    off = _offdiag(xs)
    assert np.max(off.max(-1) - off.min(-1)) < 1e-12  # equiangular to round-off
    ref = mfattn.equiangular_rho(np.asarray(ts), rho0, beta, n)
    err = np.max(np.abs(off.mean(-1) - ref))
    assert err < 1e-9, err
    # at coarse steps the error is the integrator's: order 4 in dt
    errs = []
    for coarse in (20, 40):
        tc, xc = projected_rk4(x0, beta, T, coarse, save_every=coarse // 4)
        refc = mfattn.equiangular_rho(np.asarray(tc), rho0, beta, n)
        errs.append(np.max(np.abs(_offdiag(xc).mean(-1) - refc)))
    assert 10 < errs[0] / errs[1] < 24, errs
    # and the dynamics is not trivial: rho moved
    assert abs(ref[-1] - rho0) > 0.05


@pytest.mark.parametrize(
    "n,beta,rho0",
    [
        (3, 4.0, 0.0),
        pytest.param(2, 1.0, -0.6, marks=pytest.mark.slow),
        pytest.param(5, 9.0, 0.2, marks=pytest.mark.slow),
    ],
)
def test_solve_limit_sphere_equiangular(getkey, n, beta, rho0):
    """The library's normalised limit reproduces the equiangular ODE to 1e-7 at
    tight tolerance. The horizon T is reached on [0, 1] by taking O = T I
    (the field is linear in O V^T)."""
    dim, T = n + 1, 2.0
    x0 = mfattn.equiangular_points(n, dim, rho0, key=getkey())
    heads = identity_heads(dim, scale=T)
    grid = jax.tree.map(lambda a: jnp.stack([a, a]), heads)  # constant path, 2 nodes
    loss = mfattn.DenoisingLoss(jnp.zeros_like(x0))
    ts = jnp.linspace(0.0, 1.0, 11)
    sol = mfattn.solve_limit(
        grid,
        mfattn.EmpiricalMeasure(x0),
        loss,
        beta,
        saveat=diffrax.SaveAt(ts=ts),
        rtol=1e-12,
        atol=1e-12,
        max_steps=100_000,
        geometry=mfattn.Sphere(),
    )
    off = _offdiag(sol.xs)
    assert np.max(off.max(-1) - off.min(-1)) < 1e-9
    ref = mfattn.equiangular_rho(T * np.asarray(ts), rho0, beta, n)
    assert np.max(np.abs(off.mean(-1) - ref)) < 1e-7
    assert np.max(np.abs(np.linalg.norm(np.asarray(sol.xs), axis=-1) - 1)) < 1e-9
