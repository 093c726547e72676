"""Linear stability of the uniform distribution on the circle: the growth rates
against quadrature and against the particle dynamics, the predicted cluster
count against published values, Fourier modes of known configurations."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import quad
from sphere_reference import projected_rk4

import mfattn


@pytest.mark.parametrize("beta", [0.3, 2.0, 7.0, 40.0])
def test_growth_rates_against_quadrature(beta):
    """lambda_k = (1 / (2 pi I_0)) * k * int e^{beta cos} sin(psi) sin(k psi) dpsi,
    the linearisation before the Bessel identities are applied."""
    modes = np.arange(0, 8)
    got = mfattn.circle_growth_rates(beta, modes)
    i0 = quad(lambda p: np.exp(beta * (np.cos(p) - 1)), 0, 2 * np.pi, epsabs=0, epsrel=1e-12)[0]
    for k, lam in zip(modes, got):
        integral = quad(
            lambda p: np.exp(beta * (np.cos(p) - 1)) * np.sin(p) * np.sin(k * p),
            0,
            2 * np.pi,
            epsabs=0,
            epsrel=1e-12,
            limit=200,
        )[0]
        ref = k * integral / i0
        assert abs(lam - ref) <= 1e-10 * max(abs(ref), got.max()), (k, lam, ref)


def test_growth_rates_finite_at_low_temperature():
    lam = mfattn.circle_growth_rates(1e4, np.arange(0, 400))
    assert np.all(np.isfinite(lam)) and lam[0] == 0
    # large beta: lambda_k ~ (k^2 / beta) e^{-k^2 / (2 beta)}, maximal near sqrt(2 beta)
    k = np.arange(1, 400)
    approx = k**2 / 1e4 * np.exp(-(k**2) / 2e4)
    assert np.max(np.abs(lam[1:] - approx)) < 2e-3 * approx.max()


def test_predicted_cluster_count_published_values():
    """Bruno, Pasqualotto, Agazzi (arXiv 2410.23228, public notebook): 3 clusters
    at beta = 5 and 4 at beta = 7; small beta gives one cluster; sqrt(2 beta)
    asymptotically."""
    assert mfattn.predicted_cluster_count(5.0) == 3
    assert mfattn.predicted_cluster_count(7.0) == 4
    assert mfattn.predicted_cluster_count(0.5) == 1
    for beta in (1e3, 1e4):
        assert abs(mfattn.predicted_cluster_count(beta) - np.sqrt(2 * beta)) <= 1


@pytest.mark.parametrize(
    "beta,k",
    [
        (2.0, 2),
        (5.0, 5),
        pytest.param(2.0, 1, marks=pytest.mark.slow),
        pytest.param(5.0, 3, marks=pytest.mark.slow),
    ],
)
def test_growth_rate_of_particle_dynamics(beta, k):
    """N equally spaced tokens displaced by eps cos(k theta): the displacement mode
    grows like e^{lambda_k t}. On the lattice the sums are trapezoidal rules of
    periodic analytic functions, exact to ~I_{N-k}(beta) / I_0(beta), so the
    continuum rate is the lattice's to rounding; the nonlinear correction is
    O(eps)."""
    N, eps, T = 64, 1e-7, 1.0
    theta0 = 2 * np.pi * np.arange(N) / N
    theta = theta0 + eps * np.cos(k * theta0)
    x0 = jnp.stack([jnp.cos(theta), jnp.sin(theta)], -1)
    ts, xs = projected_rk4(x0, beta, T, 400, save_every=100)
    disp = np.angle(np.exp(1j * (np.arctan2(xs[..., 1], xs[..., 0]) - theta0)))
    amp = 2 / N * disp @ np.cos(k * theta0)  # projection on the mode
    lam = mfattn.circle_growth_rates(beta, [k])[0]
    assert np.max(np.abs(amp / (eps * np.exp(lam * np.asarray(ts))) - 1)) < 1e-5


def test_fourier_modes_known_configurations(getkey):
    K = 5
    theta = np.repeat(2 * np.pi * np.arange(K) / K + 0.3, 7)
    x = jnp.stack([jnp.cos(theta), jnp.sin(theta)], -1)
    f = np.asarray(mfattn.circle_fourier_modes(x, np.arange(1, 16)))
    multiples = np.arange(1, 16) % K == 0
    assert np.allclose(f[multiples], 1, atol=1e-13) and np.allclose(f[~multiples], 0, atol=1e-13)
    # one cluster: all ones; scaling the points does not matter
    one = jnp.tile(jnp.array([[0.6, -0.8]]), (4, 1))
    assert np.allclose(mfattn.circle_fourier_modes(3 * one, np.arange(6)), 1, atol=1e-14)
    with pytest.raises(ValueError, match="R\\^2"):
        mfattn.circle_fourier_modes(jnp.ones((3, 3)), [1])
