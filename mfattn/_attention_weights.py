"""The attention matrix of one layer on a measure (docs/theory.md, sections 1,
8 and 10)."""

import jax.numpy as jnp
from jaxtyping import Array, Float, Integer

from ._checks import check_beta
from ._custom_types import BetaLike
from ._field import check_layer
from ._kernels import AbstractAttentionKernel, resolve_kernel
from ._measure import EmpiricalMeasure
from ._params import AttentionParams


def attention_weights(
    layer: AttentionParams,
    measure: EmpiricalMeasure,
    beta: BetaLike,
    *,
    kernel: AbstractAttentionKernel | None = None,
    positions: Integer[Array, " n"] | None = None,
) -> Float[Array, "H n n"]:
    """The attention matrix of every head of one layer on the tokens of a
    measure: the row-stochastic matrix

        P_ij = w_j A_ij = w_j exp(s_ij) / sum_l w_l exp(s_il),
        s_ij = beta <Q^T x_i, K^T x_j>,

    the weight with which token `i` reads token `j`, so that the head's
    attention mean is `m(x_i) = sum_j P_ij x_j` (docs/theory.md, section 1) and
    the head output `O V^T sum_j P_ij x_j`. This is the matrix that clustering
    studies follow (docs/theory.md, section 10); `A_ij = P_ij / w_j` is the
    density with respect to the measure.

    The kernel's options are honoured: a causal (or strict causal) mask zeroes
    `P_ij` for the keys a token does not see, an ALiBi bias enters `s_ij`
    (docs/theory.md, section 8), [`mfattn.HardmaxKernel`][] gives its tie
    weights `w_j 1[j in T_i] / W_i`, and [`mfattn.UnnormalizedKernel`][] gives
    `w_j exp(s_ij)`, whose rows do not sum to one. With a softmax or hardmax
    kernel every row sums to one over the keys it sees; a token that sees no
    key (the first one under a strict mask) has a row of zeros. Memory: the
    `(H, n, n)` result and temporaries of that size.

    For one measure; `jax.vmap` over a batch of measures.

    **Arguments:**

    - `layer`: one layer's heads, an [`mfattn.AttentionParams`][] with leaves
      `(H, d, k)` (e.g. `params.layer(l)` of a model's parameters).
    - `measure`: the tokens, an [`mfattn.EmpiricalMeasure`][] with `(n, d)`
      points, in sequence order.
    - `beta`: inverse temperature `> 0` (ignored by the hardmax kernel).
    - `kernel`: the attention kernel (default [`mfattn.AutoKernel`][]`()`).
    - `positions`: the tokens' sequence positions `(n,)` for a kernel that
      reads them (causal, ALiBi); default `0, ..., n-1`. Ignored otherwise.

    **Returns:** `(H, n, n)`, the rows indexed by the querying token `i`.

    **Raises:** `TypeError`/`ValueError` naming the argument for a bad
    `layer`, `measure`, `kernel` or `positions`; a runtime error for a
    non-positive `beta`.
    """
    check_layer(measure, layer, "layer")
    beta = check_beta(beta)
    kernel = resolve_kernel(kernel)
    n = measure.num_points
    pos = None
    if kernel.uses_positions:
        if positions is None:
            pos = jnp.arange(n)
        else:
            pos = jnp.asarray(positions)
            if pos.shape != (n,):
                raise ValueError(f"`positions` must have shape ({n},), got {pos.shape}")
            if not jnp.issubdtype(pos.dtype, jnp.integer):
                raise TypeError(f"`positions` must hold integers, got dtype {pos.dtype}")
    x = measure.points
    dtype = jnp.result_type(x.dtype, layer.dtype)
    x, w = x.astype(dtype), measure.weights.astype(dtype)
    q = jnp.einsum("nd,hdk->hnk", x, layer.Q.astype(dtype))
    k = jnp.einsum("nd,hdk->hnk", x, layer.K.astype(dtype))
    return kernel.weights(q, k, w, beta, pos, pos)


__all__ = ["attention_weights"]
