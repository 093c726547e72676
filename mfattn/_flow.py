"""The token flow of fixed attention parameters over long horizons, in `R^d` or
on the unit sphere (docs/theory.md, section 10): the object of the clustering
and low-temperature studies, forward only."""

from collections.abc import Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from . import _solver_options as opts
from ._checks import (
    as_float_array,
    check_beta_in,
    check_finite_args,
    check_nonzero_rows,
    check_sizes,
    is_concrete,
)
from ._custom_types import BetaLike
from ._field import AttentionField, check_layer
from ._geometry import AbstractGeometry, as_geometry, is_sphere
from ._hardmax import HardmaxKernel
from ._kernels import AbstractAttentionKernel
from ._measure import EmpiricalMeasure
from ._params import AttentionParams
from ._path import ParamPath
from ._solution import Solution
from ._vector_field import AttentionVectorField


def identity_layer(dim: int, dtype=None) -> AttentionParams:
    """One head with `Q = K = V = O = I` in `R^dim`, leaves `(1, dim, dim)`: the
    model of the clustering literature (docs/theory.md, section 10)."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"`dim` must be a positive int, got {dim!r}")
    dtype = jnp.result_type(float) if dtype is None else dtype
    eye = jnp.eye(dim, dtype=dtype)[None]
    return AttentionParams(eye, eye, eye, eye)


def _as_path(params) -> ParamPath:
    """One layer `(H, d, k)` as the constant path, or a [`mfattn.ParamPath`][]."""
    if isinstance(params, ParamPath):
        return params
    return ParamPath.constant(params)


class TokenFlowField(eqx.Module):
    """The tokens-only view of [`mfattn.AttentionVectorField`][] for a Diffrax
    state that is one `(n, d)` array: `dx_i/dt = Gamma(x_i, mu_t; nu_t)`, or
    `P_{x_i} Gamma` with `geometry=mfattn.Sphere()`.

    **Arguments:** `field` (an [`mfattn.AttentionField`][]), `params` (one layer
    `(H, d, k)`, constant in time, or an [`mfattn.ParamPath`][]), `measure`
    (only its weights are used), `geometry` ([`mfattn.Euclidean`][]`()` or
    [`mfattn.Sphere`][]`()`; the string `"sphere"` is deprecated).
    """

    vf: AttentionVectorField

    def __init__(self, field, params, measure, geometry=None):
        self.vf = AttentionVectorField(field, _as_path(params), measure, None, geometry)

    def __call__(self, t, x, args=None):
        return self.vf.velocity(t, x)[0]


def attention_flow(
    params: AttentionParams | ParamPath,
    measure: EmpiricalMeasure,
    beta: BetaLike,
    ts: Float[ArrayLike, " T"] | Sequence[float] | None = None,
    *,
    saveat: diffrax.SaveAt | None = None,
    test_points: Float[ArrayLike, "m d"] | None = None,
    test_positions=None,
    geometry: AbstractGeometry | str | None = None,
    normalization: str | None = None,
    kernel: AbstractAttentionKernel | None = None,
    solver: diffrax.AbstractSolver | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    dt0: float | None = None,
    max_steps: int | None = opts.FLOW_MAX_STEPS,
    throw: bool = True,
    progress_meter: diffrax.AbstractProgressMeter | None = None,
) -> Float[Array, "T n d"] | Solution:
    """The tokens of `measure` carried by the attention field of fixed parameters
    over `[ts[0], ts[-1]]` (forward only, no loss, no adjoint):

        dx_i/dt = Gamma(x_i, mu_t; nu_t)                  (geometry=Euclidean())
        dx_i/dt = P_{x_i} Gamma(x_i, mu_t; nu_t)          (geometry=Sphere()),

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
      `geometry=Sphere()` the points are first projected on the sphere.
    - `beta`: inverse temperature (ignored by [`mfattn.HardmaxKernel`][]).
    - `ts`: increasing save times `(T,)`; the flow starts at `ts[0]`.
      `saveat=diffrax.SaveAt(ts=...)` is the same (give one of them).
    - `test_points`, `test_positions`: optional `(m, d)` test particles,
      zero-weight queries carried by the tokens' field without acting on it
      (as in the solvers); then a [`mfattn.Solution`][] with `ts`, `xs`,
      `test_xs` is returned instead of the array.
    - `geometry`: [`mfattn.Euclidean`][]`()` (default, the model of
      docs/theory.md, section 3) or [`mfattn.Sphere`][]`()` (normalised
      tokens, section 10); `normalization="sphere"` is its deprecated spelling.
    - `kernel`: the attention kernel (default dense softmax;
      [`mfattn.HardmaxKernel`][]`()` for the `beta = infinity` dynamics).
    - `solver`, `rtol`, `atol`, `stepsize_controller`, `dt0`, `max_steps`,
      `throw`, `progress_meter`: how Diffrax integrates, with Diffrax's
      meaning (defaults in docs/conventions.md: Tsit5 with a PID controller
      at `rtol=1e-8, atol=1e-10`, tighter than the limit's because the
      horizons are long; a fixed-step solver such as `diffrax.Euler()` takes
      `dt0`).

    **Returns:** the tokens at `ts`, `(T, n, d)` (a [`mfattn.Solution`][] with
    test particles).

    **Raises:** `ValueError` for a bad `normalization`, `ts` or layer shape; an
    `EqxRuntimeError` if the solve produces non-finite values.
    """
    geometry = as_geometry(geometry, normalization)
    if not isinstance(measure, EmpiricalMeasure):
        raise TypeError(f"`measure` must be an EmpiricalMeasure, got {type(measure).__name__}")
    path = _as_path(params)
    check_layer(measure, path.params.layer(0))
    check_sizes(**{"params:H (heads)": path.params.heads})
    # NaN parameters would otherwise surface as "the maximum number of steps was reached"
    path = eqx.tree_at(lambda q: q.params, path, check_finite_args(params=path.params))
    if saveat is not None:
        if ts is not None:
            raise TypeError("pass `ts` or `saveat`, not both")
        if not isinstance(saveat, diffrax.SaveAt):
            raise TypeError(f"`saveat` must be a diffrax.SaveAt, got {type(saveat).__name__}")
        if saveat.subs.t0 or saveat.subs.t1 or saveat.subs.ts is None:
            raise ValueError("`saveat` must give `ts` only: the flow starts at `ts[0]`")
        ts = saveat.subs.ts
    if ts is None:
        raise TypeError("pass the save times `ts` (or `saveat=diffrax.SaveAt(ts=...)`)")
    ts = as_float_array(ts, "ts", ndim=1)
    if ts.shape[0] < 1:
        raise ValueError("`ts` must hold at least one time")
    if is_concrete(ts) and np.any(np.diff(np.asarray(ts)) <= 0):
        raise ValueError("`ts` must be strictly increasing")
    solver = opts.default_solver() if solver is None else solver
    controller = opts.controller(
        solver, rtol, atol, stepsize_controller, dt0, default_tols=(opts.FLOW_RTOL, opts.FLOW_ATOL)
    )
    max_steps = opts.check_max_steps(max_steps)
    dtype = jnp.result_type(measure.points.dtype, ts.dtype)
    ts = check_finite_args(ts=ts)
    if not isinstance(kernel, HardmaxKernel):
        beta = check_beta_in(beta, jnp.result_type(dtype, path.params.dtype))
    why = "it cannot be mapped to the unit sphere (`geometry=mfattn.Sphere()`)"
    x0 = measure.points.astype(dtype)
    if is_sphere(geometry):
        x0 = check_nonzero_rows(x0, "measure.points", why)
    x0 = geometry.initial(x0)
    z0 = None
    if test_points is not None:
        z0 = as_float_array(test_points, "test_points", ndim=2)
        if z0.shape[1] != measure.dim:
            raise ValueError(f"`test_points` must be (m, d={measure.dim}), got {z0.shape}")
        z0 = check_finite_args(test_points=z0.astype(dtype))
        if is_sphere(geometry):
            z0 = check_nonzero_rows(z0, "test_points", why)
        z0 = geometry.initial(z0)
    measure = measure.with_points(x0)
    vf = AttentionVectorField(AttentionField(beta, kernel), path, measure, test_positions, geometry)
    if progress_meter is None:
        progress_meter = diffrax.NoProgressMeter()
    xs, zs = _solve(
        vf, (x0, z0), ts.astype(dtype), solver, controller, dt0, max_steps, throw, progress_meter
    )
    if test_points is None:
        return xs
    return Solution(ts=ts.astype(dtype), xs=xs, test_xs=zs)


@eqx.filter_jit
def _solve(vf, y0, ts, solver, controller, dt0, max_steps, throw, progress_meter):
    if ts.shape[0] == 1:
        return jax.tree.map(lambda a: a[None], y0)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vf),
        solver,
        ts[0],
        ts[-1],
        dt0,
        y0,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=controller,
        max_steps=max_steps,
        throw=throw,
        progress_meter=progress_meter,
    )
    ys = sol.ys
    if not throw:
        return ys
    bad = jnp.array(False)
    for leaf in jax.tree.leaves(ys):
        bad = bad | ~jnp.all(jnp.isfinite(leaf))
    return eqx.error_if(ys, bad, "the token flow produced non-finite values")
