"""How a parameter path is read between its depth-grid nodes: typed
strategies carrying their maths (docs/theory.md, section 6)."""

import abc
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


class AbstractInterpolation(eqx.Module):
    """How [`mfattn.ParamPath`][] reads `theta^m(t)` between the nodes `t_j`:
    [`mfattn.PiecewiseLinear`][] (the default) or [`mfattn.PiecewiseConstant`][].
    Every method takes the nodes `times (N,)`; `name` is the older string
    spelling (`"linear"`, `"constant"`)."""

    name: eqx.AbstractClassVar[str]

    @abc.abstractmethod
    def default_times(self, N: int) -> np.ndarray:
        """The uniform grid of `N` nodes."""

    @abc.abstractmethod
    def weights(self, times, t):
        """`(idx, lam)`: `theta(t) = (1 - lam) theta_idx + lam theta_{idx + 1}`
        (`lam = 0` for a piecewise-constant path)."""

    @abc.abstractmethod
    def save_times(self, times):
        """The default report times of a solve: the nodes, and `t = 1` when it
        is not one."""

    @abc.abstractmethod
    def breakpoints(self, times):
        """Interior nodes, where `theta(t)` has a kink or a jump (step-size
        controllers must step onto them)."""

    @abc.abstractmethod
    def basis_integrals(self, times):
        """`c_j = int_0^1 b_j(t) dt` of each node's basis function."""


class PiecewiseLinear(AbstractInterpolation):
    """`theta^m(t)` piecewise linear between nodes `0 = t_0 < ... < t_J = 1`
    (default grid `t_j = j / J`); the basis functions are hats."""

    name = "linear"

    def default_times(self, N):
        return np.linspace(0.0, 1.0, N) if N > 1 else np.zeros(1)

    def weights(self, times, t):
        N = times.shape[0]
        idx = jnp.clip(jnp.searchsorted(times, t, side="right") - 1, 0, N - 2)
        t0, t1 = times[idx], times[idx + 1]
        return idx, jnp.clip((t - t0) / (t1 - t0), 0.0, 1.0)

    def save_times(self, times):
        if times.shape[0] == 1:
            return jnp.array([0.0, 1.0], times.dtype)
        return times

    def breakpoints(self, times):
        return times[1:-1]

    def basis_integrals(self, times):
        h = jnp.diff(times)
        zero = jnp.zeros(1, times.dtype)
        return 0.5 * (jnp.concatenate([h, zero]) + jnp.concatenate([zero, h]))


class PiecewiseConstant(AbstractInterpolation):
    """`theta^m(t) = theta^m_j` on `[t_j, t_{j+1})`, nodes the left endpoints
    `0 = t_0 < ... < t_{N-1} < 1` (default `t_j = j / N`); the basis functions
    are indicators. With `N = L` nodes and `M = H` particles this is exactly
    the parameters of the `L`-layer discrete transformer."""

    name = "constant"

    def default_times(self, N):
        return np.arange(N) / N

    def weights(self, times, t):
        idx = jnp.clip(jnp.searchsorted(times, t, side="right") - 1, 0, times.shape[0] - 1)
        return idx, jnp.zeros((), times.dtype)

    def save_times(self, times):
        return jnp.concatenate([times, jnp.ones(1, times.dtype)])

    def breakpoints(self, times):
        return times[1:]

    def basis_integrals(self, times):
        return jnp.diff(jnp.concatenate([times, jnp.ones(1, times.dtype)]))


_BY_NAME = {"linear": PiecewiseLinear, "constant": PiecewiseConstant}


def as_interpolation(interpolation=None) -> AbstractInterpolation:
    """The strategy from an object, `None` (linear) or a deprecated string."""
    if interpolation is None:
        return PiecewiseLinear()
    if isinstance(interpolation, str):
        if interpolation not in _BY_NAME:
            raise ValueError(
                "`interpolation` must be mfattn.PiecewiseLinear() or mfattn.PiecewiseConstant(), "
                f"got {interpolation!r}"
            )
        new = _BY_NAME[interpolation]
        if interpolation != "linear":  # the old default spelling, passed along by old code
            warnings.warn(
                f"`interpolation={interpolation!r}` is deprecated; use "
                f"`interpolation=mfattn.{new.__name__}()`",
                DeprecationWarning,
                stacklevel=3,
            )
        return new()
    if not isinstance(interpolation, AbstractInterpolation):
        raise TypeError(
            "`interpolation` must be mfattn.PiecewiseLinear() or mfattn.PiecewiseConstant(), got "
            f"{type(interpolation).__name__}"
        )
    return interpolation


__all__ = ["AbstractInterpolation", "PiecewiseLinear", "PiecewiseConstant", "jax"]
