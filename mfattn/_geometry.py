"""Where the tokens live: typed geometries carrying their own maths
(docs/theory.md, sections 3 and 10).

A geometry says how a residual step moves a token (the discrete model), how
the limit's velocity is projected, and how cotangents go back through both.
The attention field's own derivatives are never written here: the solvers
pull cotangents back through these pointwise maps and then through the
field's single closed-form pullback ([`mfattn.AttentionField.backward`][]).
"""

import abc
import warnings

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._sphere import normalize, project_tangent, project_tangent_pullback

Points = Float[Array, "*n d"]


class AbstractGeometry(eqx.Module):
    """The space of the tokens. Subclasses: [`mfattn.Euclidean`][] (`R^d`, the
    default) and [`mfattn.Sphere`][] (the unit sphere, post-normalised tokens).

    The discrete model's layer is `x^{l+1} = step(x^l, v^l, h)` with `v` the
    field's velocity and `h` the residual factor; the limit integrates
    `dx/dt = velocity(x, v)`. Methods act row by row on `(..., d)` arrays.
    """

    @abc.abstractmethod
    def initial(self, x: Points) -> Points:
        """Map input tokens onto the space (identity in `R^d`, `N(x)` on the sphere)."""

    @abc.abstractmethod
    def step(self, x: Points, v: Points, h) -> tuple[Points, Array | None]:
        """The residual step and what its pullback needs: `(x + h v, None)` or
        `(N(x + h v), |x + h v|)`."""

    @abc.abstractmethod
    def step_pullback(self, aux, p: Points) -> Points:
        """The cotangent `J^T p` before the post-step map, for a tangent `p`."""

    @abc.abstractmethod
    def tangent(self, x: Points, p: Points) -> Points:
        """The part of a cotangent at `x` that acts (`p`, or `P_x p`)."""

    @abc.abstractmethod
    def velocity(self, x: Points, v: Points) -> Points:
        """The limit's velocity from the field's: `v`, or `P_x v`."""

    @abc.abstractmethod
    def velocity_pullback(self, x: Points, v: Points, p: Points) -> tuple[Points, Points]:
        """The pullback of `(x, v) -> velocity(x, v)` at `p`: `(c_x, c_v)`."""


class Euclidean(AbstractGeometry):
    """Tokens in `R^d` (docs/theory.md, section 3): `x^{l+1} = x^l + h v^l`."""

    def initial(self, x):
        return x

    def step(self, x, v, h):
        return x + h * v, None

    def step_pullback(self, aux, p):
        return p

    def tangent(self, x, p):
        return p

    def velocity(self, x, v):
        return v

    def velocity_pullback(self, x, v, p):
        return jnp.zeros_like(p), p


class Sphere(AbstractGeometry):
    """Tokens on the unit sphere (docs/theory.md, section 10): the
    post-normalised layer `x^{l+1} = N(x^l + h v^l)`, `N(y) = y / |y|`, and
    its limit, the projected flow `dx/dt = P_x v`, `P_x = I - x x^T / |x|^2`.
    Inputs are mapped to the sphere first; adjoints are tangent."""

    def initial(self, x):
        return normalize(x)[0]

    def step(self, x, v, h):
        return normalize(x + h * v)

    def step_pullback(self, aux, p):
        # J_N(y)^T p = P_{N(y)} p / |y| = p / |y| for a tangent p at N(y)
        return p / aux

    def tangent(self, x, p):
        return project_tangent(x, p)

    def velocity(self, x, v):
        return project_tangent(x, v)

    def velocity_pullback(self, x, v, p):
        return project_tangent_pullback(x, v, p)


def as_geometry(geometry=None, normalization=None, name="geometry") -> AbstractGeometry:
    """The geometry from `geometry=` or the deprecated `normalization=` string."""
    if normalization is not None:
        if geometry is not None:
            raise TypeError("pass `geometry` only (`normalization` is its old spelling)")
        if normalization != "sphere":
            raise ValueError(f"`normalization` must be None or 'sphere', got {normalization!r}")
        warnings.warn(
            "`normalization='sphere'` is deprecated; use `geometry=mfattn.Sphere()`",
            DeprecationWarning,
            stacklevel=3,
        )
        return Sphere()
    if geometry is None:
        return Euclidean()
    if isinstance(geometry, str):
        if geometry != "sphere":
            raise ValueError(
                f"`{name}` must be mfattn.Euclidean() or mfattn.Sphere(), got {geometry!r}"
            )
        warnings.warn(
            f"`{name}='sphere'` is deprecated; use `{name}=mfattn.Sphere()`",
            DeprecationWarning,
            stacklevel=3,
        )
        return Sphere()
    if not isinstance(geometry, AbstractGeometry):
        raise TypeError(
            f"`{name}` must be an mfattn geometry (Euclidean(), Sphere()), got "
            f"{type(geometry).__name__}"
        )
    return geometry


def is_sphere(geometry) -> bool:
    return isinstance(geometry, Sphere)
