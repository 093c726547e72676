"""The token flow of fixed attention parameters over long horizons, in `R^d` or
on the unit sphere (docs/theory.md, section 10): the object of the clustering
and low-temperature studies, forward only."""

from collections.abc import Sequence

import diffrax
import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ._checks import as_float_array, is_concrete
from ._custom_types import BetaLike
from ._field import AttentionField, check_layer
from ._kernels import AbstractAttentionKernel
from ._measure import EmpiricalMeasure
from ._params import AttentionParams
from ._path import ParamPath
from ._sphere import check_normalization, project_tangent


def identity_layer(dim: int, dtype=None) -> AttentionParams:
    """One head with `Q = K = V = O = I` in `R^dim`, leaves `(1, dim, dim)`: the
    model of the clustering literature (docs/theory.md, section 10)."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"`dim` must be a positive int, got {dim!r}")
    dtype = jnp.result_type(float) if dtype is None else dtype
    eye = jnp.eye(dim, dtype=dtype)[None]
    return AttentionParams(eye, eye, eye, eye)


class TokenFlowField(eqx.Module):
    """The vector field `dx_i/dt = Gamma(x_i, mu_t; nu_t)` of the tokens' own
    measure, or its projection `P_{x_i} Gamma` on the sphere
    (`normalization="sphere"`), for a Diffrax `ODETerm`.

    **Arguments:** `field` (an [`mfattn.AttentionField`][]), `params` (one layer
    `(H, d, k)`, constant in time, or an [`mfattn.ParamPath`][]), `measure`
    (only its weights are used), `normalization` (`None` or `"sphere"`).
    """

    field: AttentionField
    params: AttentionParams | ParamPath
    measure: EmpiricalMeasure
    normalization: str | None = eqx.field(static=True, default=None)

    def __call__(self, t, x, args=None):
        layer = self.params(t) if isinstance(self.params, ParamPath) else self.params
        v, _ = self.field.forward(self.measure.with_points(x), layer)
        if self.normalization == "sphere":
            v = project_tangent(x, v)
        return v


def attention_flow(
    params: AttentionParams | ParamPath,
    measure: EmpiricalMeasure,
    beta: BetaLike,
    ts: Float[ArrayLike, " T"] | Sequence[float],
    *,
    normalization: str | None = None,
    kernel: AbstractAttentionKernel | None = None,
    solver: diffrax.AbstractSolver = diffrax.Tsit5(),
    rtol: float = 1e-8,
    atol: float = 1e-10,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    dt0: float | None = None,
    max_steps: int = 100_000,
) -> Float[Array, "T n d"]:
    """The tokens of `measure` carried by the attention field of fixed parameters
    over `[ts[0], ts[-1]]` (forward only, no loss, no adjoint):

        dx_i/dt = Gamma(x_i, mu_t; nu_t)                  (normalization=None)
        dx_i/dt = P_{x_i} Gamma(x_i, mu_t; nu_t)          (normalization="sphere"),

    `P_x = I - x x^T / |x|^2`, `mu_t` the tokens' own measure (docs/theory.md,
    sections 6 and 10). On the sphere the exact flow keeps every `|x_i| = 1`
    (`d|x|^2/dt = 2 <x, P_x Gamma> = 0`); the solver keeps it to its tolerance.

    Unlike [`mfattn.solve_limit`][], whose time is depth in `[0, 1]`, the
    horizon is arbitrary (clusters merge on time scales exponential in `beta`)
    and only the forward flow is solved.

    **Arguments:**

    - `params`: one layer `(H, d, k)` used at every time (the clustering
      literature's setting, e.g. [`mfattn.identity_layer`][]), or an
      [`mfattn.ParamPath`][] read at `t` (then `ts` lies in `[0, 1]`).
    - `measure`: the initial tokens `(n, d)` and their weights. With
      `normalization="sphere"` the points are first projected on the sphere.
    - `beta`: inverse temperature (ignored by [`mfattn.HardmaxKernel`][]).
    - `ts`: increasing save times `(T,)`; the flow starts at `ts[0]`.
    - `normalization`: `None` (default, the model of docs/theory.md, section 3)
      or `"sphere"` (normalised tokens, section 10).
    - `kernel`: the attention kernel (default dense softmax;
      [`mfattn.HardmaxKernel`][]`()` for the `beta = infinity` dynamics).
    - `solver`, `rtol`, `atol`, `stepsize_controller`, `dt0`, `max_steps`: how
      Diffrax integrates (default Tsit5 with a PID controller at `rtol`,
      `atol`; pass `stepsize_controller=diffrax.ConstantStepSize()` and `dt0`
      for fixed steps).

    **Returns:** the tokens at `ts`, `(T, n, d)`.

    **Raises:** `ValueError` for a bad `normalization`, `ts` or layer shape; an
    `EqxRuntimeError` if the solve produces non-finite values.
    """
    check_normalization(normalization)
    if not isinstance(measure, EmpiricalMeasure):
        raise TypeError(f"`measure` must be an EmpiricalMeasure, got {type(measure).__name__}")
    if isinstance(params, ParamPath):
        check_layer(measure, params.params.layer(0))
    else:
        check_layer(measure, params)
    ts = as_float_array(ts, "ts", ndim=1)
    if ts.shape[0] < 1:
        raise ValueError("`ts` must hold at least one time")
    if is_concrete(ts) and np.any(np.diff(np.asarray(ts)) <= 0):
        raise ValueError("`ts` must be strictly increasing")
    if stepsize_controller is None:
        stepsize_controller = diffrax.PIDController(rtol=rtol, atol=atol)
    dtype = jnp.result_type(measure.points.dtype, ts.dtype)
    x0 = measure.points.astype(dtype)
    if normalization == "sphere":
        x0 = x0 / jnp.linalg.norm(x0, axis=-1, keepdims=True)
    measure = measure.with_points(x0)
    field = AttentionField(beta, kernel)
    vf = TokenFlowField(field, params, measure, normalization)
    return _solve(vf, x0, ts.astype(dtype), solver, stepsize_controller, dt0, max_steps)


@eqx.filter_jit
def _solve(vf, x0, ts, solver, controller, dt0, max_steps):
    if ts.shape[0] == 1:
        return x0[None]
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vf),
        solver,
        ts[0],
        ts[-1],
        dt0,
        x0,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=controller,
        max_steps=max_steps,
    )
    xs = sol.ys
    return eqx.error_if(xs, ~jnp.all(jnp.isfinite(xs)), "the token flow produced non-finite values")
