"""Hardmax attention, the `beta = infinity` limit of the softmax head
(docs/theory.md, section 11).

At infinite inverse temperature the density of a head concentrates on the keys
with the largest score: with `s_ij = <q_i, k_j>` over the keys `j` visible to
query `i` (positive weight, not masked), the *tie set* is
`T_i = {j : s_ij >= max_l s_il - tol_i}`, its mass is `W_i = sum_{j in T_i} w_j`,
and

    A_ij = 1[j in T_i] / W_i,      o_i = sum_j w_j A_ij v_j,

the `w`-weighted mean of the values of the best keys (ties averaged). The
tolerance `tol_i = tie_rtol * |q_i| max_j |k_j|` is relative to the bound of
`|s_ij|` given by Cauchy-Schwarz, so that scores equal up to rounding (repeated
tokens, symmetric configurations) count as ties.

The output is piecewise constant in the queries and keys: away from ties its
derivatives with respect to `q` and `k` vanish and only the values move it,
`do_i / dv_j = w_j A_ij`. With the kernel interface's cotangents `c (H, m, k)`
and query weights `u (m,)` this gives the backward pass

    dq_i = 0,    dk_j = 0,    dv_j = sum_i u_i A_ij c_i,

(at a tie the output is not differentiable; these are the one-sided
derivatives of the averaged rule). Keys of zero weight are probes, as for the
softmax kernels: they never enter `T_i` through the maximum or `W_i`, but their
density `A_ij` is defined (`1 / W_i` when their score ties with the best).
"""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._custom_types import HeadArray, Positions
from ._kernels import AbstractAttentionKernel
from ._kernels._softmax import lift


def _visible(qpos, kpos):
    if qpos is None:
        return None
    return kpos[None, :] <= qpos[:, None]


def _tie_tolerance(q, k, tie_rtol):
    if tie_rtol is None:
        tie_rtol = 64 * float(np.finfo(q.dtype).eps)
    qn = jnp.linalg.norm(q, axis=-1)  # (..., m)
    kn = jnp.max(jnp.linalg.norm(k, axis=-1), axis=-1, initial=0.0)  # (...,)
    return tie_rtol * qn * kn[..., None]


def _best(q, k, w, mask, tie_rtol):
    """Scores `(..., m, n)`, best visible score `(..., m)` and the tie tolerance."""
    s = jnp.einsum("...mk,...nk->...mn", q, k)
    on = w > 0 if mask is None else lift(w > 0, mask.ndim) & mask
    best = jnp.max(jnp.where(on, s, -jnp.inf), axis=-1)
    return s, best, _tie_tolerance(q, k, tie_rtol)


def hardmax_density(
    q: HeadArray,
    k: HeadArray,
    w: Float[Array, " n"],
    best: Float[Array, "..."],
    mass: Float[Array, "..."],
    qpos: Positions | None = None,
    kpos: Positions | None = None,
    *,
    tie_rtol: float | None = None,
) -> HeadArray:
    """`A_ij = 1[j in T_i] / W_i` for every key (probes included), `(..., m, n)`;
    `0` for a query that sees no key. `best`, `mass`: the `aux` of
    [`hardmax_forward`][mfattn._hardmax.hardmax_forward]."""
    s = jnp.einsum("...mk,...nk->...mn", q, k)
    tol = _tie_tolerance(q, k, tie_rtol)
    tie = s >= (best - tol)[..., None]
    mask = _visible(qpos, kpos)
    if mask is not None:
        tie = tie & lift(mask, tie.ndim)
    empty = mass <= 0
    inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, mass))
    return jnp.where(tie, inv[..., None], 0.0)


