"""The continuous limit: Diffrax forward and closed-form adjoint ODEs."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg
import scipy.stats
from conftest import rel_err, tree_rel_err
from helpers import random_measure

import mfattn

TIGHT = dict(rtol=1e-11, atol=1e-12)


def _grid(key, J1, M, d, k, scale=2.0):
    p = mfattn.AttentionParams.mean_field(key, J1, M, d, k)
    return jax.tree.map(lambda a: scale * a, p)


def test_one_token_matrix_exponential(getkey):
    """n = 1: the field is A x with A = mean_m O_m V_m^T, so x(1) = e^A x(0) and
    p(t) = e^{A^T (1 - t)} p(1)."""
    d = 3
    x0 = jax.random.normal(getkey(), (1, d))
    y = jax.random.normal(getkey(), (1, d))
    params = _grid(getkey(), 2, 4, d, 2)
    ts = jnp.array([0.0, 0.3, 1.0])
    sol = mfattn.solve_limit(
        params,
        mfattn.EmpiricalMeasure(x0),
        mfattn.DenoisingLoss(y),
        1.0,
        saveat=diffrax.SaveAt(ts=ts),
        **TIGHT,
    )
    A = np.mean(np.einsum("mdk,mek->mde", params.O[0], params.V[0]), 0)
    for i, t in enumerate(np.asarray(ts)):
        x_t = scipy.linalg.expm(A * t) @ np.asarray(x0[0])
        assert rel_err(sol.xs[i, 0], x_t) < 1e-8
    p1 = scipy.linalg.expm(A) @ np.asarray(x0[0]) - np.asarray(y[0])
    for i, t in enumerate(np.asarray(ts)):
        assert rel_err(sol.ps[i, 0], scipy.linalg.expm(A.T * (1 - t)) @ p1) < 1e-8


def _euler_errors(key, Ls, loss_kind="mmd"):
    k1, k2, k3 = jax.random.split(key, 3)
    d, k, M, n = 3, 2, 4, 6
    measure = random_measure(k1, n, d, scale=0.8)
    grid = _grid(k2, 2, M, d, k, scale=1.0)  # the same heads at every depth
    if loss_kind == "mmd":
        loss = mfattn.MMDLoss(mfattn.EmpiricalMeasure(jax.random.normal(k3, (5, d))), 1.0)
    else:
        loss = mfattn.DenoisingLoss(jax.random.normal(k3, (n, d)))
    errs_x, errs_p = [], []
    finest = max(Ls)
    save = diffrax.SaveAt(ts=jnp.arange(finest + 1) / finest)
    ref = mfattn.solve_limit(grid, measure, loss, 1.0, saveat=save, **TIGHT)
    for L in Ls:
        disc = mfattn.solve_discrete(
            jax.tree.map(lambda a: jnp.repeat(a[:1], L, axis=0), grid), measure, loss, 1.0
        )
        every = finest // L
        errs_x.append(float(jnp.max(jnp.abs(disc.xs - ref.xs[::every]))))
        errs_p.append(float(jnp.max(jnp.abs(disc.ps - ref.ps[::every]))))
    return np.array(errs_x), np.array(errs_p)


def test_discrete_is_explicit_euler_order_one(getkey):
    Ls = [4, 8, 16, 32, 64]
    ex, ep = _euler_errors(getkey(), Ls)
    for errs in (ex, ep):
        slope = scipy.stats.linregress(np.log(Ls), np.log(errs)).slope
        assert -1.15 <= slope <= -0.85, (slope, errs)


def test_piecewise_constant_path_recovers_discrete_params(getkey):
    params = mfattn.AttentionParams.xavier_uniform(getkey(), 4, 3, 3, 2)
    path = mfattn.ParamPath(params, interpolation=mfattn.PiecewiseConstant())
    for l in range(4):
        for t in (l / 4, l / 4 + 0.1):
            assert tree_rel_err(path(t), params.layer(l)) == 0.0
    # and the limit with constant interpolation is close to the discrete model
    measure = random_measure(getkey(), 5, 3)
    loss = mfattn.DenoisingLoss(jax.random.normal(getkey(), (5, 3)))
    lim = mfattn.solve_limit(
        params, measure, loss, 1.0, interpolation=mfattn.PiecewiseConstant(), **TIGHT
    )
    assert lim.grads.Q.shape == params.Q.shape
    # Euler with r sub-steps per layer converges to it at rate 1/r
    errs = []
    for r in (8, 32):
        fine = jax.tree.map(lambda a: jnp.repeat(a, r, axis=0), params)
        errs.append(rel_err(mfattn.solve_discrete(fine, measure, loss, 1.0).xs[-1], lim.xs[-1]))
    assert 3.0 < errs[0] / errs[1] < 5.0, errs


@pytest.mark.slow
def test_closed_form_adjoint_agrees_with_autodiff_through_solver(getkey):
    d, k, M, n = 3, 2, 3, 5
    measure = random_measure(getkey(), n, d, scale=0.8)
    loss = mfattn.MMDLoss(mfattn.EmpiricalMeasure(jax.random.normal(getkey(), (4, d))), 1.0)
    # a genuinely time-dependent grid
    grid = mfattn.AttentionParams.xavier_uniform(getkey(), 4, M, d, k)
    grid = jax.tree.map(lambda a: 2.0 * a, grid)
    # integrated closed form vs differentiating through the solver: the same object
    errs = []
    for tol in (1e-4, 1e-7, 1e-10):
        # array tolerances are traced: one compilation for the whole sweep
        kw = dict(rtol=jnp.asarray(tol), atol=jnp.asarray(tol))
        v1, g1 = mfattn.limit_gradient(grid, measure, loss, 2.0, **kw)
        v2, g2 = mfattn.limit_gradient(
            grid, measure, loss, 2.0, adjoint=diffrax.RecursiveCheckpointAdjoint(), **kw
        )
        errs.append(tree_rel_err(g1, g2))
    assert errs[-1] < 1e-6, errs
    assert errs[0] > errs[-1]
    _, g3 = mfattn.limit_gradient(
        grid, measure, loss, 2.0, adjoint=diffrax.BacksolveAdjoint(), rtol=1e-10, atol=1e-10
    )
    assert tree_rel_err(g3, g2) < 1e-5


@pytest.mark.slow  # compile-heavy; the default suite stays under 10 minutes on 2 cores
def test_pointwise_gradient_map_converges_under_grid_refinement(getkey):
    """Solution.grads (the gradient map at the nodes) and the rescaled
    autodiff gradient converge to each other as the grid is refined."""
    d, k, M, n = 3, 2, 3, 5
    measure = random_measure(getkey(), n, d, scale=0.8)
    loss = mfattn.DenoisingLoss(jax.random.normal(getkey(), (n, d)))
    base = mfattn.AttentionParams.xavier_uniform(getkey(), 2, M, d, k)
    errs = []
    for J in (2, 4, 8):
        # the same smooth curve theta(t) sampled on finer grids
        t = jnp.linspace(0, 1, J + 1)[:, None, None, None]
        grid = jax.tree.map(lambda a: 2.0 * (a[0][None] * (1 - t) + a[1][None] * t**2), base)
        sol = mfattn.solve_limit(grid, measure, loss, 1.0, **TIGHT)
        _, g = mfattn.limit_gradient(
            grid, measure, loss, 1.0, adjoint=diffrax.RecursiveCheckpointAdjoint(), **TIGHT
        )
        errs.append(tree_rel_err(sol.grads, g))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < errs[0] / 2.5, errs


def test_test_particles_in_the_limit(getkey):
    """A test particle placed on an atom follows the atom and has its adjoint."""
    measure = random_measure(getkey(), 5, 3)
    loss = mfattn.MMDLoss(mfattn.EmpiricalMeasure(jax.random.normal(getkey(), (4, 3))), 1.0)
    grid = _grid(getkey(), 3, 3, 3, 2)
    z = measure.points[:2]
    sol = mfattn.solve_limit(grid, measure, loss, 1.0, test_points=z, rtol=1e-9, atol=1e-9)
    assert rel_err(sol.test_xs, sol.xs[:, :2]) < 1e-7
    assert rel_err(sol.test_ps, sol.ps[:, :2]) < 1e-7


def test_jit_and_vmap_over_measures(getkey):
    grid = _grid(getkey(), 3, 3, 3, 2)
    pts = jax.random.normal(getkey(), (3, 4, 3))
    tgt = jax.random.normal(getkey(), (3, 4, 3))
    f = jax.jit(
        jax.vmap(
            lambda p, y: mfattn.solve_limit(
                grid, mfattn.EmpiricalMeasure(p), mfattn.DenoisingLoss(y), 1.0
            )
        )
    )
    sols = f(pts, tgt)
    one = mfattn.solve_limit(
        grid, mfattn.EmpiricalMeasure(pts[1]), mfattn.DenoisingLoss(tgt[1]), 1.0
    )
    assert sols.xs.shape == (3, 3, 4, 3)
    assert rel_err(sols.ps[1], one.ps) < 1e-6
    assert tree_rel_err(jax.tree.map(lambda a: a[1], sols.grads), one.grads) < 1e-6


def test_bad_grids(getkey):
    grid = _grid(getkey(), 3, 2, 3, 2)
    measure = random_measure(getkey(), 4, 3)
    loss = mfattn.DenoisingLoss(measure.points)
    with pytest.raises(ValueError, match="increasing"):
        mfattn.ParamPath(grid, jnp.array([0.0, 0.6, 0.5]))
    with pytest.raises(ValueError, match="end at 1"):
        mfattn.ParamPath(grid, jnp.array([0.0, 0.5, 0.9]))
    with pytest.raises(ValueError, match="start at 0"):
        mfattn.ParamPath(grid, jnp.array([0.1, 0.5, 1.0]))
    with pytest.raises(ValueError, match="nodes"):
        mfattn.ParamPath(grid, jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="interpolation"):
        mfattn.ParamPath(grid, interpolation="cubic")
    with pytest.raises(ValueError, match="`params`"):
        mfattn.solve_limit(grid.layer(0), measure, loss, 1.0)
    with pytest.raises(ValueError, match="beta"):
        mfattn.solve_limit(grid, measure, loss, -1.0)
    with pytest.raises(ValueError, match="d=3"):
        mfattn.solve_limit(grid, random_measure(getkey(), 4, 2), loss, 1.0)


@pytest.mark.slow  # compile-heavy; the default suite stays under 10 minutes on 2 cores
def test_training_the_limit_reduces_loss():
    task = mfattn.DenoisingTask(dim=3, num_tokens=8, num_clusters=2)
    grid = mfattn.AttentionParams.mean_field(jax.random.key(0), 3, 4, 3, 2)
    model = mfattn.MeanFieldTransformer(grid, 1.0, rtol=1e-4, atol=1e-6)
    before = mfattn.evaluate(model, task, jax.random.key(9), 32)
    res = mfattn.train(
        model,
        task,
        optax.adamw(3e-2),
        30,
        jax.random.key(1),
        batch_size=4,
        steps_per_call=10,
        progress=False,
    )
    after = mfattn.evaluate(res.model, task, jax.random.key(9), 32)
    assert float(after) < 0.9 * float(before)
    # every (particle, node) pair moved on its own
    moved = jnp.abs(res.model.params.Q - grid.Q).sum(axis=(-2, -1))
    assert moved.shape == (3, 4) and bool(jnp.all(moved > 0))
