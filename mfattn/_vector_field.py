"""The attention field along a parameter path: the one vector field that the
discrete transformer steps with explicit Euler and that the limit hands to
Diffrax (docs/theory.md, sections 3 and 6)."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._field import AttentionField
from ._measure import EmpiricalMeasure
from ._params import AttentionParams
from ._path import ParamPath
from ._sphere import check_normalization, project_tangent, project_tangent_pullback


class AttentionVectorField(eqx.Module):
    """`dx_i/dt = Gamma(x_i, mu_t; nu_t)` for the tokens and test particles,
    with `nu_t` read from a [`mfattn.ParamPath`][] and `mu_t` the tokens' own
    empirical measure (McKean-Vlasov); test particles are carried along. With
    `normalization="sphere"` the field is projected on the tangent space of
    the sphere, `dx_i/dt = P_{x_i} Gamma(x_i, mu_t; nu_t)` (docs/theory.md,
    section 10).

    It is a Diffrax vector field, `vf(t, (X, Z), args) -> (dX/dt, dZ/dt)`; the
    `L`-layer discrete transformer is explicit Euler on it,
    `x^{l+1} = x^l + (1/L) vf(l / L, x^l)`, with the piecewise-constant path of
    `J = L` nodes that *is* its parameters (docs/theory.md, section 3).

    **Arguments:**

    - `field`: an [`mfattn.AttentionField`][] (inverse temperature and kernel).
    - `path`: an [`mfattn.ParamPath`][].
    - `measure`: the input tokens; only its weights (and number of atoms) are
      used, the points come from the state.
    - `test_positions`: for a causal kernel, the positions of the test
      particles (default: after the last token).
    - `normalization`: `None` (default) or `"sphere"`, the projected field
      `P_x Gamma`, `P_x = I - x x^T / |x|^2` (the limit of the post-normalised
      transformer).
    """

    field: AttentionField
    path: ParamPath
    measure: EmpiricalMeasure
    test_positions: Array | None = None
    normalization: str | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        check_normalization(self.normalization)

    def layer(self, t) -> AttentionParams:
        """The heads `nu_t`, an `AttentionParams` with leaves `(M, d, k)`."""
        return self.path(t)

    def velocity(self, t, X: Float[Array, "n d"], Z=None, *, layer=None, return_cache=False):
        """`(Gamma(X), Gamma(Z))` at time `t` (and the kernel cache with
        `return_cache=True`), projected on the sphere's tangent spaces with
        `normalization="sphere"`. `layer`: the heads at `t` when the caller
        already has them (the discrete model scans the nodes), skipping
        interpolation."""
        layer = self.path(t) if layer is None else layer
        out = self.field.forward(
            self.measure.with_points(X),
            layer,
            Z,
            return_cache=return_cache,
            test_positions=self.test_positions,
        )
        if self.normalization is None:
            return out
        vx = project_tangent(X, out[0])
        vz = None if Z is None else project_tangent(Z, out[1])
        return (vx, vz) + tuple(out[2:])

    def adjoint(self, t, X, Z, P, PZ, *, layer=None, cache=None):
        """The closed-form adjoint bracket at time `t`: `(b_X, b_Z, g)` with `g`
        the per-head gradient map (see [`mfattn.AttentionField.backward`][]).

        With `normalization="sphere"`, the bracket of the projected field
        `F(x, mu) = P_x Gamma(x, mu)`: the field's pullback at the projected
        cotangents `P_{x_j} p_j` (which carries the Lions term through the
        projection) plus the projection's own derivative at each point,

            b_i = [pullback of Gamma at (P_{x_j} p_j)_j]_i + c_x(x_i, Gamma(x_i), p_i),

        `c_x` as in docs/theory.md, section 10; `g` is the gradient map at the
        projected cotangents."""
        layer = self.path(t) if layer is None else layer
        measure = self.measure.with_points(X)
        if self.normalization is None:
            return self.field.backward(
                measure, layer, P, Z, PZ, cache, test_positions=self.test_positions
            )
        if cache is None:
            gx, gz, cache = self.field.forward(
                measure, layer, Z, return_cache=True, test_positions=self.test_positions
            )
        else:  # the velocities from the cached per-head outputs
            g = jnp.einsum("hdk,hmk->md", layer.O, cache[0]) / layer.heads
            gx, gz = g[: X.shape[0]], (None if Z is None else g[X.shape[0] :])
        cx, qx = project_tangent_pullback(X, gx, P)
        if Z is None:
            b, bz, grads = self.field.backward(
                measure, layer, qx, None, None, cache, test_positions=self.test_positions
            )
            return b + cx, None, grads
        cz, qz = project_tangent_pullback(Z, gz, PZ)
        b, bz, grads = self.field.backward(
            measure, layer, qx, Z, qz, cache, test_positions=self.test_positions
        )
        return b + cx, bz + cz, grads

    def __call__(self, t, y, args=None):
        X, Z = y
        return self.velocity(t, X, Z)


class AdjointVectorField(eqx.Module):
    """The backward McKean-Vlasov ODE (docs/theory.md, section 6),

        dp_i/dt = -[grad_x Gamma(x_i)^T p_i + sum_j w_j d_mu Gamma(x_j)(x_i)^T p_j],

    in closed form, reading `x(t)` from the forward solution's dense output
    (`forward`, anything with `.evaluate(t) -> (X, Z)`). With a third state it
    also accumulates `int_t^1 b_j(s) g(theta(s), s) ds` for every node `j`."""

    vf: AttentionVectorField
    forward: eqx.Module

    def __call__(self, t, y, args=None):
        P, PZ = y[0], y[1]
        X, Z = self.forward.evaluate(t)
        b, bz, g = self.vf.adjoint(t, X, Z, P, PZ)
        if len(y) == 2:
            return -b, -bz
        basis = self.vf.path.basis(t)
        dG = jax.tree.map(lambda a: -jnp.einsum("n,m...->nm...", basis, a), g)
        return -b, -bz, dG


def MeanFieldVectorField(field, path, weights):
    """Deprecated constructor kept for compatibility: an
    [`mfattn.AttentionVectorField`][] on uniform-or-given `weights`."""
    d = path.params.dim
    measure = EmpiricalMeasure(jnp.zeros((weights.shape[0], d), weights.dtype), weights)
    return AttentionVectorField(field, path, measure)
