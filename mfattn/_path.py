"""Parameter particles on a depth grid, interpolated in time (docs/theory.md, section 6)."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._checks import as_float_array, check_grid
from ._interpolation import AbstractInterpolation, PiecewiseConstant, as_interpolation
from ._params import AttentionParams


class ParamPath(eqx.Module):
    """A curve of parameter measures `t -> nu_t = (1/M) sum_m delta_{theta^m(t)}`
    on `[0, 1]`, stored as `M` particles at the nodes of a depth grid.

    - `interpolation=mfattn.PiecewiseLinear()` (default): `theta^m(t)` is
      piecewise linear between nodes `0 = t_0 < ... < t_J = 1`; the default
      grid is uniform, `t_j = j / J` with `J + 1` the leading axis of `params`.
    - `interpolation=mfattn.PiecewiseConstant()`: `theta^m(t) = theta^m_j` on
      `[t_j, t_{j+1})`, nodes are left endpoints `0 = t_0 < ... < t_{N-1} < 1`
      (default `t_j = j / N`). With `N = L` nodes and `M = H` particles this is
      exactly the parameters of the `L`-layer discrete transformer.

    The strings `"linear"` and `"constant"` are the older spellings
    (`"constant"` warns); `path.interpolation.name` gives them back.

    **Arguments:** `params` (an [`mfattn.AttentionParams`][] with leaves
    `(N, M, d, k)`), optional increasing `times` `(N,)`, `interpolation`.

    **Raises:** `ValueError` for a grid that is not increasing, does not cover
    `[0, 1]`, or does not match `params`.
    """

    params: AttentionParams
    times: Float[Array, " N"]
    interpolation: AbstractInterpolation

    def __init__(
        self,
        params: AttentionParams,
        times=None,
        interpolation: AbstractInterpolation | str | None = None,
    ):
        if not isinstance(params, AttentionParams):
            raise TypeError(f"`params` must be an AttentionParams, got {type(params).__name__}")
        if params.Q.ndim != 4:
            raise ValueError(
                f"`params` must have leaves (N, M, d, k) on a depth grid, got {params.Q.shape}"
            )
        interpolation = as_interpolation(interpolation)
        N = params.depth
        dtype = params.dtype
        if times is None:
            times = jnp.asarray(interpolation.default_times(N), dtype=dtype)
        else:
            times = as_float_array(times, "times", ndim=1).astype(dtype)
            if times.shape[0] != N:
                raise ValueError(
                    f"`times` has {times.shape[0]} nodes but `params` has {N} depth nodes"
                )
            times = check_grid(times, interpolation.name)
        self.params = params
        self.times = times
        self.interpolation = interpolation

    @classmethod
    def constant(cls, layer: AttentionParams) -> "ParamPath":
        """The constant path `t -> nu` of one layer (leaves `(M, d, k)`), at
        every time (also outside `[0, 1]`)."""
        if not isinstance(layer, AttentionParams):
            raise TypeError(f"`layer` must be an AttentionParams, got {type(layer).__name__}")
        if layer.Q.ndim != 3:
            raise ValueError(f"`layer` must have leaves (M, d, k), got {layer.Q.shape}")
        return cls(jax.tree.map(lambda a: a[None], layer), interpolation=PiecewiseConstant())

    def index(self, t):
        """The node `j` with `t_j <= t < t_{j+1}` (clipped to the grid)."""
        idx = jnp.searchsorted(self.times, t, side="right") - 1
        return jnp.clip(idx, 0, self.num_nodes - 1)

    @property
    def num_nodes(self) -> int:
        return self.params.depth

    def __call__(self, t) -> AttentionParams:
        """The particles `theta^m(t)`: an `AttentionParams` with leaves `(M, d, k)`."""
        if self.num_nodes == 1:
            return self.params.layer(0)
        idx, lam = self.interpolation.weights(self.times, t)
        if isinstance(self.interpolation, PiecewiseConstant):
            return self.params.layer(idx)
        return jax.tree.map(lambda a: (1 - lam) * a[idx] + lam * a[idx + 1], self.params)

    def basis(self, t):
        """The basis functions of the nodes at time `t`, `(N,)`: `theta(t) =
        sum_j b_j(t) theta_j` (hats for linear, indicators for constant)."""
        N = self.num_nodes
        if N == 1:
            return jnp.ones(1, self.times.dtype)
        idx, lam = self.interpolation.weights(self.times, t)
        eye = jnp.eye(N + 1, dtype=self.times.dtype)[:, :N]
        return (1 - lam) * eye[idx] + lam * eye[idx + 1]

    def save_times(self):
        """The default times at which solutions are saved: the nodes, plus
        `t = 1` when it is not one (constant interpolation, one node)."""
        return self.interpolation.save_times(self.times)

    def breakpoints(self):
        """Interior nodes, where `theta(t)` has a kink or a jump (step-size
        controllers must step onto them)."""
        return self.interpolation.breakpoints(self.times)

    def basis_integrals(self) -> Float[Array, " N"]:
        """`c_j = int_0^1 b_j(t) dt` of each node's basis function (hat or
        indicator): `dLoss/dtheta_j^m = (1/M) int b_j(t) g(theta^m(t), t) dt`,
        so `M dLoss/dtheta_j / c_j` is the mean-field gradient at node `j`."""
        if self.num_nodes == 1:
            return jnp.ones(1, self.times.dtype)
        return self.interpolation.basis_integrals(self.times)
