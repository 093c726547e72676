"""Keys in blocks, one head at a time: `O(m * chunk_size)` memory per head."""

import equinox as eqx
import jax.numpy as jnp
from jax import lax

from . import _softmax
from ._base import AbstractAttentionKernel, as_slope, check_options, check_positions


def _blocks(x, chunk):
    """Pad the leading axis with zeros to a multiple of `chunk`; split it in blocks."""
    n = x.shape[0]
    pad = -n % chunk
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
    return x.reshape((-1, chunk) + x.shape[1:])


class ChunkedKernel(AbstractAttentionKernel):
    """Keys processed in blocks of `chunk_size` with an online softmax (forward)
    and recomputed densities (backward, one fused pass: each density block
    serves the query side and the key side), heads one at a time, so the
    largest temporary is one `(m, chunk_size)` block. Same numbers as
    [`mfattn.DenseKernel`][] to rounding; for long sequences.

    **Arguments:**

    - `chunk_size`: keys per block, a positive int.
    - `causal`, `strict`, `alibi_slope`: as for [`mfattn.DenseKernel`][] (the
      ALiBi length `n` counts the positive-weight keys of all the blocks; the
      padding keys have weight 0).

    **Raises:** `ValueError` for a `chunk_size` that is not a positive int, and
    as [`mfattn.DenseKernel`][] for the other options.
    """

    chunk_size: int = eqx.field(static=True)
    causal: bool = eqx.field(static=True, default=False)
    strict: bool = eqx.field(static=True, default=False, kw_only=True)
    alibi_slope: float | None = eqx.field(
        static=True, default=None, converter=as_slope, kw_only=True
    )

    def __check_init__(self):
        if (
            isinstance(self.chunk_size, bool)
            or not isinstance(self.chunk_size, int)
            or self.chunk_size < 1
        ):
            raise ValueError(f"`chunk_size` must be a positive int, got {self.chunk_size!r}")
        check_options(self)

    def forward(self, q, k, v, w, beta, qpos=None, kpos=None):
        qpos, kpos = check_positions(self, qpos, kpos)
        cs = self.chunk_size
        n = _softmax.num_tokens(w)
        wb = _blocks(w, cs)
        pb = None if kpos is None else _blocks(kpos, cs)

        def head(args):
            qh, kh, vh = args

            def body(state, blk):
                kk, vv, ww, pp = blk
                mask, bias = _softmax.mask_and_bias(self, qpos, pp, n, qh.dtype)
                return _softmax.forward_update(state, qh, kk, vv, ww, beta, mask, bias), None

            state = _softmax.forward_init(qh, vh.shape[-1])
            state, _ = lax.scan(body, state, (_blocks(kh, cs), _blocks(vh, cs), wb, pb))
            return _softmax.forward_finish(state)

        return lax.map(head, (q, k, v))

    def backward(self, q, k, v, w, o, aux, c, u, beta, qpos=None, kpos=None):
        qpos, kpos = check_positions(self, qpos, kpos)
        cs = self.chunk_size
        n, kdim = k.shape[-2:]
        ntok = _softmax.num_tokens(w)
        wb = _blocks(w, cs)
        pb = None if kpos is None else _blocks(kpos, cs)

        def head(args):
            qh, kh, vh, oh, lh, ch = args

            def body(dq, blk):
                kk, vv, ww, pp = blk
                mask, bias = _softmax.mask_and_bias(self, qpos, pp, ntok, qh.dtype)
                dqb, dk, dv = _softmax.backward_block(
                    qh, kk, vv, ww, oh, lh, ch, u, beta, mask, bias
                )
                return dq + dqb, (dk, dv)

            blocks = (_blocks(kh, cs), _blocks(vh, cs), wb, pb)
            dq, (dk, dv) = lax.scan(body, jnp.zeros_like(qh), blocks)
            return dq, dk.reshape(-1, kdim)[:n], dv.reshape(-1, kdim)[:n]

        return lax.map(head, (q, k, v, o, aux, c))

    def weights(self, q, k, w, beta, qpos=None, kpos=None):
        # the log-normaliser by the online softmax, then one (H, m, n) density
        _, lse = self.forward(q, k, jnp.zeros(k.shape[:-1] + (1,), k.dtype), w, beta, qpos, kpos)
        qpos, kpos = check_positions(self, qpos, kpos)
        mask, bias = _softmax.mask_and_bias(self, qpos, kpos, _softmax.num_tokens(w), q.dtype)
        return _softmax.softmax_weights(q, k, w, lse, beta, mask, bias)
