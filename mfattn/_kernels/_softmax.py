"""The softmax attention of one key block, written once (private).

Every softmax kernel object is built from the functions here; they act on any
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
(causal masking, section 8), strictly before it (a strict causal mask), or
always (no mask). A positional bias `b_ij` (ALiBi, section 8) is added to the
scores; it does not depend on `q`, `k`, so the formulas above keep their
shape with `s_ij + b_ij` in place of `s_ij` in `A_ij`. A query that sees no
key (the first token under a strict mask) has `o_i = 0` and every derivative
0. Zero-weight keys are probes: they do not enter `D_i` or `o_i`, but their
density (and so their `dk`, `dv`) is defined; zero-weight queries get `dq`
and do not act on the keys.
"""

import jax.numpy as jnp
import numpy as np
from jax import lax

from .._custom_types import HeadArray


def lift(x, ndim: int):
    """`x` with unit axes prepended up to rank `ndim`: the explicit broadcast of
    per-key weights `(n,)`, per-query weights `(m, 1)` or a mask or bias
    `(m, n)` against scores `(..., m, n)` with any number of head axes."""
    return jnp.expand_dims(x, tuple(range(ndim - jnp.ndim(x))))


def scores(q: HeadArray, k: HeadArray, beta, bias=None) -> HeadArray:
    """`beta <q_i, k_j> (+ b_ij)`, shape `(..., m, n)`."""
    s = beta * jnp.einsum("...mk,...nk->...mn", q, k)
    return s if bias is None else s + lift(bias, s.ndim)


def visible(qpos, kpos, causal: bool = True, strict: bool = False):
    """`(m, n)` mask of keys visible to each query: `kpos_j <= qpos_i` (causal),
    `kpos_j < qpos_i` (causal and strict), or `None` (all; also when no
    positions are given)."""
    if qpos is None or not causal:
        return None
    if strict:
        return kpos[None, :] < qpos[:, None]
    return kpos[None, :] <= qpos[:, None]


def num_tokens(w):
    """The number `n` of positive-weight keys (at least 1): the tokens, not the
    zero-weight probes or padding. A traced integer scalar."""
    return jnp.maximum(jnp.sum(w > 0), 1)


def alibi_bias(qpos, kpos, slope, n, dtype):
    """The ALiBi bias `-slope |qpos_i - kpos_j| / n`, `(m, n_keys)`, or `None`
    when `slope` is `None` (under a causal mask `|i - j| = i - j` on every
    visible key)."""
    if slope is None:
        return None
    gap = jnp.abs(qpos[:, None] - kpos[None, :]).astype(dtype)
    return -slope * gap / n.astype(dtype)


def mask_and_bias(kernel, qpos, kpos, n, dtype):
    """The visibility mask and the positional bias of a kernel with the options
    `causal`, `strict` and `alibi_slope`, for keys at positions `kpos` (`n`: the
    ALiBi length, `num_tokens` of all the keys' weights, so that a chunked
    kernel counts once and calls this block by block)."""
    mask = visible(qpos, kpos, kernel.causal, kernel.strict)
    return mask, alibi_bias(qpos, kpos, kernel.alibi_slope, n, dtype)


def forward_init(q: HeadArray, kdim: int):
    """Running state `(max, sum, acc)` of the online softmax before any key."""
    lead = q.shape[:-1]
    return (
        jnp.full(lead, -jnp.inf, q.dtype),
        jnp.zeros(lead, q.dtype),
        jnp.zeros(lead + (kdim,), q.dtype),
    )


def forward_update(state, q, k, v, w, beta, mask, bias=None):
    """Fold one key block into the online-softmax state (stable at any beta)."""
    mx, total, acc = state
    s = scores(q, k, beta, bias)
    on = w > 0 if mask is None else lift(w > 0, mask.ndim) & mask
    s = jnp.where(on, s, -jnp.inf)
    # the shift cancels in o and lse: no derivative through it
    new = lax.stop_gradient(jnp.maximum(mx, jnp.max(s, axis=-1)))
    safe = jnp.where(jnp.isfinite(new), new, 0.0)
    scale = jnp.where(jnp.isfinite(mx), jnp.exp(mx - safe), 0.0)
    e = jnp.where(on, lift(w, s.ndim) * jnp.exp(s - safe[..., None]), 0.0)
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


