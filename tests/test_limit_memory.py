"""The checkpointed closed-form adjoint of the limit: the same numbers as the
dense-output route, with memory that does not grow with `max_steps`."""

import diffrax
import jax
import jax.numpy as jnp
import pytest
from conftest import tree_rel_err
from helpers import random_measure

import mfattn


def _problem(key, n=5, d=3, k=2, M=3, J=4):
    k1, k2, k3 = jax.random.split(key, 3)
    measure = random_measure(k1, n, d, scale=0.8)
    loss = mfattn.MMDLoss(mfattn.EmpiricalMeasure(jax.random.normal(k2, (4, d))), 1.0)
    grid = mfattn.AttentionParams.xavier_uniform(k3, J + 1, M, d, k)
    return jax.tree.map(lambda a: 2.0 * a, grid), measure, loss


def test_euler_segments_on_the_steps_are_the_dense_route(getkey):
    """Fixed Euler steps of 1/64 and 4 segments: the segments' ends are steps
    of the one solve, so both routes take the same steps, and `solve_limit`'s
    states, adjoints, test particles and gradient map are equal to rounding
    (reported at times inside the segments and on their ends)."""
    grid, measure, loss = _problem(getkey())
    z = jax.random.normal(getkey(), (2, 3))
    kw = dict(solver=diffrax.Euler(), dt0=1 / 64, saveat=diffrax.SaveAt(ts=jnp.linspace(0, 1, 9)))
    s0 = mfattn.solve_limit(grid, measure, loss, 2.0, z, **kw)
    s1 = mfattn.solve_limit(grid, measure, loss, 2.0, z, checkpoints=4, **kw)
    for a, b in [
        (s1.xs, s0.xs),
        (s1.ps, s0.ps),
        (s1.test_xs, s0.test_xs),
        (s1.test_ps, s0.test_ps),
        (s1.grads, s0.grads),
    ]:
        assert tree_rel_err(a, b) < 1e-12
    assert abs(float(s1.loss - s0.loss)) < 1e-13


@pytest.mark.slow
def test_checkpointed_agrees_with_dense_route_to_tolerance(getkey):
    """Adaptive Tsit5: segments that do not fall on the grid nodes, the
    controller restarted at every segment's end; `solve_limit`'s states,
    adjoints, test particles and gradient map agree with the dense route to
    the solver's tolerance."""
    grid, measure, loss = _problem(getkey())
    z = jax.random.normal(getkey(), (2, 3))
    tol = dict(rtol=1e-10, atol=1e-10)
    s0 = mfattn.solve_limit(grid, measure, loss, 2.0, z, **tol)
    s1 = mfattn.solve_limit(
        grid, measure, loss, 2.0, z, checkpoints=7, segment_max_steps=128, **tol
    )
    for a, b in [
        (s1.xs, s0.xs),
        (s1.ps, s0.ps),
        (s1.test_xs, s0.test_xs),
        (s1.test_ps, s0.test_ps),
        (s1.grads, s0.grads),
    ]:
        assert tree_rel_err(a, b) < 1e-7
    assert abs(float(s1.loss - s0.loss)) < 1e-10


@pytest.mark.slow
def test_checkpointed_gradient_is_the_autodiff_gradient(getkey):
    """`limit_gradient` with Tsit5: against the dense route, `jax.grad` through
    the solver and a central finite difference."""
    grid, measure, loss = _problem(getkey())
    tol = dict(rtol=1e-10, atol=1e-10)
    adjoint = mfattn.ClosedFormAdjoint(checkpoints=7, segment_max_steps=128)
    value, g1 = mfattn.limit_gradient(grid, measure, loss, 2.0, adjoint=adjoint, **tol)
    _, g0 = mfattn.limit_gradient(grid, measure, loss, 2.0, **tol)
    assert tree_rel_err(g1, g0) < 1e-7
    _, g2 = mfattn.limit_gradient(
        grid, measure, loss, 2.0, adjoint=diffrax.RecursiveCheckpointAdjoint(), **tol
    )
    assert tree_rel_err(g1, g2) < 1e-6
    # d loss / d Q[1, 0, 0, 0] = g / M * c_1 in the mean-field normalisation
    c = grid.Q.shape[1] / mfattn.ParamPath(grid).basis_integrals()[1]
    eps = 1e-5

    def loss_at(h):
        q = grid.Q.at[1, 0, 0, 0].add(h)
        p = mfattn.AttentionParams(q, grid.K, grid.V, grid.O)
        return mfattn.limit_gradient(p, measure, loss, 2.0, **tol)[0]

    fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert abs(float(c * fd - g1.Q[1, 0, 0, 0])) < 1e-6 * float(jnp.max(jnp.abs(g1.Q)))


