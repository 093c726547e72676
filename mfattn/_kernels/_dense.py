"""All keys in one block, all heads at once (docs/theory.md, section 1)."""

import equinox as eqx

from . import _softmax
from ._base import AbstractAttentionKernel, check_positions


class DenseKernel(AbstractAttentionKernel):
    """Dense `(H, m, n)` score blocks: fastest for short sequences, memory
    `O(H m n)` per layer.

    **Arguments:**

    - `causal`: mask keys after each query in sequence order (default `False`;
      docs/theory.md, section 8).
    """

    causal: bool = eqx.field(static=True, default=False)

    def forward(self, q, k, v, w, beta, qpos=None, kpos=None):
        qpos, kpos = check_positions(self, qpos, kpos)
        mask = _softmax.visible(qpos, kpos)
        state = _softmax.forward_init(q, v.shape[-1])
        return _softmax.forward_finish(_softmax.forward_update(state, q, k, v, w, beta, mask))

    def backward(self, q, k, v, w, o, aux, c, u, beta, qpos=None, kpos=None):
        qpos, kpos = check_positions(self, qpos, kpos)
        mask = _softmax.visible(qpos, kpos)
        return _softmax.backward_block(q, k, v, w, o, aux, c, u, beta, mask)