def density(q, k, lse, beta, mask, bias=None):
    """`A_ij = exp(s_ij - lse_i)` for any keys, 0 where not visible.

    At an atom `A_ij <= 1 / w_j`; at a probe off the support (a test particle)
    the density grows like `exp(beta * gap)` at low temperature, so the exponent
    is capped at a quarter of the largest representable one (`A <= 1e77` in
    float64, `3.6e9` in float32); below the cap the value is exact.
    """
    s = scores(q, k, beta, bias)
    cap = float(np.log(np.finfo(s.dtype).max)) / 4
    A = jnp.exp(jnp.minimum(s - lse[..., None], cap))
    return A if mask is None else jnp.where(mask, A, 0.0)


def score_pullback(q, k, c, A, dS, w, u, beta):
    """`(dq, dk, dv)` from the density `A` (the derivative of the output in the
    values) and the score cotangent `dS` (`d<c_i, o_i>/ds_ij = w_j dS_ij`):
    `dq_i = beta sum_j w_j dS_ij k_j`, `dk_j = beta sum_i u_i dS_ij q_i`,
    `dv_j = sum_i u_i A_ij c_i`. Shared by the softmax and the unnormalised
    kernels."""
    dq = beta * jnp.einsum("...mn,...nk->...mk", dS * lift(w, dS.ndim), k)
    dk = beta * jnp.einsum("...mn,...mk->...nk", dS * lift(u[:, None], dS.ndim), q)
    dv = jnp.einsum("...mn,...mk->...nk", A * lift(u[:, None], A.ndim), c)
    return dq, dk, dv


def backward_block(q, k, v, w, o, lse, c, u, beta, mask, bias=None):
    """One key block's contributions: `dq` (to be summed over blocks) and the
    block's `dk, dv` (sums over all the queries given)."""
    A = density(q, k, lse, beta, mask, bias)
    delta = jnp.sum(c * o, -1)
    dS = A * (jnp.einsum("...mk,...nk->...mn", c, v) - delta[..., None])
    return score_pullback(q, k, c, A, dS, w, u, beta)


def softmax_weights(q, k, w, lse, beta, mask, bias=None):
    """The row-stochastic attention matrix `P_ij = w_j A_ij`, `(..., m, n)`
    (rows sum to 1 over the visible keys; a row that sees no key is 0)."""
    A = density(q, k, lse, beta, mask, bias)
    return lift(w, A.ndim) * A


def forward_vjp(backward, cfg, res, cts):
    """The VJP of a fused kernel's forward pass `(o, lse)` in `(q, k, v, w,
    beta)`, from its closed-form `backward(cfg, q, k, v, w, beta, qpos, kpos,
    lse, delta, c, u) -> (dq / beta, dk, dv, ds)` with `ds_j = sum_i u_i dS_ij`
    (`res`: `(q, k, v, w, beta, qpos, kpos, o, lse)`). `d lse_i / d s_ij =
    w_j A_ij` enters as a shift of `delta_i`; the cotangent of `w_j` is
    `sum_i dS_ij` (all queries), that of `beta` `sum_ij w_j dS_ij <q_i, k_j>`;
    the positions get none."""
    q, k, v, w, beta, qpos, kpos, o, lse = res
    ct_o, ct_lse = cts
    delta = jnp.sum(ct_o * o, -1) - ct_lse
    u = jnp.ones(q.shape[-2], q.dtype)
    dqb, dk, dv, ds = backward(cfg, q, k, v, w, beta, qpos, kpos, lse, delta, ct_o, u)
    wk = lift(w[:, None], dk.ndim)
    dw = jnp.sum(ds.reshape((-1, w.shape[0])), axis=0).astype(w.dtype)
    dbeta = jnp.sum(dqb * q).astype(beta.dtype).reshape(beta.shape)
    return (beta * dqb, wk * dk, wk * dv, dw, dbeta, None, None)
