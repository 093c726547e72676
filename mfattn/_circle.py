"""Linear stability of the uniform distribution on the circle for the projected
softmax self-attention dynamics (`Q = K = V = O = I`, one head), and the number
of metastable clusters it predicts (docs/theory.md, section 10).

Write tokens on the circle as angles, `x = (cos theta, sin theta)`. The projected
field has angular component

    theta_i' = sum_j w_j e^{beta cos(theta_j - theta_i)} sin(theta_j - theta_i)
               / sum_j w_j e^{beta cos(theta_j - theta_i)}.

For a density `rho(t, theta)` this is the continuity equation
`d_t rho + d_theta(rho v[rho]) = 0`. Linearising around `rho = 1/(2 pi)` with
`rho = 1/(2 pi) + eps e^{i k theta}`: the denominator is `I_0(beta) + O(eps)`, the
numerator vanishes at the uniform law, and

    int e^{beta cos psi} sin psi e^{i k psi} dpsi = i pi (I_{k-1}(beta) - I_{k+1}(beta))
                                                  = 2 pi i k I_k(beta) / beta,

so every Fourier mode evolves independently, `eps' = lambda_k eps`, with

    lambda_k(beta) = k^2 I_k(beta) / (beta I_0(beta))

(`I_k` the modified Bessel functions; `k^2 I_k(beta)` up to a `k`-independent
factor, as for the unnormalised model of Bruno, Pasqualotto and Agazzi, whose
rates lack the `1 / I_0(beta)`). The fastest-growing mode `k*(beta)` predicts the
number of clusters that form from a near-uniform start; for large `beta`,
`I_k / I_0 ~ e^{-k^2 / (2 beta)}` and `k* ~ sqrt(2 beta)`.
"""

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from ._checks import as_float_array
from ._custom_types import ScalarLike


def _check_beta(beta):
    beta = float(beta)
    if not (np.isfinite(beta) and beta > 0):
        raise ValueError(f"`beta` must be a positive finite number, got {beta!r}")
    return beta


def circle_growth_rates(
    beta: ScalarLike, modes: Int[ArrayLike, " K"] | Sequence[int]
) -> Float[np.ndarray, " K"]:
    """The growth rates `lambda_k = k^2 I_k(beta) / (beta I_0(beta))` of the Fourier
    modes `k` of a perturbation of the uniform distribution on the circle, for the
    projected softmax dynamics with `Q = K = V = O = I` (module docstring).

    Computed with exponentially scaled Bessel functions
    (`scipy.special.ive`), so `beta = 1e4` is finite.

    **Arguments:** `beta > 0`; `modes`: integer Fourier indices `k >= 0` `(K,)`.

    **Returns:** `(K,)` float64 rates (`lambda_0 = 0`).

    See docs/theory.md, section 10.
    """
    from scipy.special import ive

    beta = _check_beta(beta)
    k = np.asarray(modes)
    if not np.issubdtype(k.dtype, np.integer) or np.any(k < 0):
        raise ValueError("`modes` must be non-negative integers")
    k = k.astype(np.float64)
    return k**2 * ive(k, beta) / (beta * ive(0, beta))


def predicted_cluster_count(beta: ScalarLike) -> int:
    """The fastest-growing Fourier mode `k* = argmax_{k >= 1} lambda_k(beta)`
    (see [`mfattn.circle_growth_rates`][]): the number of clusters predicted to
    emerge from a near-uniform start on the circle.

    See docs/theory.md, section 10.
    """
    beta = _check_beta(beta)
    kmax = int(np.ceil(4 * np.sqrt(beta))) + 8
    modes = np.arange(1, kmax + 1)
    return int(modes[np.argmax(circle_growth_rates(beta, modes))])


def circle_fourier_modes(
    points: Float[ArrayLike, "n d"],
    modes: Int[ArrayLike, " K"] | Sequence[int],
    weights: Float[ArrayLike, " _n"] | None = None,
) -> Float[Array, " K"]:
    """The moduli of the Fourier coefficients `|sum_j w_j e^{-i k theta_j}|` of a
    measure on the circle (`theta_j` the angle of `x_j`): `1` for all `k` at a
    single cluster, about `n^{-1/2}` for `n` i.i.d. uniform tokens, and `1` at
    the multiples of `K` for `K` equal, equally spaced clusters.

    **Arguments:** `points` `(n, 2)` (any non-zero points; only their angles
    matter), integer `modes` `(K,)`, optional `weights` `(n,)` (default uniform).

    **Returns:** `(K,)`.

    See docs/theory.md, section 10.
    """
    x = as_float_array(points, "points", ndim=2)
    if x.shape[1] != 2:
        raise ValueError(f"`points` must lie in R^2, got shape {x.shape}")
    n = x.shape[0]
    w = jnp.full((n,), 1.0 / n, x.dtype) if weights is None else jnp.asarray(weights)
    theta = jnp.arctan2(x[:, 1], x[:, 0])
    k = jnp.asarray(modes, x.dtype)
    phase = k[:, None] * theta[None, :]
    re = jnp.sum(w[None, :] * jnp.cos(phase), axis=1)
    im = jnp.sum(w[None, :] * jnp.sin(phase), axis=1)
    return jnp.hypot(re, im)
