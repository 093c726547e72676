"""Antithetic mean-field initialisation and the flow error of docs/theory.md, section 7."""

import diffrax
import jax
import jax.numpy as jnp
import pytest
from conftest import rel_err
from helpers import random_measure

import mfattn


def test_antithetic_limit_does_not_move_at_init(getkey):
    grid = mfattn.antithetic_mean_field(getkey(), 3, 8, 3, 2)
    assert grid.Q.shape == (3, 8, 3, 2)
    assert float(jnp.max(jnp.abs(grid.O[:, :4] + grid.O[:, 4:]))) == 0.0  # exact pairs
    measure = random_measure(getkey(), 5, 3)
    loss = mfattn.DenoisingLoss(jax.random.normal(getkey(), (5, 3)))
    sol = mfattn.solve_limit(grid, measure, loss, 1.0)
    assert rel_err(sol.xs[-1], measure.points) < 1e-12
    with pytest.raises(ValueError, match="even"):
        mfattn.antithetic_mean_field(getkey(), 3, 7, 3, 2)


def test_flow_error_matches_direct_computation(getkey):
    measure = random_measure(getkey(), 5, 3)
    loss = mfattn.DenoisingLoss(jax.random.normal(getkey(), (5, 3)))
    params = mfattn.AttentionParams.xavier_uniform(getkey(), 4, 3, 3, 2)
    grid = mfattn.AttentionParams.mean_field(getkey(), 3, 4, 3, 2)
    z = jax.random.normal(getkey(), (6, 3))
    err = mfattn.flow_error(params, grid, measure, loss, 1.0, z, z)
    d = mfattn.solve_discrete(params, measure, loss, 1.0, test_points=z, test_labels=z)
    lim = mfattn.solve_limit(
        grid,
        measure,
        loss,
        1.0,
        test_points=z,
        test_labels=z,
        saveat=diffrax.SaveAt(ts=jnp.arange(5) / 4),
    )
    direct = jnp.max(
        jnp.linalg.norm(d.test_xs - lim.test_xs, axis=-1)
        + jnp.linalg.norm(d.test_ps - lim.test_ps, axis=-1),
        axis=0,
    )
    assert err.shape == (6,)
    assert rel_err(err, direct) < 1e-12


@pytest.mark.parametrize("method", ["random", "sobol"])
def test_antithetic_variants_keep_the_law_and_the_pairs(getkey, method):
    key = getkey()
    grid = mfattn.antithetic_mean_field(key, 3, 16, 3, 2, sampling=method, independent_nodes=True)
    a = (6 / 5) ** 0.5
    assert grid.Q.shape == (3, 16, 3, 2)
    assert float(jnp.max(jnp.abs(grid.O[:, :8] + grid.O[:, 8:]))) == 0.0
    assert float(jnp.max(jnp.abs(grid.Q))) <= a
    assert float(jnp.min(jnp.abs(grid.Q[0] - grid.Q[1]))) > 0  # independent nodes
    shared = mfattn.antithetic_mean_field(key, 3, 16, 3, 2, sampling=method)
    assert float(jnp.max(jnp.abs(shared.Q[0] - shared.Q[2]))) == 0.0
    again = mfattn.antithetic_mean_field(key, 3, 16, 3, 2, sampling=method, independent_nodes=True)
    assert float(jnp.max(jnp.abs(again.V - grid.V))) == 0.0  # deterministic in the key
    # the limit does not move at initialisation, node by node
    measure = random_measure(getkey(), 5, 3)
    loss = mfattn.DenoisingLoss(jax.random.normal(getkey(), (5, 3)))
    sol = mfattn.solve_limit(grid, measure, loss, 1.0, interpolation=mfattn.PiecewiseConstant())
    assert rel_err(sol.xs[-1], measure.points) < 1e-12
    with pytest.raises(ValueError, match="sampling"):
        mfattn.antithetic_mean_field(key, 3, 16, 3, 2, sampling="halton")


def test_sobol_entries_are_uniform_on_the_xavier_interval(getkey):
    grid = mfattn.antithetic_mean_field(getkey(), 1, 2048, 4, 4, sampling="sobol")
    u = jnp.concatenate([grid.Q.ravel(), grid.K.ravel(), grid.V.ravel()])
    a = (6 / 8) ** 0.5
    # stratified: the empirical CDF is within 1e-2 of the uniform one
    qs = jnp.quantile(u, jnp.linspace(0.05, 0.95, 19))
    assert float(jnp.max(jnp.abs(qs - a * (2 * jnp.linspace(0.05, 0.95, 19) - 1)))) < 2e-2 * a


@pytest.mark.slow  # compile-heavy; the default suite stays under 10 minutes on 2 cores
def test_flow_error_is_differentiable_in_the_test_points(getkey):
    measure = random_measure(getkey(), 5, 3)
    loss = mfattn.DenoisingLoss(jax.random.normal(getkey(), (5, 3)))
    params = mfattn.AttentionParams.xavier_uniform(getkey(), 2, 3, 3, 2)
    grid = mfattn.AttentionParams.mean_field(getkey(), 2, 4, 3, 2)
    z = jax.random.normal(getkey(), (2, 3))
    kw = dict(interpolation=mfattn.PiecewiseConstant(), rtol=1e-10, atol=1e-10)
    f = jax.jit(
        lambda z: jnp.sum(mfattn.flow_error(params, grid, measure, loss, 1.0, z, z * 0, **kw))
    )
    g = jax.grad(f)(z)
    assert bool(jnp.all(jnp.isfinite(g)))
    e = jnp.zeros_like(z).at[0, 1].set(1e-6)
    fd = (f(z + e) - f(z - e)) / 2e-6
    assert abs(float(g[0, 1]) - float(fd)) < 1e-5 * max(1.0, abs(float(fd)))
