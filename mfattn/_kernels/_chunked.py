"""Keys in blocks, one head at a time: `O(m * chunk_size)` memory per head."""

import equinox as eqx
import jax.numpy as jnp
from jax import lax

from . import _softmax
from ._base import AbstractAttentionKernel, check_positions


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
    - `causal`: as for [`mfattn.DenseKernel`][].
    """

    chunk_size: int = eqx.field(static=True)
    causal: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"`chunk_size` must be a positive int, got {self.chunk_size!r}")

    def forward(self, q, k, v, w, beta, qpos=None, kpos=None):
        qpos, kpos = check_positions(self, qpos, kpos)
        cs = self.chunk_size
        wb = _blocks(w, cs)
        pb = None if kpos is None else _blocks(kpos, cs)

        def head(args):
            qh, kh, vh = args

            def body(state, blk):
                kk, vv, ww, pp = blk
                mask = _softmax.visible(qpos, pp)
                return _softmax.forward_update(state, qh, kk, vv, ww, beta, mask), None

            state = _softmax.forward_init(qh, vh.shape[-1])
            state, _ = lax.scan(body, state, (_blocks(kh, cs), _blocks(vh, cs), wb, pb))
            return _softmax.forward_finish(state)

        return lax.map(head, (q, k, v))

    def backward(self, q, k, v, w, o, aux, c, u, beta, qpos=None, kpos=None):
        qpos, kpos = check_positions(self, qpos, kpos)
        cs = self.chunk_size
        n, kdim = k.shape[-2:]
        wb = _blocks(w, cs)
        pb = None if kpos is None else _blocks(kpos, cs)

        def head(args):
            qh, kh, vh, oh, lh, ch = args

            def body(dq, blk):
                kk, vv, ww, pp = blk
                mask = _softmax.visible(qpos, pp)
                dqb, dk, dv = _softmax.backward_block(qh, kk, vv, ww, oh, lh, ch, u, beta, mask)
                return dq + dqb, (dk, dv)

            blocks = (_blocks(kh, cs), _blocks(vh, cs), wb, pb)
            dq, (dk, dv) = lax.scan(body, jnp.zeros_like(qh), blocks)
            return dq, dk.reshape(-1, kdim)[:n], dv.reshape(-1, kdim)[:n]

        return lax.map(head, (q, k, v, o, aux, c))