def hardmax_forward(
    q: HeadArray,
    k: HeadArray,
    v: HeadArray,
    w: Float[Array, " n"],
    qpos: Positions | None = None,
    kpos: Positions | None = None,
    *,
    tie_rtol: float | None = None,
) -> tuple[HeadArray, tuple[Float[Array, "..."], Float[Array, "..."]]]:
    """Hardmax attention of queries `q (..., m, k)` on keys `k (..., n, k)` with
    values `v (..., n, kv)` and key weights `w (n,)` (module docstring).

    **Arguments:** as the kernels' `forward`, less `beta`; `qpos`, `kpos`:
    sequence positions for causal masking (key `j` visible to query `i` when
    `kpos[j] <= qpos[i]`), or `None` for no mask; `tie_rtol`: the relative tie
    tolerance (default `64` machine epsilons of `q`'s dtype).

    **Returns:** `(o (..., m, kv), (best (..., m), mass (..., m)))`: the output,
    the best visible score of every query (`-inf` if it sees no key) and the
    mass `W_i` of its tie set (`0` if none; then `o_i = 0`).
    """
    mask = _visible(qpos, kpos)
    s, best, tol = _best(q, k, w, mask, tie_rtol)
    on = w > 0 if mask is None else lift(w > 0, mask.ndim) & mask
    tie = lift(on, s.ndim) & (s >= (best - tol)[..., None])
    mass = jnp.sum(jnp.where(tie, w, 0.0), axis=-1)
    empty = mass <= 0
    weights = jnp.where(tie, lift(w, tie.ndim) / jnp.where(empty, 1.0, mass)[..., None], 0.0)
    o = jnp.einsum("...mn,...nk->...mk", weights, v)
    return o, (best, mass)


def hardmax_backward(
    q: HeadArray,
    k: HeadArray,
    v: HeadArray,
    w: Float[Array, " n"],
    aux: tuple[Float[Array, "..."], Float[Array, "..."]],
    c: HeadArray,
    u: Float[Array, " m"],
    qpos: Positions | None = None,
    kpos: Positions | None = None,
    *,
    tie_rtol: float | None = None,
) -> tuple[HeadArray, HeadArray, HeadArray]:
    """The cotangents `(dq, dk, dv)` of hardmax attention for query cotangents
    `c (..., m, kv)` and query weights `u (m,)`: `dq = 0`, `dk = 0`,
    `dv_j = sum_i u_i A_ij c_i` (module docstring)."""
    best, mass = aux
    A = hardmax_density(q, k, w, best, mass, qpos, kpos, tie_rtol=tie_rtol)
    dv = jnp.einsum("...mn,...mk->...nk", A * lift(u[:, None], A.ndim), c)
    return jnp.zeros_like(q), jnp.zeros_like(k), dv.astype(v.dtype)


class HardmaxKernel(AbstractAttentionKernel):
    """Hardmax attention (`beta = infinity`): every query attends to the keys of
    largest score `<Q^T x, K^T y>`, ties averaged with the token weights
    (docs/theory.md, section 11). The field's `beta` is ignored.

    Use it as `mfattn.AttentionField(beta, kernel=mfattn.HardmaxKernel())` or
    `kernel=` on the solvers to run the hardmax dynamics. The backward pass is
    the derivative away from ties: zero with respect to queries and keys, the
    density with respect to values (so `grad_x Gamma = 0`, and the Lions
    derivative keeps only its `a(x, y) O V^T` term). Dense `(H, m, n)` score
    blocks, like [`mfattn.DenseKernel`][].

    **Arguments:**

    - `causal`: mask keys after each query in sequence order (default `False`).
    - `tie_rtol`: scores within `tie_rtol * |q_i| max_j |k_j|` of the best are
      ties (default `None`: 64 machine epsilons of the dtype).
    """

    causal: bool = eqx.field(static=True, default=False)
    tie_rtol: float | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.tie_rtol is not None and not (0 <= self.tie_rtol < 1):
            raise ValueError(f"`tie_rtol` must be in [0, 1) or None, got {self.tie_rtol!r}")

    def _positions(self, qpos, kpos):
        if self.causal and (qpos is None or kpos is None):
            raise ValueError("a causal kernel needs query and key positions `qpos`, `kpos`")
        return (qpos, kpos) if self.causal else (None, None)

    def forward(self, q, k, v, w, beta, qpos=None, kpos=None):
        qpos, kpos = self._positions(qpos, kpos)
        return hardmax_forward(q, k, v, w, qpos, kpos, tie_rtol=self.tie_rtol)

    def backward(self, q, k, v, w, o, aux, c, u, beta, qpos=None, kpos=None):
        qpos, kpos = self._positions(qpos, kpos)
        return hardmax_backward(q, k, v, w, aux, c, u, qpos, kpos, tie_rtol=self.tie_rtol)
