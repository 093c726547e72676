"""The attention field along a parameter path: the one vector field that the
discrete transformer steps with explicit Euler and that the limit hands to
Diffrax (docs/theory.md, sections 3 and 6)."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._field import AttentionField
from ._geometry import AbstractGeometry, Euclidean, Sphere, as_geometry
from ._interpolation import PiecewiseConstant
from ._measure import EmpiricalMeasure
from ._mlp import Activation, MLPParams, mlp_backward, mlp_forward
from ._params import AttentionParams
from ._path import ParamPath


class AttentionVectorField(eqx.Module):
    """`dx_i/dt = Gamma(x_i, mu_t; nu_t) [+ F(x_i; phi_t)]` for the tokens and
    extra particles, with `nu_t` read from a [`mfattn.ParamPath`][] and `mu_t`
    the tokens' own empirical measure (McKean-Vlasov). With
    `geometry=mfattn.Sphere()` the velocity is projected on the tangent space
    of the sphere, `dx_i/dt = P_{x_i} Gamma(x_i, mu_t; nu_t)` (docs/theory.md,
    section 10).

    It is a Diffrax vector field, `vf(t, (X, Z), args) -> (dX/dt, dZ/dt)`; the
    `L`-layer discrete transformer is explicit Euler on its unprojected
    velocity, `x^{l+1} = step(x^l, h v(l / L, x^l))` (`geometry.step`), with the
    piecewise-constant path of `J = L` nodes that *is* its parameters
    (docs/theory.md, section 3). A fixed layer is a constant path
    ([`mfattn.ParamPath.constant`][]).

    **Arguments:**

    - `field`: an [`mfattn.AttentionField`][] (inverse temperature and kernel).
    - `path`: an [`mfattn.ParamPath`][].
    - `measure`: the input tokens; only its weights (and number of atoms) are
      used, the points come from the state.
    - `test_positions`: for a kernel that reads positions (causal), the
      positions of the extra particles (default: after the last token).
    - `geometry`: [`mfattn.Euclidean`][]`()` (default) or [`mfattn.Sphere`][]`()`
      (`normalization="sphere"` is its deprecated spelling).
    - `mlp`, `activation`: optional MLP blocks added to the attention, one per
      node of a piecewise-constant path (docs/theory.md, section 9).
    - `probes`: the extra particles are test particles (default, `False`:
      moved by the field, acting on nothing, with the adjoint function at their
      position) or probes (`True`: queries of weight 1 whose cotangents act on
      the tokens' adjoint; docs/theory.md, section 12).
    """

    field: AttentionField
    path: ParamPath
    measure: EmpiricalMeasure
    test_positions: Array | None = None
    geometry: AbstractGeometry
    mlp: MLPParams | None
    activation: Activation = eqx.field(static=True)
    probes: bool = eqx.field(static=True)

    def __init__(
        self,
        field: AttentionField,
        path: ParamPath,
        measure: EmpiricalMeasure,
        test_positions: Array | None = None,
        geometry: AbstractGeometry | str | None = None,
        mlp: MLPParams | None = None,
        activation: Activation = "tanh",
        probes: bool = False,
        *,
        normalization: str | None = None,
    ):
        self.field = field
        self.path = path
        self.measure = measure
        self.test_positions = test_positions
        self.geometry = as_geometry(geometry, normalization)
        self.mlp = mlp
        self.activation = activation
        self.probes = probes

    def __check_init__(self):
        if self.mlp is not None and not isinstance(self.path.interpolation, PiecewiseConstant):
            raise ValueError("MLP blocks need a piecewise-constant path (one block per node)")

    @property
    def normalization(self) -> str | None:
        """The older string spelling of `geometry`: `"sphere"` or `None`."""
        return "sphere" if isinstance(self.geometry, Sphere) else None

    def layer(self, t):
        """The blocks at `t`: `(nu_t, phi_t)`, `nu_t` an `AttentionParams` with
        leaves `(M, d, k)`, `phi_t` an `MLPParams` block or `None`."""
        theta = self.path(t)
        phi = None if self.mlp is None else self.mlp.layer(self.path.index(t))
        return theta, phi

    def layers(self):
        """The blocks at every node, stacked (what the discrete model scans)."""
        return self.path.params, self.mlp

    def _measure(self, X):
        return self.measure.with_points(X)

    def field_velocity(self, t, X, Z=None, *, layer=None, return_cache=False):
        """The unprojected velocity `(v(X), v(Z))` at `t` (and the kernel cache
        with `return_cache=True`): what the discrete model's step uses.
        `layer`: the blocks `(theta, phi)` at `t` when the caller has them."""
        theta, phi = self.layer(t) if layer is None else layer
        vx, vz, cache = self.field.forward(
            self._measure(X), theta, Z, return_cache=True, test_positions=self.test_positions
        )
        if phi is not None:
            vx = vx + mlp_forward(phi, X, self.activation)
            vz = None if Z is None else vz + mlp_forward(phi, Z, self.activation)
        return (vx, vz, cache) if return_cache else (vx, vz)

    def field_pullback(self, t, X, Z, P, PZ, *, layer=None, cache=None):
        """The pullback of the unprojected velocity at cotangents `(P, PZ)`:
        `(b_X, b_Z, (g_theta, g_phi))`, the brackets and gradient maps of the
        attention (see [`mfattn.AttentionField.backward`][]) plus the MLP's."""
        theta, phi = self.layer(t) if layer is None else layer
        b, bz, g = self.field.backward(
            self._measure(X),
            theta,
            P,
            Z,
            PZ,
            cache,
            test_positions=self.test_positions,
            probes=self.probes,
        )
        g_phi = None
        if phi is not None:
            bx_mlp, g_phi = mlp_backward(phi, X, P, self.measure.weights, self.activation)
            b = b + bx_mlp
            if Z is not None:
                bz = bz + mlp_backward(phi, Z, PZ, None, self.activation)[0]
        return b, bz, (g, g_phi)

    def velocity(self, t, X: Float[Array, "n d"], Z=None, *, layer=None, return_cache=False):
        """`(F(X), F(Z))` at time `t`, `F = geometry.velocity(x, Gamma [+ F_mlp])`
        (and the kernel cache with `return_cache=True`)."""
        vx, vz, cache = self.field_velocity(t, X, Z, layer=layer, return_cache=True)
        vx = self.geometry.velocity(X, vx)
        vz = None if Z is None else self.geometry.velocity(Z, vz)
        return (vx, vz, cache) if return_cache else (vx, vz)

    def adjoint(self, t, X, Z, P, PZ, *, layer=None, cache=None):
        """The closed-form adjoint bracket of the projected velocity at time `t`:
        `(b_X, b_Z, g)` with `g` the attention's per-head gradient map.

        With `geometry=Sphere()`, the bracket of `F(x, mu) = P_x Gamma(x, mu)`:
        the field's pullback at the projected cotangents `P_{x_j} p_j` (which
        carries the Lions term through the projection) plus the projection's
        own derivative at each point,

            b_i = [pullback of Gamma at (P_{x_j} p_j)_j]_i + c_x(x_i, Gamma(x_i), p_i),

        `c_x` as in docs/theory.md, section 10; `g` is the gradient map at the
        projected cotangents."""
        if isinstance(self.geometry, Euclidean):
            b, bz, (g, _) = self.field_pullback(t, X, Z, P, PZ, layer=layer, cache=cache)
            return b, bz, g
        if cache is None:
            gx, gz, cache = self.field_velocity(t, X, Z, layer=layer, return_cache=True)
        else:  # the velocities from the cached per-head outputs
            theta = self.path(t) if layer is None else layer[0]
            g = jnp.einsum("hdk,hmk->md", theta.O, cache[0]) / theta.heads
            gx, gz = g[: X.shape[0]], (None if Z is None else g[X.shape[0] :])
        cx, qx = self.geometry.velocity_pullback(X, gx, P)
        cz, qz = (None, None) if Z is None else self.geometry.velocity_pullback(Z, gz, PZ)
        b, bz, (grads, _) = self.field_pullback(t, X, Z, qx, qz, layer=layer, cache=cache)
        return b + cx, (None if Z is None else bz + cz), grads

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


__all__ = ["AttentionVectorField", "AdjointVectorField", "MeanFieldVectorField", "AttentionParams"]