@pytest.mark.slow  # a property of the compiled program; benchmarks/limit_memory.py measures it
def test_memory_does_not_grow_with_max_steps(getkey):
    """XLA's accounting of the compiled forward + adjoint (`limit_gradient`):
    the checkpointed route's temporary memory does not grow with `max_steps`,
    and is below the dense route's by its buffers of `max_steps` steps. With
    Euler steps that fall on the segments' ends both give the same gradient."""
    grid, measure, loss = _problem(getkey(), n=64, d=4)

    def compiled(max_steps, checkpoints):
        adjoint = mfattn.ClosedFormAdjoint(checkpoints=checkpoints, segment_max_steps=16)

        def f(g):
            return mfattn.limit_gradient(
                g,
                measure,
                loss,
                2.0,
                adjoint=adjoint,
                max_steps=max_steps,
                solver=diffrax.Euler(),
                dt0=1 / 16,
            )

        return jax.jit(f).lower(grid).compile()

    def temp(c):
        return c.memory_analysis().temp_size_in_bytes

    state = 64 * 4 * 8
    ckpt = [compiled(m, 8) for m in (64, 1024)]
    dense = compiled(1024, None)
    assert temp(ckpt[1]) == temp(ckpt[0])
    assert temp(dense) - temp(ckpt[1]) > 2 * 900 * state  # the dense y0, y1 per step
    (v0, g0), (v1, g1) = dense(grid), ckpt[1](grid)
    assert abs(float(v1 - v0)) < 1e-13
    assert tree_rel_err(g1, g0) < 1e-12


def test_segment_step_cap_and_bad_options(getkey):
    grid, measure, loss = _problem(getkey(), J=2)
    euler = dict(solver=diffrax.Euler(), dt0=1 / 16)  # 8 steps a segment
    capped = mfattn.ClosedFormAdjoint(checkpoints=2, segment_max_steps=7)
    with pytest.raises(Exception, match="segment_max_steps=7 steps"):
        mfattn.limit_gradient(grid, measure, loss, 2.0, adjoint=capped, **euler)
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="checkpoints"):
            mfattn.ClosedFormAdjoint(checkpoints=bad)
        with pytest.raises(ValueError, match="segment_max_steps"):
            mfattn.solve_limit(grid, measure, loss, 2.0, checkpoints=2, segment_max_steps=bad)
    with pytest.raises((TypeError, ValueError)):  # TypeError under runtime type checks
        mfattn.ClosedFormAdjoint(checkpoints=1.5)
    with pytest.raises(ValueError, match="StepTo"):
        mfattn.solve_limit(
            grid,
            measure,
            loss,
            2.0,
            checkpoints=2,
            solver=diffrax.Euler(),
            stepsize_controller=diffrax.StepTo(ts=jnp.linspace(0.0, 1.0, 9)),
        )


@pytest.mark.slow
def test_segment_step_cap_without_throw(getkey):
    grid, measure, loss = _problem(getkey(), J=2)
    sol = mfattn.solve_limit(
        grid, measure, loss, 2.0, checkpoints=2, segment_max_steps=2, throw=False
    )
    assert sol.result == diffrax.RESULTS.max_steps_reached


@pytest.mark.slow
def test_grad_through_checkpointed_solve_limit(getkey):
    """`jax.grad` of `solve_limit(..., checkpoints=...).loss` goes through the
    user's Diffrax adjoint on the forward solve, as on the dense route."""
    grid, measure, loss = _problem(getkey(), J=2)
    tol = dict(rtol=1e-10, atol=1e-12)

    def f(p):
        sol = mfattn.solve_limit(p, measure, loss, 1.0, checkpoints=3, segment_max_steps=256, **tol)
        return sol.loss

    g = jax.grad(f)(grid)
    _, lg = mfattn.limit_gradient(grid, measure, loss, 1.0, **tol)
    c = mfattn.ParamPath(grid).basis_integrals()[:, None, None, None]
    assert tree_rel_err(g, jax.tree.map(lambda a: a * c / grid.heads, lg)) < 1e-6
