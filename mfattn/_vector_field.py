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


class AttentionVectorField(eqx.Module):
    """`dx_i/dt = Gamma(x_i, mu_t; nu_t)` for the tokens and test particles,
    with `nu_t` read from a [`mfattn.ParamPath`][] and `mu_t` the tokens' own
    empirical measure (McKean-Vlasov); test particles are carried along.

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
    """

    field: AttentionField
    path: ParamPath
    measure: EmpiricalMeasure
    test_positions: Array | None = None

    def layer(self, t) -> AttentionParams:
        """The heads `nu_t`, an `AttentionParams` with leaves `(M, d, k)`."""
        return self.path(t)

    def velocity(self, t, X: Float[Array, "n d"], Z=None, *, layer=None, return_cache=False):
        """`(Gamma(X), Gamma(Z))` at time `t` (and the kernel cache with
        `return_cache=True`). `layer`: the heads at `t` when the caller already
        has them (the discrete model scans the nodes), skipping interpolation."""
        layer = self.path(t) if layer is None else layer
        return self.field.forward(
            self.measure.with_points(X),
            layer,
            Z,
            return_cache=return_cache,
            test_positions=self.test_positions,
        )

    def adjoint(self, t, X, Z, P, PZ, *, layer=None, cache=None):
        """The closed-form adjoint bracket at time `t`: `(b_X, b_Z, g)` with `g`
        the per-head gradient map (see [`mfattn.AttentionField.backward`][])."""
        layer = self.path(t) if layer is None else layer
        return self.field.backward(
            self.measure.with_points(X),
            layer,
            P,
            Z,
            PZ,
            cache,
            test_positions=self.test_positions,
        )

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
