"""The attention contractions every model is built from (private).

All functions act on the heads of one layer at once: projected queries
`q (H, m, k)`, keys `k (H, n, k)`, values `v (H, n, k)` and key weights
`w (n,)`. Notation (SPEC section 1): the attention *density*
`A_ij = a(x_i, x_j) = exp(s_ij) / D(x_i)` with `D(x_i) = sum_j w_j exp(s_ij)`,
and the attention *probabilities* `pi_ij = w_j A_ij`.

The backward functions are the closed forms of SPEC sections 1 and 4 written
in head space: with `c_i = O^T p_i` (the cotangent of the head output),

    query side  dq_i = beta sum_j w_j A_ij (<v_j, c_i> - <o_i, c_i>) k_j
                     = beta K^T Cov_a(x_i)[y] V c_i          (grad_x term)
    key side    dk_j = beta sum_i u_i A_ij (<v_j, c_i> - <o_i, c_i>) q_i
                dv_j = sum_i u_i A_ij c_i                    (Lions term)

for query weights `u_i`. This module is the one place to swap in a chunked,
fused or Pallas kernel.
"""

import jax.numpy as jnp
import numpy as np
from jax import lax


def project(x, W):
    """`x (m, d)`, `W (H, d, k)` -> `W^T x` per head, `(H, m, k)`."""
    return jnp.einsum("md,hdk->hmk", x, W)


def _masked_scores(q, k, w, beta):
    s = beta * jnp.einsum("hmk,hnk->hmn", q, k)
    positive = w > 0
    smax = jnp.max(jnp.where(positive, s, -jnp.inf), axis=-1, keepdims=True)
    smax = lax.stop_gradient(smax)
    # exp(-inf) = 0 for zero-weight atoms, with a zero (not NaN) derivative.
    shifted = jnp.where(positive, s - smax, -jnp.inf)
    return shifted, smax


def forward(q, k, v, w, beta):
    """Stable softmax attention against a weighted key set.

    **Returns:** `o (H, m, k) = sum_j pi_ij v_j` and
    `lse (H, m) = log D(x_i) = log sum_j w_j exp(s_ij)`.
    """
    shifted, smax = _masked_scores(q, k, w, beta)
    e = w * jnp.exp(shifted)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    o = jnp.einsum("hmn,hnk->hmk", e, v) / denom
    lse = (jnp.log(denom) + smax)[..., 0]
    return o, lse


def density(q, k, lse, beta):
    """`A_ij = exp(s_ij - lse_i)`, `(H, m, p)`, for any keys (atoms or not).

    At an atom `A_ij <= 1 / w_j`. At a point off the support of the measure
    (a test particle) the density is unbounded at low temperature: a point
    more aligned with `x_i` than every atom has `A_ij ~ exp(beta * gap)`, which
    overflows at `beta = 1e3`. The exponent is capped at a quarter of the
    largest representable one (`A <= 1e77` in float64, `3.6e9` in float32), so
    that outputs stay finite; below the cap the value is exact.
    """
    s = beta * jnp.einsum("hmk,hpk->hmp", q, k)
    cap = float(np.log(np.finfo(s.dtype).max)) / 4
    return jnp.exp(jnp.minimum(s - lse[..., None], cap))


def query_side(q, k, v, w, o, lse, c, beta):
    """`dq (H, m, k)`: the head-space `grad_x` term (see module docstring)."""
    A = density(q, k, lse, beta)
    dS = A * (jnp.einsum("hmk,hnk->hmn", c, v) - jnp.sum(c * o, -1)[..., None])
    return beta * jnp.einsum("hmn,hnk->hmk", dS * w, k)


def key_side(q, o, lse, c, u, kp, vp, beta):
    """`dk, dv (H, p, k)` at probe keys `kp, vp`: the head-space Lions term."""
    A = density(q, kp, lse, beta) * u[:, None]
    dS = A * (jnp.einsum("hmk,hpk->hmp", c, vp) - jnp.sum(c * o, -1)[..., None])
    dk = beta * jnp.einsum("hmp,hmk->hpk", dS, q)
    dv = jnp.einsum("hmp,hmk->hpk", A, c)
    return dk, dv


def backward(q, k, v, w, o, lse, c, beta, u=None):
    """Both sides at once when the queries are the atoms themselves (query
    weights `u = w`, the default) or a block of them (their weights `u`, as when
    the queries are sharded): one density matrix, reused. Returns `dq (H, m, k)`
    and `dk, dv (H, n, k)`."""
    u = w if u is None else u
    A = density(q, k, lse, beta)
    dS = A * (jnp.einsum("hik,hjk->hij", c, v) - jnp.sum(c * o, -1)[..., None])
    dq = beta * jnp.einsum("hij,hjk->hik", dS * w, k)
    dSu = dS * u[:, None]
    dk = beta * jnp.einsum("hij,hik->hjk", dSu, q)
    dv = jnp.einsum("hij,hik->hjk", A * u[:, None], c)
    return dq, dk, dv


# ----------------------------------------------------------------------------
# Chunked kernels: O(m * chunk) memory per head instead of O(m * n).
#
# Keys (and probes) are processed in blocks of `chunk` with an online softmax
# for the forward pass and recomputed densities for the backward pass; heads
# are processed one at a time (`lax.map`), so the largest temporary is one
# `(m, chunk)` block. Same results as the dense functions above.
# ----------------------------------------------------------------------------


