"""Antithetic mean-field initialisation and the flow error of SPEC section 7."""

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
        grid, measure, loss, 1.0, test_points=z, test_labels=z, ts=jnp.arange(5) / 4
    )
    direct = jnp.max(
        jnp.linalg.norm(d.test_xs - lim.test_xs, axis=-1)
        + jnp.linalg.norm(d.test_ps - lim.test_ps, axis=-1),
        axis=0,
    )
    assert err.shape == (6,)
    assert rel_err(err, direct) < 1e-12
