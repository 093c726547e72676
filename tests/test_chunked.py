"""The chunked (O(n * chunk) memory) kernels equal the dense reference path."""

import jax
import jax.numpy as jnp
import pytest
from conftest import rel_err, tree_rel_err
from helpers import random_loss, random_measure, random_params

import mfattn


@pytest.mark.parametrize(("beta", "chunk"), [(2.0, 3), (1e3, 16)])
def test_chunked_discrete_equals_dense(getkey, beta, chunk):
    measure = random_measure(getkey(), 13, 3)  # 13: not a multiple of the chunk
    params = random_params(getkey(), 3, 4, 3, 2)
    loss = random_loss(getkey(), "mmd", measure)
    z = jax.random.normal(getkey(), (5, 3))
    dense = mfattn.solve_discrete(params, measure, loss, beta, test_points=z)
    chunked = mfattn.solve_discrete(params, measure, loss, beta, test_points=z, chunk_size=chunk)
    for name in ("xs", "ps", "test_xs", "test_ps"):
        assert rel_err(getattr(chunked, name), getattr(dense, name)) < 1e-10, name
    assert tree_rel_err(chunked.grads, dense.grads) < 1e-10


def test_chunked_limit_and_zero_weights(getkey):
    pts = jax.random.normal(getkey(), (9, 3))
    w = jnp.array([0.0, 0.2, 0.1, 0.0, 0.2, 0.1, 0.2, 0.2, 0.0])
    measure = mfattn.EmpiricalMeasure(pts, w)
    loss = mfattn.DenoisingLoss(jax.random.normal(getkey(), (9, 3)))
    grid = random_params(getkey(), 3, 2, 3, 2)
    dense = mfattn.solve_limit(grid, measure, loss, 1.0, rtol=1e-9, atol=1e-9)
    chunked = mfattn.solve_limit(grid, measure, loss, 1.0, rtol=1e-9, atol=1e-9, chunk_size=4)
    assert rel_err(chunked.xs, dense.xs) < 1e-10
    assert rel_err(chunked.ps, dense.ps) < 1e-10
    assert tree_rel_err(chunked.grads, dense.grads) < 1e-10