def _blocks(x, chunk, fill=0.0):
    """Pad the leading axis to a multiple of `chunk` and split it into blocks."""
    n = x.shape[0]
    nb = -(-n // chunk)
    pad = nb * chunk - n
    if pad:
        x = jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], fill, x.dtype)])
    return x.reshape((nb, chunk) + x.shape[1:])


def _forward_head(q, k, v, w, beta, chunk):
    kb, vb, wb = _blocks(k, chunk), _blocks(v, chunk), _blocks(w, chunk)
    m = q.shape[0]

    def body(carry, blk):
        mx, l, acc = carry
        kk, vv, ww = blk
        s = beta * q @ kk.T
        s = jnp.where(ww > 0, s, -jnp.inf)
        new = jnp.maximum(mx, jnp.max(s, axis=-1))
        safe = jnp.where(jnp.isfinite(new), new, 0.0)
        scale = jnp.where(jnp.isfinite(mx), jnp.exp(mx - safe), 0.0)
        e = ww * jnp.exp(s - safe[:, None])
        return (new, l * scale + e.sum(-1), acc * scale[:, None] + e @ vv), None

    init = (
        jnp.full((m,), -jnp.inf, q.dtype),
        jnp.zeros((m,), q.dtype),
        jnp.zeros((m, v.shape[-1]), q.dtype),
    )
    (mx, l, acc), _ = lax.scan(body, init, (kb, vb, wb))
    return acc / l[:, None], jnp.log(l) + mx


def _query_side_head(q, k, v, w, o, lse, c, beta, chunk):
    kb, vb, wb = _blocks(k, chunk), _blocks(v, chunk), _blocks(w, chunk)
    delta = jnp.sum(c * o, -1)

    def body(dq, blk):
        kk, vv, ww = blk
        A = jnp.exp(beta * q @ kk.T - lse[:, None])
        dS = A * (c @ vv.T - delta[:, None])
        return dq + beta * (dS * ww) @ kk, None

    dq, _ = lax.scan(body, jnp.zeros_like(q), (kb, vb, wb))
    return dq


def _key_side_head(q, o, lse, c, u, kp, vp, beta, chunk):
    p = kp.shape[0]
    kb, vb = _blocks(kp, chunk), _blocks(vp, chunk)
    delta = jnp.sum(c * o, -1)
    cap = float(np.log(np.finfo(q.dtype).max)) / 4

    def one(blk):
        kk, vv = blk
        A = jnp.exp(jnp.minimum(beta * q @ kk.T - lse[:, None], cap)) * u[:, None]
        dS = A * (c @ vv.T - delta[:, None])
        return beta * dS.T @ q, A.T @ c

    dk, dv = lax.map(one, (kb, vb))
    kdim = q.shape[-1]
    return dk.reshape(-1, kdim)[:p], dv.reshape(-1, kdim)[:p]


def forward_chunked(q, k, v, w, beta, chunk):
    """[`forward`][] with `O(m * chunk)` memory per head."""
    return lax.map(lambda a: _forward_head(a[0], a[1], a[2], w, beta, chunk), (q, k, v))


def query_side_chunked(q, k, v, w, o, lse, c, beta, chunk):
    """[`query_side`][] with `O(m * chunk)` memory per head."""
    return lax.map(lambda a: _query_side_head(*a[:3], w, *a[3:], beta, chunk), (q, k, v, o, lse, c))


def key_side_chunked(q, o, lse, c, u, kp, vp, beta, chunk):
    """[`key_side`][] with `O(m * chunk)` memory per head."""
    return lax.map(lambda a: _key_side_head(*a[:4], u, *a[4:], beta, chunk), (q, o, lse, c, kp, vp))


def _backward_head(q, k, v, w, o, lse, c, beta, chunk, u):
    """Fused backward for one head, queries = the atoms or a block of them
    (query weights `u`): one pass over key blocks computes each density block
    once and uses it for the query side (accumulated `dq`) and the key side
    (that block's `dk, dv`)."""
    n, kdim = k.shape
    kb, vb, wb = _blocks(k, chunk), _blocks(v, chunk), _blocks(w, chunk)
    delta = jnp.sum(c * o, -1)
    cap = float(np.log(np.finfo(q.dtype).max)) / 4
    cw = c * u[:, None]  # query weights folded into the cotangents
    qw = q * u[:, None]

    def body(dq, blk):
        kk, vv, ww = blk
        A = jnp.exp(jnp.minimum(beta * q @ kk.T - lse[:, None], cap))  # (n, chunk)
        dS = A * (c @ vv.T - delta[:, None])
        dq = dq + beta * (dS * ww) @ kk
        return dq, (beta * dS.T @ qw, A.T @ cw)

    dq, (dk, dv) = lax.scan(body, jnp.zeros_like(q), (kb, vb, wb))
    return dq, dk.reshape(-1, kdim)[:n], dv.reshape(-1, kdim)[:n]


def backward_chunked(q, k, v, w, o, lse, c, beta, chunk, u=None):
    """[`backward`][] with `O(m * chunk)` memory per head: one fused pass over
    key blocks per head, each density block computed once."""
    u = w if u is None else u
    return lax.map(
        lambda a: _backward_head(*a[:3], w, *a[3:], beta, chunk, u), (q, k, v, o, lse, c)
    )
