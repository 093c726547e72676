"""Parameter particles on a depth grid, interpolated in time (docs/theory.md, section 6)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._checks import as_float_array, check_grid
from ._params import AttentionParams

_INTERPOLATIONS = ("linear", "constant")


class ParamPath(eqx.Module):
    """A curve of parameter measures `t -> nu_t = (1/M) sum_m delta_{theta^m(t)}`
    on `[0, 1]`, stored as `M` particles at the nodes of a depth grid.

    - `interpolation="linear"` (default): `theta^m(t)` is piecewise linear
      between nodes `0 = t_0 < ... < t_J = 1`; the default grid is uniform,
      `t_j = j / J` with `J + 1` the leading axis of `params`.
    - `interpolation="constant"`: `theta^m(t) = theta^m_j` on `[t_j, t_{j+1})`,
      nodes are left endpoints `0 = t_0 < ... < t_{N-1} < 1` (default
      `t_j = j / N`). With `N = L` nodes and `M = H` particles this is exactly
      the parameters of the `L`-layer discrete transformer.

    **Arguments:** `params` (an [`mfattn.AttentionParams`][] with leaves
    `(N, M, d, k)`), optional increasing `times` `(N,)`, `interpolation`.

    **Raises:** `ValueError` for a grid that is not increasing, does not cover
    `[0, 1]`, or does not match `params`.
    """

    params: AttentionParams
    times: Float[Array, " N"]
    interpolation: str = eqx.field(static=True)

    def __init__(self, params: AttentionParams, times=None, interpolation: str = "linear"):
        if not isinstance(params, AttentionParams):
            raise TypeError(f"`params` must be an AttentionParams, got {type(params).__name__}")
        if params.Q.ndim != 4:
            raise ValueError(
                f"`params` must have leaves (N, M, d, k) on a depth grid, got {params.Q.shape}"
            )
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"`interpolation` must be one of {_INTERPOLATIONS}, got {interpolation!r}"
            )
        N = params.depth
        dtype = params.dtype
        if times is None:
            if interpolation == "linear":
                times = np.linspace(0.0, 1.0, N) if N > 1 else np.zeros(1)
            else:
                times = np.arange(N) / N
            times = jnp.asarray(times, dtype=dtype)
        else:
            times = as_float_array(times, "times", ndim=1).astype(dtype)
            if times.shape[0] != N:
                raise ValueError(
                    f"`times` has {times.shape[0]} nodes but `params` has {N} depth nodes"
                )
            times = check_grid(times, interpolation)
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
        return cls(jax.tree.map(lambda a: a[None], layer), interpolation="constant")

    def index(self, t):
        """The node `j` with `t_j <= t < t_{j+1}` (clipped to the grid)."""
        idx = jnp.searchsorted(self.times, t, side="right") - 1
        return jnp.clip(idx, 0, self.num_nodes - 1)

    @property
    def num_nodes(self) -> int:
        return self.params.depth

    def __call__(self, t) -> AttentionParams:
        """The particles `theta^m(t)`: an `AttentionParams` with leaves `(M, d, k)`."""
        N = self.num_nodes
        if N == 1:
            return self.params.layer(0)
        idx = jnp.searchsorted(self.times, t, side="right") - 1
        if self.interpolation == "constant":
            return self.params.layer(jnp.clip(idx, 0, N - 1))
        idx = jnp.clip(idx, 0, N - 2)
        t0, t1 = self.times[idx], self.times[idx + 1]
        lam = jnp.clip((t - t0) / (t1 - t0), 0.0, 1.0)
        return jax.tree.map(lambda a: (1 - lam) * a[idx] + lam * a[idx + 1], self.params)

    def basis(self, t):
        """The basis functions of the nodes at time `t`, `(N,)`: `theta(t) =
        sum_j b_j(t) theta_j` (hats for linear, indicators for constant)."""
        N = self.num_nodes
        if N == 1:
            return jnp.ones(1, self.times.dtype)
        idx = jnp.searchsorted(self.times, t, side="right") - 1
        if self.interpolation == "constant":
            return jax.nn.one_hot(jnp.clip(idx, 0, N - 1), N, dtype=self.times.dtype)
        idx = jnp.clip(idx, 0, N - 2)
        t0, t1 = self.times[idx], self.times[idx + 1]
        lam = jnp.clip((t - t0) / (t1 - t0), 0.0, 1.0)
        eye = jnp.eye(N, dtype=self.times.dtype)
        return (1 - lam) * eye[idx] + lam * eye[idx + 1]

    def save_times(self):
        """The nodes, plus `t = 1` for constant interpolation (whose nodes are
        left endpoints): the default times at which solutions are saved."""
        if self.interpolation == "constant" or self.num_nodes == 1:
            if self.num_nodes == 1 and self.interpolation == "linear":
                return jnp.array([0.0, 1.0], self.times.dtype)
            return jnp.concatenate([self.times, jnp.ones(1, self.times.dtype)])
        return self.times

    def breakpoints(self):
        """Interior nodes, where `theta(t)` has a kink or a jump (step-size
        controllers must step onto them)."""
        return self.times[1:] if self.interpolation == "constant" else self.times[1:-1]

    def basis_integrals(self) -> Float[Array, " N"]:
        """`c_j = int_0^1 b_j(t) dt` of each node's basis function (hat or
        indicator): `dLoss/dtheta_j^m = (1/M) int b_j(t) g(theta^m(t), t) dt`,
        so `M dLoss/dtheta_j / c_j` is the mean-field gradient at node `j`."""
        t = self.times
        if self.num_nodes == 1:
            return jnp.ones(1, t.dtype)
        if self.interpolation == "constant":
            return jnp.diff(jnp.concatenate([t, jnp.ones(1, t.dtype)]))
        h = jnp.diff(t)
        return 0.5 * (
            jnp.concatenate([h, jnp.zeros(1, t.dtype)])
            + jnp.concatenate([jnp.zeros(1, t.dtype), h])
        )
