"""A small, independent reference integrator for the self-attention dynamics on
the sphere, used to cross-check the library's normalised solvers.

Projected classical RK4: each stage evaluates the tangent field
`P_x Gamma(x, mu_x)` (`P_x = I - x x^T / |x|^2`) from the public
`mfattn.AttentionField`, and the state is renormalised after every step. Global
error `O(dt^4)`; no Diffrax, no adaptive stepping.
"""

import jax
import jax.numpy as jnp

import mfattn


def identity_heads(d, dtype=jnp.float64, scale=1.0):
    """`Q = K = V = I`, `O = scale * I`, one head: `(H, d, k) = (1, d, d)`."""
    eye = jnp.eye(d, dtype=dtype)[None]
    return mfattn.AttentionParams(eye, eye, eye, scale * eye)


def tangent_field(field, heads, x, weights=None):
    """`P_x Gamma(x, mu)` for the tokens' own measure `mu = sum_j w_j delta_{x_j}`."""
    measure = mfattn.EmpiricalMeasure(x, weights)
    v = field(x, measure, heads)
    u = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    return v - jnp.sum(v * u, -1, keepdims=True) * u


def projected_rk4(x0, beta, t1, num_steps, heads=None, weights=None, save_every=1):
    """Integrate `x' = P_x Gamma(x, mu_x)` from `x0 (n, d)` on `[0, t1]` with
    `num_steps` projected RK4 steps.

    **Returns:** `(ts, xs)` saved every `save_every` steps, starting at `t = 0`.
    """
    d = x0.shape[-1]
    heads = identity_heads(d, x0.dtype) if heads is None else heads
    field = mfattn.AttentionField(beta)
    dt = t1 / num_steps
    f = lambda x: tangent_field(field, heads, x, weights)

    def step(x, _):
        k1 = f(x)
        k2 = f(x + 0.5 * dt * k1)
        k3 = f(x + 0.5 * dt * k2)
        k4 = f(x + dt * k3)
        x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True), None

    def block(x, _):
        x, _ = jax.lax.scan(step, x, None, save_every)
        return x, x

    @jax.jit
    def run(x0):
        _, xs = jax.lax.scan(block, x0, None, num_steps // save_every)
        return jnp.concatenate([x0[None], xs])

    xs = run(x0)
    ts = jnp.arange(xs.shape[0]) * (dt * save_every)
    return ts, xs
