"""Tokens on the unit sphere: the normalisation `N(y) = y / |y|`, the tangent
projection `P_x`, and their pullbacks (docs/theory.md, section 10).

The attention field's own derivatives are never written here: the normalised
models pull cotangents back through these pointwise maps and then through the
field's single closed-form pullback ([`mfattn.AttentionField.backward`][]).
"""

import jax.numpy as jnp
from jaxtyping import Array, Float

NORMALIZATIONS = (None, "sphere")


def check_normalization(normalization) -> str | None:
    """`None` or `"sphere"`, else a `ValueError` naming the argument."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"`normalization` must be None or 'sphere', got {normalization!r}")
    return normalization


def _dot(a, b):
    return jnp.sum(a * b, axis=-1, keepdims=True)


def normalize(y: Float[Array, "*n d"]) -> tuple[Float[Array, "*n d"], Float[Array, "*n 1"]]:
    """`(N(y), |y|)` row by row, `N(y) = y / |y|` (the radii are kept for the
    pullback `J_N(y)^T p = P_{N(y)} p / |y|`)."""
    r = jnp.linalg.norm(y, axis=-1, keepdims=True)
    return y / r, r


def project_tangent(x: Float[Array, "*n d"], v: Float[Array, "*n d"]) -> Float[Array, "*n d"]:
    """`P_x v = v - <v, x> x / |x|^2` row by row: the component of `v` tangent to
    the sphere through `x` (for unit `x`, `P_x = I - x x^T`); any leading axes."""
    return v - (_dot(v, x) / _dot(x, x)) * x


def project_tangent_pullback(
    x: Float[Array, "*n d"], v: Float[Array, "*n d"], p: Float[Array, "*n d"]
) -> tuple[Float[Array, "*n d"], Float[Array, "*n d"]]:
    """The pullback of `(x, v) -> P_x v` at the cotangent `p`, row by row:
    `(c_x, c_v)` with `c_v = P_x p` and, `s = |x|^2`,

        c_x = -[<x, v> p + <x, p> v] / s + 2 <x, p> <x, v> x / s^2

    (the derivative of the projection itself; docs/theory.md, section 10)."""
    s = _dot(x, x)
    xv, xp = _dot(x, v), _dot(x, p)
    c_x = -(xv * p + xp * v) / s + 2.0 * xp * xv * x / s**2
    return c_x, p - (xp / s) * x
