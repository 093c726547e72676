"""Empirical measures: weighted token sets (docs/theory.md, notation)."""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._checks import (
    as_float_array,
    check_finite,
    check_sizes,
    checks_enabled,
    is_concrete,
    weights_tolerance,
)


class EmpiricalMeasure(eqx.Module):
    """An empirical measure `mu = sum_j w_j delta_{x_j}` on `R^d`.

    A batch of measures is the same module with a leading batch axis on both
    leaves; `jax.vmap` maps over it.

    **Arguments:**

    - `points`: the atoms `x_j`, shape `(n, d)`, floating dtype, `n >= 1`.
    - `weights`: the masses `w_j`, shape `(n,)`, non-negative and summing to
      one. `None` (default) means uniform weights `1/n`. Weights are *not*
      renormalised silently: weights that do not sum to one raise (divide by
      their sum yourself if that is what you mean).

    **Raises:**

    `TypeError` for a non-floating `points`/`weights`; `ValueError` for a wrong
    shape, an empty token set, a NaN or infinite point or weight, negative
    weights, or weights not summing to one (tolerance `1e-6` in float64,
    `1e-4` in float32, eight units in the last place in bfloat16 and float16:
    the loosest of the weights' dtype and the points'). Inside a trace the value checks become
    `eqx.error_if` runtime checks (`equinox.EquinoxRuntimeError` with the same
    message); [`mfattn.set_checks`][]`(False)` turns the value checks off.
    """

    points: Float[Array, "n d"]
    weights: Float[Array, " n"]

    def __init__(self, points, weights=None):
        points = as_float_array(points, "points", ndim=2)
        n = points.shape[0]
        if n == 0:
            raise ValueError("`points` is an empty token set (n = 0); need n >= 1")
        if points.shape[1] == 0:
            raise ValueError("`points` has dimension d = 0")
        points = check_finite(points, "points")
        if weights is None:
            weights = jnp.full((n,), 1.0 / n, dtype=points.dtype)
        else:
            weights = as_float_array(weights, "weights", ndim=1)
            if weights.shape[0] != n:
                raise ValueError(
                    f"`weights` has length {weights.shape[0]} but `points` has {n} atoms"
                )
            tol = weights_tolerance(weights.dtype, points.dtype)
            weights = _check_weights(check_finite(weights, "weights"), tol)
            weights = weights.astype(points.dtype)
        self.points = points
        self.weights = weights

    @property
    def num_points(self) -> int:
        """Number of atoms `n`."""
        return self.points.shape[-2]

    @property
    def dim(self) -> int:
        """Token dimension `d`."""
        return self.points.shape[-1]

    def with_points(self, points) -> "EmpiricalMeasure":
        """The measure with the same weights and new atom positions (no checks;
        used inside solvers where the points are moved by the flow)."""
        return eqx.tree_at(lambda m: m.points, self, points)

    def mean(self) -> Float[Array, " d"]:
        """`int x mu(dx)`."""
        return jnp.einsum("...n,...nd->...d", self.weights, self.points)


def _check_weights(weights, tol):
    """Non-negative weights summing to one within `tol` (value checks: skipped
    with checks off). The sum is taken in at least float32, whatever the
    weights' own dtype."""
    if not checks_enabled():
        return weights
    if is_concrete(weights):
        w = np.asarray(weights, dtype=np.float64)
        if np.any(w < 0):
            raise ValueError("`weights` must be non-negative")
        if abs(float(w.sum()) - 1.0) > tol:
            raise ValueError(
                f"`weights` must sum to 1 (within {tol:.2g} in {weights.dtype}), got "
                f"{float(w.sum())!r}; pass `weights / weights.sum()` to normalise"
            )
        return weights
    total = jnp.sum(weights.astype(jnp.promote_types(weights.dtype, jnp.float32)))
    return eqx.branched_error_if(
        weights,
        jnp.any(weights < 0) | (jnp.abs(total - 1) > tol),
        jnp.where(jnp.any(weights < 0), 0, 1),
        ["`weights` must be non-negative", f"`weights` must sum to 1 (within {tol:.2g})"],
    )


def check_measure(measure, name: str = "measure") -> None:
    """`measure` is one token set: an `EmpiricalMeasure` with `(n, d)` points
    (a batch is mapped with `jax.vmap`, not passed whole)."""
    if not isinstance(measure, EmpiricalMeasure):
        raise TypeError(f"`{name}` must be an EmpiricalMeasure, got {type(measure).__name__}")
    if measure.points.ndim != 2:
        raise ValueError(
            f"`{name}.points` must be (n, d), got {measure.points.shape}; use "
            "`jax.vmap` over a batch of measures"
        )
    check_sizes(**{f"{name}.points:n tokens": measure.points.shape[0]})
