"""Unnormalised attention: the exponential kernel without the partition
function (docs/theory.md, section 1)."""

import equinox as eqx
import jax.numpy as jnp

from . import _softmax
from ._base import AbstractAttentionKernel, as_slope, check_options, check_positions


def _kernel_matrix(q, k, beta, mask, bias):
    """`E_ij = exp(s_ij)` (with the bias), 0 where not visible; not stabilised."""
    E = jnp.exp(_softmax.scores(q, k, beta, bias))
    return E if mask is None else jnp.where(mask, E, 0.0)


class UnnormalizedKernel(AbstractAttentionKernel):
    """Unnormalised attention: the scores are exponentiated but not divided by
    the partition function,

        o_i = sum_j w_j E_ij v_j,    E_ij = exp(s_ij),    s_ij = beta <q_i, k_j>,

    so the weights `w_j` (`1/n` for a uniform measure) are the only
    normalisation. With `c_i` the cotangent of `o_i` and `u_i` the query
    weights, the closed-form backward pass in head space is

        dq_i = beta sum_j w_j E_ij <c_i, v_j> k_j,
        dk_j = beta sum_i u_i E_ij <c_i, v_j> q_i,
        dv_j = sum_i u_i E_ij c_i,

    the softmax kernels' formulas with `A_ij = E_ij` and no `delta_i` term (the
    normaliser, which contributes it, is absent). Dense `(H, m, n)` blocks.

    **Not stabilised:** `exp(s_ij)` is evaluated as it stands (no maximum is
    subtracted: there is no normaliser for it to cancel in), so it overflows
    to `inf` once a score exceeds `log(finfo.max)`, about 709 in float64 and 88
    in float32: keep `beta |q_i| |k_j|` (plus the bias) below that. The
    low-temperature regime of docs/theory.md, section 11 is out of reach of
    this kernel.

    **Arguments:**

    - `causal`: mask keys after each query in sequence order (default `False`).
    - `strict`, `alibi_slope`: as for [`mfattn.DenseKernel`][] (a query that
      sees no key has `o_i = 0`).

    **Raises:** as [`mfattn.DenseKernel`][] for bad options.
    """

    causal: bool = eqx.field(static=True, default=False)
    strict: bool = eqx.field(static=True, default=False, kw_only=True)
    alibi_slope: float | None = eqx.field(
        static=True, default=None, converter=as_slope, kw_only=True
    )

    def __check_init__(self):
        check_options(self)

    def _matrix(self, q, k, w, beta, qpos, kpos):
        qpos, kpos = check_positions(self, qpos, kpos)
        mask, bias = _softmax.mask_and_bias(self, qpos, kpos, _softmax.num_tokens(w), q.dtype)
        return _kernel_matrix(q, k, beta, mask, bias)

    def forward(self, q, k, v, w, beta, qpos=None, kpos=None):
        """`(o, D)`: the output and the row masses `D_i = sum_j w_j E_ij`
        (the partition function that a softmax would divide by), `(H, m)`."""
        E = self._matrix(q, k, w, beta, qpos, kpos)
        We = _softmax.lift(w, E.ndim) * E
        o = jnp.einsum("...mn,...nk->...mk", We, v)
        return o, jnp.sum(We, axis=-1)

    def backward(self, q, k, v, w, o, aux, c, u, beta, qpos=None, kpos=None):
        E = self._matrix(q, k, w, beta, qpos, kpos)
        dS = E * jnp.einsum("...mk,...nk->...mn", c, v)
        return _softmax.score_pullback(q, k, c, E, dS, w, u, beta)
