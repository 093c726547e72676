"""Measuring the distance between a finite transformer and its mean-field limit
(SPEC section 7), through test particles."""

import equinox as eqx
import jax.numpy as jnp

from ._discrete import solve_discrete
from ._limit import solve_limit
from ._params import AttentionParams


def antithetic_mean_field(key, num_nodes, particles, dim, head_dim, dtype=None):
    """The mean-field initialisation with antithetic particles: `particles / 2`
    Xavier-uniform draws and their copies with `O -> -O`. Xavier-uniform is
    invariant under the flip, so the law `nu_0` is exact, and the empirical
    mean of `O` is exactly zero, as is the limit velocity at initialisation
    (SPEC section 6): the particle approximation of the limit has no Monte-Carlo
    error at `k = 0`.
    """
    if particles % 2:
        raise ValueError(f"`particles` must be even for antithetic pairs, got {particles}")
    half = AttentionParams.mean_field(key, num_nodes, particles // 2, dim, head_dim, dtype)
    return AttentionParams(
        *(
            jnp.concatenate([a, b], axis=1)
            for a, b in zip((half.Q, half.K, half.V, half.O), (half.Q, half.K, half.V, -half.O))
        )
    )


@eqx.filter_jit
def flow_error(
    disc_params: AttentionParams,
    grid,
    measure,
    loss,
    beta,
    test_points,
    test_labels=None,
    *,
    interpolation: str = "linear",
    rtol: float = 1e-6,
    atol: float = 1e-8,
    max_steps: int = 4096,
):
    """The theorem's error for every test particle `z` (SPEC section 7):

        max_l |z^l - z(l/L)| + |p_z^l - p_z(l/L)|,

    the discrete model's flow map and adjoint against the limit's, both carried
    by the field of the same token measure.

    **Returns:** `(m,)`, one error per test particle (take the max for the
    uniform error, one entry for a pointwise error).
    """
    L = disc_params.depth
    disc = solve_discrete(
        disc_params, measure, loss, beta, test_points=test_points, test_labels=test_labels
    )
    ts = jnp.arange(L + 1, dtype=disc.ts.dtype) / L
    lim = solve_limit(
        grid,
        measure,
        loss,
        beta,
        test_points=test_points,
        test_labels=test_labels,
        ts=ts,
        interpolation=interpolation,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
    )
    dx = jnp.linalg.norm(disc.test_xs - lim.test_xs, axis=-1)
    dp = jnp.linalg.norm(disc.test_ps - lim.test_ps, axis=-1)
    return jnp.max(dx + dp, axis=0)
