"""The token flow of fixed parameters (`mfattn.attention_flow`), in R^d and on
the sphere, against exact solutions: one token (a linear ODE, or its
normalisation), a time-dependent linear path, and the equiangular ODE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from scipy.linalg import expm
from scipy.stats import linregress

import mfattn


def _one_token_case(seed, d=3, k=2, H=2):
    """One token attends only to itself: Gamma(x) = A x, A = (1/H) sum_h O_h V_h^T,
    whatever Q, K and beta."""
    layer = mfattn.AttentionParams.xavier_uniform(jax.random.key(seed), 1, H, d, k).layer(0)
    A = np.einsum("hdk,hek->de", layer.O, layer.V) / H
    x0 = np.random.default_rng(seed).standard_normal(d)
    return layer, A, x0


@pytest.mark.parametrize(
    "geometry",
    [
        pytest.param(mfattn.Euclidean(), marks=pytest.mark.slow, id="euclidean"),
        pytest.param(mfattn.Sphere(), id="sphere"),
    ],
)
def test_one_token_linear_flow(geometry):
    """x' = A x: x(t) = e^{tA} x0. On the sphere, x' = P_x A x, whose solution is
    the normalised linear flow e^{tA} x0 / |e^{tA} x0| (from a unit x0)."""
    layer, A, x0 = _one_token_case(0)
    if isinstance(geometry, mfattn.Sphere):
        x0 = x0 / np.linalg.norm(x0)
    ts = np.linspace(0.0, 3.0, 7)
    xs = mfattn.attention_flow(
        layer,
        mfattn.EmpiricalMeasure(jnp.asarray(x0[None])),
        2.0,
        jnp.asarray(ts),
        geometry=geometry,
        rtol=1e-11,
        atol=1e-13,
    )
    exact = np.stack([expm(t * A) @ x0 for t in ts])
    if isinstance(geometry, mfattn.Sphere):
        exact /= np.linalg.norm(exact, axis=-1, keepdims=True)
    assert rel_err(xs[:, 0], exact) < 1e-9


@pytest.mark.slow
def test_param_path_time_dependent():
    """A ParamPath from O = a M to O = b M (V = I, one token):
    x' = ((1 - t) a + t b) M x, so x(t) = exp((a t + (b - a) t^2 / 2) M) x0."""
    d = 3
    rng = np.random.default_rng(3)
    M = rng.standard_normal((d, d)) / 2
    eye = np.eye(d)[None, None]
    a, b = 0.5, -1.5
    O = np.stack([a * M, b * M])[:, None]
    grid = mfattn.AttentionParams(*map(jnp.asarray, (np.tile(eye, (2, 1, 1, 1)),) * 3 + (O,)))
    path = mfattn.ParamPath(grid)
    x0 = rng.standard_normal(d)
    ts = np.linspace(0.0, 1.0, 5)
    xs = mfattn.attention_flow(
        path,
        mfattn.EmpiricalMeasure(jnp.asarray(x0[None])),
        1.0,
        jnp.asarray(ts),
        rtol=1e-11,
        atol=1e-13,
    )
    exact = np.stack([expm((a * t + (b - a) * t**2 / 2) * M) @ x0 for t in ts])
    assert rel_err(xs[:, 0], exact) < 1e-9


@pytest.mark.parametrize(
    "n,beta,rho0",
    [
        (5, 5.0, 0.3),
        pytest.param(2, 1.0, -0.6, marks=pytest.mark.slow),
        pytest.param(16, 4.0, 0.05, marks=pytest.mark.slow),
    ],
)
def test_sphere_equiangular_to_1e7(getkey, n, beta, rho0):
    """Q = K = V = O = I on the sphere from equiangular tokens: they stay
    equiangular, on the sphere, and rho(t) is the scalar ODE's to 1e-7."""
    dim, T = n + 1, 3.0
    x0 = mfattn.equiangular_points(n, dim, rho0, key=getkey())
    ts = np.linspace(0.0, T, 13)
    xs = np.asarray(
        mfattn.attention_flow(
            mfattn.identity_layer(dim),
            mfattn.EmpiricalMeasure(x0),
            beta,
            jnp.asarray(ts),
            geometry=mfattn.Sphere(),
            rtol=1e-12,
            atol=1e-12,
        )
    )
    gram = np.einsum("tnd,tmd->tnm", xs, xs)
    off = gram[:, ~np.eye(n, dtype=bool)]
    assert np.max(off.max(-1) - off.min(-1)) < 1e-9
    ref = mfattn.equiangular_rho(ts, rho0, beta, n)
    assert np.max(np.abs(off.mean(-1) - ref)) < 1e-7
    assert np.max(np.abs(np.linalg.norm(xs, axis=-1) - 1)) < 1e-9
    assert abs(ref[-1] - rho0) > 0.05  # the dynamics did something


def test_bad_input(getkey):
    layer = mfattn.identity_layer(2)
    measure = mfattn.EmpiricalMeasure(jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="geometry"):
        mfattn.attention_flow(layer, measure, 1.0, jnp.array([0.0, 1.0]), geometry="ball")
    with pytest.raises(ValueError, match="increasing"):
        mfattn.attention_flow(layer, measure, 1.0, jnp.array([0.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="d=3"):
        mfattn.attention_flow(mfattn.identity_layer(3), measure, 1.0, jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="dim"):
        mfattn.identity_layer(0)


def test_discrete_sphere_converges_at_order_one(getkey):
    """The post-normalised transformer x^{l+1} = N(x^l + Gamma / L), with one
    layer repeated L times, tends to the projected flow at t = 1 like 1/L."""
    d, H, n, beta = 3, 2, 6, 2.0
    layer = mfattn.AttentionParams.xavier_uniform(getkey(), 1, H, d, 2).layer(0)
    layer = mfattn.AttentionParams(layer.Q, layer.K, layer.V, 4 * layer.O)  # visible motion
    x0 = jax.random.normal(getkey(), (n, d))
    x0 = x0 / jnp.linalg.norm(x0, axis=-1, keepdims=True)
    measure = mfattn.EmpiricalMeasure(x0)
    loss = mfattn.DenoisingLoss(jnp.zeros_like(x0))
    ref = mfattn.attention_flow(
        layer,
        measure,
        beta,
        jnp.array([0.0, 1.0]),
        geometry=mfattn.Sphere(),
        rtol=1e-12,
        atol=1e-12,
    )[-1]
    Ls = np.array([16, 32, 64])  # the asymptotic range (at L = 4 the 1/L^2 term shows)
    errs = []
    for L in Ls:
        params = jax.tree.map(lambda a: jnp.stack([a] * int(L)), layer)
        sol = mfattn.solve_discrete(params, measure, loss, beta, geometry=mfattn.Sphere())
        assert np.max(np.abs(np.linalg.norm(np.asarray(sol.xs), axis=-1) - 1)) < 1e-12
        errs.append(float(jnp.max(jnp.abs(sol.xs[-1] - ref))))
    slope = linregress(np.log(Ls), np.log(errs)).slope
    assert -1.15 < slope < -0.85, (slope, errs)
