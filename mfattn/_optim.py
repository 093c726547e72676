"""Blockwise AdamW (docs/theory.md, section 5, the paper's Algorithm 1 with map phi)."""

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike


class ScaleByBlockwiseAdamState(NamedTuple):
    """State of [`mfattn.scale_by_blockwise_adam`][]: `mu` is shaped like the
    parameters; `nu` holds one second-moment scalar per block (the block axes
    are removed from each leaf's shape)."""

    count: jax.Array  # shape=(), dtype=jnp.int32
    mu: optax.Updates
    nu: optax.Updates


def _axes(leaf, block_axes):
    ndim = jnp.ndim(leaf)
    if len(block_axes) > ndim:  # small leaves of other pytrees: one block each
        return tuple(range(ndim))
    return tuple(sorted(a % ndim for a in block_axes))


def _block_phi(g, block_axes, reduction):
    """`phi(g)`: the block's squared Frobenius norm (`"sum"`) or its mean
    square (`"mean"`, as in Adam-mini), one scalar per block."""
    axes = _axes(g, block_axes)
    if not axes:
        return g**2  # elementwise: optax.adamw's phi(g) = g * g
    sq = jnp.sum(g**2, axis=axes)
    if reduction == "mean":
        size = 1
        for a in axes:
            size *= g.shape[a]
        sq = sq / size
    return sq


def _broadcast(nu, leaf, block_axes):
    axes = _axes(leaf, block_axes)
    return jnp.expand_dims(nu, axes) if axes else nu


def scale_by_blockwise_adam(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    reduction: str = "sum",
    block_axes: Sequence[int] = (-2, -1),
) -> optax.GradientTransformation:
    """Rescale updates by blockwise Adam (docs/theory.md, section 5, paper eq. 26).

        m_k = b1 m_{k-1} + (1 - b1) g_k
        v_k = b2 v_{k-1} + (1 - b2) phi(g_k)          (one scalar per block)
        u_k = mhat_k / (sqrt(vhat_k + eps_root) + eps)

    A block is the sub-array spanned by `block_axes` of each leaf: with the
    default `(-2, -1)` and an [`mfattn.AttentionParams`][], each `Q`, `K`, `V`
    and `O` of each head at each depth node is one block, and `phi(g)` is its
    squared Frobenius norm broadcast over the block. `block_axes=()` makes every
    entry its own block, which is Optax's `scale_by_adam` exactly.

    **Arguments:**

    - `b1`, `b2`, `eps`, `eps_root`: as in `optax.scale_by_adam`.
    - `reduction`: `"sum"` (the paper's squared Frobenius norm) or `"mean"`
      (divided by the block size, as in Adam-mini).
    - `block_axes`: axes of every leaf that form one block (negative indices
      count from the end; a leaf with fewer axes is one block).

    **Returns:** an `optax.GradientTransformation` with state
    [`mfattn.ScaleByBlockwiseAdamState`][].
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"`reduction` must be 'sum' or 'mean', got {reduction!r}")
    block_axes = tuple(int(a) for a in block_axes)
    if len(set(block_axes)) != len(block_axes):
        raise ValueError(f"`block_axes` has repeated axes: {block_axes}")

    def init_fn(params):
        mu = optax.tree.zeros_like(params)
        nu = jax.tree.map(lambda p: jnp.zeros_like(_block_phi(p, block_axes, reduction)), params)
        return ScaleByBlockwiseAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = jax.tree.map(
            lambda g, t: (1 - b2) * _block_phi(g, block_axes, reduction) + b2 * t,
            updates,
            state.nu,
        )
        count_inc = optax.safe_increment(state.count)
        mu_hat = optax.tree.bias_correction(mu, b1, count_inc)
        nu_hat = optax.tree.bias_correction(nu, b2, count_inc)
        updates = jax.tree.map(
            lambda m, v: m / (jnp.sqrt(_broadcast(v, m, block_axes) + eps_root) + eps),
            mu_hat,
            nu_hat,
        )
        nu = optax.tree.cast_like(nu, state.nu)
        return updates, ScaleByBlockwiseAdamState(count=count_inc, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def blockwise_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Any = None,
    reduction: str = "sum",
    block_axes: Sequence[int] = (-2, -1),
) -> optax.GradientTransformation:
    """Blockwise AdamW: [`mfattn.scale_by_blockwise_adam`][] chained with
    decoupled weight decay and the learning rate exactly as `optax.adamw` is,

        theta_{k+1} = theta_k - eta_k (mhat_k / (sqrt(vhat_k) + eps) + lambda theta_k).

    `learning_rate` and `weight_decay` accept Optax schedules; every argument
    is spelled out so that `optax.inject_hyperparams(blockwise_adamw)` works.
    With `block_axes=()` this is `optax.adamw`.
    """
    return optax.chain(
        scale_by_blockwise_adam(b1, b2, eps, eps_root, reduction, block_axes),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
