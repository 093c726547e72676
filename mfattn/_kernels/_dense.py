"""All keys in one block, all heads at once (docs/theory.md, section 1)."""

import equinox as eqx

from . import _softmax
from ._base import AbstractAttentionKernel, as_slope, check_options, check_positions


class DenseKernel(AbstractAttentionKernel):
    """Dense `(H, m, n)` score blocks: fastest for short sequences, memory
    `O(H m n)` per layer.

    **Arguments:**

    - `causal`: mask keys after each query in sequence order (default `False`;
      docs/theory.md, section 8).
    - `strict`: with `causal=True`, mask each query's own position too: token
      `i` attends to the tokens `j < i` (default `False`). The first token then
      sees no key: its output is 0, and so is every derivative through it.
    - `alibi_slope`: `None` (default) or a real `slope`: the ALiBi bias
      `s_ij = beta <q_i, k_j> - slope |i - j| / n` (`i - j` under a causal
      mask), `i, j` sequence positions and `n` the number of positive-weight
      keys (the tokens: zero-weight test points and padding do not count).

    **Raises:** `ValueError` for `strict=True` without `causal=True` or a
    non-finite `alibi_slope`; `TypeError` for options of the wrong type.
    """

    causal: bool = eqx.field(static=True, default=False)
    strict: bool = eqx.field(static=True, default=False, kw_only=True)
    alibi_slope: float | None = eqx.field(
        static=True, default=None, converter=as_slope, kw_only=True
    )

    def __check_init__(self):
        check_options(self)

    def forward(self, q, k, v, w, beta, qpos=None, kpos=None):
        qpos, kpos = check_positions(self, qpos, kpos)
        mask, bias = _softmax.mask_and_bias(self, qpos, kpos, _softmax.num_tokens(w), q.dtype)
        state = _softmax.forward_init(q, v.shape[-1])
        return _softmax.forward_finish(
            _softmax.forward_update(state, q, k, v, w, beta, mask, bias)
        )

    def backward(self, q, k, v, w, o, aux, c, u, beta, qpos=None, kpos=None):
        qpos, kpos = check_positions(self, qpos, kpos)
        mask, bias = _softmax.mask_and_bias(self, qpos, kpos, _softmax.num_tokens(w), q.dtype)
        return _softmax.backward_block(q, k, v, w, o, aux, c, u, beta, mask, bias)

    def weights(self, q, k, w, beta, qpos=None, kpos=None):
        qpos, kpos = check_positions(self, qpos, kpos)
        mask, bias = _softmax.mask_and_bias(self, qpos, kpos, _softmax.num_tokens(w), q.dtype)
        state = _softmax.forward_init(q, 0)
        _, lse = _softmax.forward_finish(
            _softmax.forward_update(state, q, k, k[..., :0], w, beta, mask, bias)
        )
        return _softmax.softmax_weights(q, k, w, lse, beta, mask, bias)
