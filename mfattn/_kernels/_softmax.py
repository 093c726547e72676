"""The softmax attention of one key block, written once (private).

Every kernel object is built from the four functions here; they act on any
number of leading (head) axes. Notation (docs/theory.md, section 1): scores
`s_ij = beta <q_i, k_j>`, density `A_ij = exp(s_ij) / D_i` with
`D_i = sum_j w_j exp(s_ij)` over the keys visible to query `i`, attention
output `o_i = sum_j w_j A_ij v_j`. With `c_i = O^T p_i` the cotangent of the
head output and `delta_i = <c_i, o_i>`, the closed forms of docs/theory.md,
sections 1 and 4, read in head space

    dS_ij = A_ij (<c_i, v_j> - delta_i)
    dq_i  = beta sum_j w_j dS_ij k_j       (grad_x term, keys weighted by w)
    dk_j  = beta sum_i u_i dS_ij q_i       (Lions term, queries weighted by u)
    dv_j  = sum_i u_i A_ij c_i

A key is *visible* to a query when its position is not after the query's
(causal masking, section 8) or always (no mask). Zero-weight keys are probes:
they do not enter `D_i` or `o_i`, but their density (and so their `dk`, `dv`)
is defined; zero-weight queries get `dq` and do not act on the keys.
"""

import jax.numpy as jnp
import numpy as np
from jax import lax

from .._custom_types import HeadArray


def scores(q: HeadArray, k: HeadArray, beta) -> HeadArray:
    """`beta <q_i, k_j>`, shape `(..., m, n)`."""
    return beta * jnp.einsum("...mk,...nk->...mn", q, k)


def visible(qpos, kpos):
    """`(m, n)` mask of keys visible to each query (causal), or `None` (all)."""
    if qpos is None:
        return None
    return kpos[None, :] <= qpos[:, None]


def forward_init(q: HeadArray, kdim: int):
    """Running state `(max, sum, acc)` of the online softmax before any key."""
    lead = q.shape[:-1]
    return (
        jnp.full(lead, -jnp.inf, q.dtype),
        jnp.zeros(lead, q.dtype),
        jnp.zeros(lead + (kdim,), q.dtype),
    )


def forward_update(state, q, k, v, w, beta, mask):
    """Fold one key block into the online-softmax state (stable at any beta)."""
    mx, total, acc = state
    s = scores(q, k, beta)
    on = w > 0 if mask is None else (w > 0) & mask
    s = jnp.where(on, s, -jnp.inf)
    # the shift cancels in o and lse: no derivative through it
    new = lax.stop_gradient(jnp.maximum(mx, jnp.max(s, axis=-1)))
    safe = jnp.where(jnp.isfinite(new), new, 0.0)
    scale = jnp.where(jnp.isfinite(mx), jnp.exp(mx - safe), 0.0)
    e = jnp.where(on, w * jnp.exp(s - safe[..., None]), 0.0)
    total = total * scale + jnp.sum(e, -1)
    acc = acc * scale[..., None] + jnp.einsum("...mn,...nk->...mk", e, v)
    return new, total, acc


def forward_finish(state):
    """`(o, lse)` from the state; a query that sees no key gets `o = 0` and
    `lse = +inf` (so that its density, and every derivative, is 0)."""
    mx, total, acc = state
    empty = total <= 0
    o = acc / jnp.where(empty, 1.0, total)[..., None]
    lse = jnp.where(empty, jnp.inf, jnp.log(jnp.where(empty, 1.0, total)) + mx)
    return o, lse


def density(q, k, lse, beta, mask):
    """`A_ij = exp(s_ij - lse_i)` for any keys, 0 where not visible.

    At an atom `A_ij <= 1 / w_j`; at a probe off the support (a test particle)
    the density grows like `exp(beta * gap)` at low temperature, so the exponent
    is capped at a quarter of the largest representable one (`A <= 1e77` in
    float64, `3.6e9` in float32); below the cap the value is exact.
    """
    s = scores(q, k, beta)
    cap = float(np.log(np.finfo(s.dtype).max)) / 4
    A = jnp.exp(jnp.minimum(s - lse[..., None], cap))
    return A if mask is None else jnp.where(mask, A, 0.0)


def backward_block(q, k, v, w, o, lse, c, u, beta, mask):
    """One key block's contributions: `dq` (to be summed over blocks) and the
    block's `dk, dv` (sums over all the queries given)."""
    A = density(q, k, lse, beta, mask)
    delta = jnp.sum(c * o, -1)
    dS = A * (jnp.einsum("...mk,...nk->...mn", c, v) - delta[..., None])
    dq = beta * jnp.einsum("...mn,...nk->...mk", dS * w, k)
    dk = beta * jnp.einsum("...mn,...mk->...nk", dS * u[:, None], q)
    dv = jnp.einsum("...mn,...mk->...nk", A * u[:, None], c)
    return dq, dk, dv
