"""The coercivity of the common noise against the drift: the Itô drift of
`log |dX|` for the linearised common-noise SDE (docs/theory.md, section 9,
"A coercivity criterion")."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._checks import as_float_array, check_finite_args, check_nonzero
from ._custom_types import BetaLike, ScalarLike
from ._kernels import AbstractAttentionKernel
from ._measure import EmpiricalMeasure
from ._mlp import Activation, MLPParams
from ._params import AttentionParams
from ._path import ParamPath
from ._sde import _build


class Coercivity(eqx.Module):
    """The Itô drift of `log |dX|` at one state and direction, in two parts.

    **Fields:**

    - `drift`: `<u, D b(X) u>`, the drift's expansion along the unit tangent `u`.
    - `noise`: `(1/2) sum_k |D sigma_k(X) u|^2 - sum_k <u, D sigma_k(X) u>^2`,
      the noise's part (negative: the noise contracts along `u`).

    `rate = drift + noise`. With MLP noise of output scale `s`, `noise` is
    `s^2` times its value at `s = 1`.
    """

    drift: Float[Array, ""]
    noise: Float[Array, ""]

    @property
    def rate(self) -> Float[Array, ""]:
        """`drift + noise`: `d log |dX| = rate dt + (martingale)`."""
        return self.drift + self.noise


@eqx.filter_jit
def coercivity(
    features: AttentionParams | None,
    measure: EmpiricalMeasure,
    beta: BetaLike,
    tangent: Float[Array, "n d"],
    *,
    heads: ScalarLike = 1,
    mlp: MLPParams | None = None,
    activation: Activation = "tanh",
    drift: ParamPath | AttentionParams | None = None,
    t: ScalarLike = 0.0,
    kernel: AbstractAttentionKernel | None = None,
) -> Coercivity:
    """The Itô drift of `log |dX_t|` for the linearised common-noise SDE of
    [`mfattn.solve_sde`][] at the tokens `X` of `measure` and the direction
    `u = tangent / |tangent|` (docs/theory.md, section 9, "A coercivity
    criterion"):

        d log |dX| = [<u, Db u> + (1/2) sum_k |D sigma_k u|^2
                      - sum_k <u, D sigma_k u>^2] dt + sum_k <u, D sigma_k u> dB^k,

    `b` the drift and `sigma_k` the `k`-th noise column on all tokens,
    `D` the derivative in all tokens (the measure moves with them), `|.|`
    the Euclidean norm on `(n, d)`. The top Lyapunov exponent is the average
    of `drift + noise` along the flow; a noise whose part is below minus the
    drift's expansion wherever the tokens go synchronises them.

    **Arguments:**

    - `features`, `measure`, `beta`, `heads`, `mlp`, `activation`, `drift`,
      `kernel`: as in [`mfattn.solve_sde`][].
    - `tangent`: the direction `(n, d)`, non-zero.
    - `t`: the time at which the drift path is read.

    **Returns:** a [`mfattn.Coercivity`][] (derivatives by forward-mode autodiff).

    **Raises:** as [`mfattn.solve_sde`][] for the shared arguments; a
    `ValueError` naming `tangent` for a wrong shape, a NaN or inf, or zero.
    """
    sde, dtype = _build(features, measure, beta, heads, mlp, activation, drift, kernel, None)
    n, d = measure.points.shape
    tangent = as_float_array(tangent, "tangent", ndim=2).astype(dtype)
    if tangent.shape != (n, d):
        raise ValueError(f"`tangent` must have shape {(n, d)}, got {tangent.shape}")
    tangent = check_finite_args(tangent=tangent)
    tangent = check_nonzero(tangent, "tangent", "a zero direction has no growth rate")
    u = tangent / jnp.linalg.norm(tangent)
    X = sde.measure.points
    t = jnp.asarray(t, dtype)
    expansion = jnp.zeros((), dtype)
    if sde.drift_vf is not None:
        Du = jax.jvp(lambda Y: sde.drift(t, Y), (X,), (u,))[1]
        expansion = jnp.sum(u * Du)
    noise = jnp.zeros((), dtype)
    for fn, feats, scale in sde.families():

        def column(f, fn=fn):
            return jax.jvp(lambda Y: fn(t, Y, f), (X,), (u,))[1]

        J = jax.vmap(column)(feats)  # (K, n, d)
        noise = noise + scale**2 * (
            0.5 * jnp.sum(J**2) - jnp.sum(jnp.sum(u[None] * J, axis=(1, 2)) ** 2)
        )
    return Coercivity(drift=expansion, noise=noise)


__all__ = ["Coercivity", "coercivity"]
