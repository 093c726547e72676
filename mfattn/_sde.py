"""The common-noise SDE: the limit of the transformer with random per-layer
attention and MLP parameters and residual `1/sqrt(L)` (docs/theory.md, section 9)."""

import math

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

from . import _solver_options as opts
from ._checks import (
    as_float_array,
    check_beta_in,
    check_finite_args,
    check_nonzero,
    check_positive,
    check_sizes,
    is_concrete,
)
from ._custom_types import BetaLike, ScalarLike
from ._field import AttentionField
from ._kernels import AbstractAttentionKernel
from ._measure import EmpiricalMeasure
from ._mlp import Activation, MLPParams, mlp_forward, resolve_activation
from ._params import AttentionParams
from ._path import ParamPath
from ._vector_field import AttentionVectorField


class SDESolution(eqx.Module):
    """Token paths of one realisation of the common-noise SDE.

    **Fields:**

    - `ts`: the save times `(S,)`.
    - `xs`: the tokens at those times, `(S, n, d)`.
    - `test_xs`: test particles `(S, m, d)`, or `None`.
    - `log_tangent`: with `tangent=` given to [`mfattn.solve_sde`][],
      `log(|dX(t_s)| / |dX(t_0)|)` for the linearised flow, `(S,)`; else `None`.
      `log_tangent[-1] / (ts[-1] - ts[0])` estimates the top Lyapunov exponent.
    - `stats`: Diffrax's statistics of the (last) solve.
    """

    ts: Float[Array, " S"]
    xs: Float[Array, "S n d"]
    test_xs: Float[Array, "S m d"] | None = None
    log_tangent: Float[Array, " S"] | None = None
    stats: dict = eqx.field(default_factory=dict)


class _CommonNoise(eqx.Module):
    """Drift and noise features of the SDE on the stacked state `Y = [X; Z]`
    (tokens, then test particles). Column `m` of the diffusion is
    `(H M)^{-1/2} G(., mu_X; theta_m)` for the attention features and
    `M'^{-1/2} F(.; phi_m)` for the MLP features."""

    field: AttentionField
    measure: EmpiricalMeasure
    features: AttentionParams | None
    heads: ScalarLike
    mlp: MLPParams | None
    drift_vf: AttentionVectorField | None
    activation: Activation = eqx.field(static=True)
    test_positions: Array | None = None

    @property
    def n(self) -> int:
        return self.measure.num_points

    def drift(self, t, Y, _=None):
        if self.drift_vf is None:
            return jnp.zeros_like(Y)
        vX, vZ = self.drift_vf.velocity(t, Y[: self.n], Y[self.n :])
        return jnp.concatenate([vX, vZ], axis=0)

    def attention_column(self, t, Y, theta):
        """`G(y, mu_X; theta)` at every row `y` of `Y` (one head, unscaled)."""
        one = jax.tree.map(lambda a: a[None], theta)
        measure = self.measure.with_points(Y[: self.n])
        vX, vZ = self.field.forward(measure, one, Y[self.n :], test_positions=self.test_positions)
        return jnp.concatenate([vX, vZ], axis=0)

    def mlp_column(self, t, Y, phi):
        return mlp_forward(phi, Y, self.activation)

    def families(self):
        """`(column function, stacked features, scale)` for each noise family."""
        out = []
        if self.features is not None:
            M = self.features.Q.shape[0]
            out.append((self.attention_column, self.features, (self.heads * M) ** -0.5))
        if self.mlp is not None:
            out.append((self.mlp_column, self.mlp, self.mlp.W1.shape[0] ** -0.5))
        return out


def _tangent(fn, n, N):
    """`fn(t, Y, f)` on `Y = [X; Z]` lifted to `[X; Z; dX]`: the tokens' tangent
    `dX (n, d)` moves by `D_X fn(Y)[:n] dX` (the tokens do not see `Z`)."""

    def lifted(t, Ya, f=None):
        Y, dX = Ya[:N], Ya[N:]
        value, dvalue = jax.jvp(lambda X: fn(t, jnp.concatenate([X, Y[n:]]), f), (Y[:n],), (dX,))
        return jnp.concatenate([value, dvalue[:n]], axis=0)

    return lifted


def _diffusion(families, t, Y):
    """The diffusion matrix `(rows, d, K)`, `K` the number of Brownian motions."""
    cols = []
    for fn, feats, scale in families:
        col = jax.vmap(lambda f, fn=fn: fn(t, Y, f))(feats)  # (K_family, rows, d)
        cols.append(scale * jnp.moveaxis(col, 0, -1))
    return jnp.concatenate(cols, axis=-1)


def _ito_correction(families, t, Y):
    """`(1/2) sum_k D sigma_k(Y)[sigma_k(Y)]`: Itô drift = Stratonovich drift + this."""
    total = jnp.zeros_like(Y)
    for fn, feats, scale in families:

        def one(f, fn=fn):
            g = lambda Y: fn(t, Y, f)
            return jax.jvp(g, (Y,), (g(Y),))[1]

        total = total + 0.5 * scale**2 * jnp.sum(jax.vmap(one)(feats), axis=0)
    return total


def _levy_area(solver):
    """The cheapest Brownian path `solver` accepts."""
    needed = getattr(solver, "minimal_levy_area", diffrax.BrownianIncrement)
    if needed is None or issubclass(diffrax.BrownianIncrement, needed):
        return diffrax.BrownianIncrement
    if issubclass(diffrax.SpaceTimeLevyArea, needed):
        return diffrax.SpaceTimeLevyArea
    return diffrax.SpaceTimeTimeLevyArea


def _check_features(features, mlp, d):
    if features is None and mlp is None:
        raise ValueError("give noise features: `features` (attention), `mlp`, or both")
    if features is not None:
        if not isinstance(features, AttentionParams):
            raise TypeError(
                f"`features` must be an AttentionParams or None, got {type(features).__name__}"
            )
        if features.Q.ndim != 3:
            raise ValueError(
                f"`features` must have leaves (M, d, k) (M draws from nu_0), got {features.Q.shape}"
            )
        if features.dim != d:
            raise ValueError(f"`features` has d={features.dim} but `measure` has d={d}")
        check_sizes(**{"features:M features": features.heads})
    if mlp is not None:
        if not isinstance(mlp, MLPParams):
            raise TypeError(f"`mlp` must be an MLPParams or None, got {type(mlp).__name__}")
        if mlp.W1.ndim != 3:
            raise ValueError(
                f"`mlp` must have leaves (M', d, m) (M' noise features), got W1 {mlp.W1.shape}"
            )
        if mlp.dim != d:
            raise ValueError(f"`mlp` has d={mlp.dim} but `measure` has d={d}")
        check_sizes(**{"mlp:M' features": mlp.W1.shape[0]})


def _build(features, measure, beta, heads, mlp, activation, drift, kernel, test_positions):
    if not isinstance(measure, EmpiricalMeasure) or measure.points.ndim != 2:
        raise TypeError("`measure` must be an EmpiricalMeasure with (n, d) points")
    _check_features(features, mlp, measure.dim)
    resolve_activation(activation)
    if is_concrete(heads) and not float(heads) > 0:
        raise ValueError(f"`heads` must be positive, got {heads}")
    dtypes = [measure.points.dtype]
    dtypes += [] if features is None else [features.dtype]
    dtypes += [] if mlp is None else [mlp.dtype]
    dtype = jnp.result_type(*dtypes)
    beta = check_beta_in(beta, dtype)
    if isinstance(drift, AttentionParams):
        drift = ParamPath(drift)
    features, mlp, drift = check_finite_args(features=features, mlp=mlp, drift=drift)
    measure = eqx.tree_at(
        lambda m: (m.points, m.weights),
        measure,
        (measure.points.astype(dtype), measure.weights.astype(dtype)),
    )
    field = AttentionField(beta, kernel)
    drift_vf = None
    if drift is not None:
        if not isinstance(drift, ParamPath):
            raise TypeError(
                f"`drift` must be a ParamPath, an AttentionParams grid or None, got "
                f"{type(drift).__name__}"
            )
        if drift.params.dim != measure.dim:
            raise ValueError(f"`drift` has d={drift.params.dim} but `measure` has d={measure.dim}")
        drift_vf = AttentionVectorField(field, drift, measure, test_positions)
    sde = _CommonNoise(field, measure, features, heads, mlp, drift_vf, activation, test_positions)
    return sde, dtype


@eqx.filter_jit
def solve_sde(
    features: AttentionParams | None,
    measure: EmpiricalMeasure,
    beta: BetaLike,
    key: PRNGKeyArray,
    *,
    heads: ScalarLike = 1,
    mlp: MLPParams | None = None,
    activation: Activation = "tanh",
    drift: ParamPath | AttentionParams | None = None,
    test_points: Float[Array, "m d"] | None = None,
    test_positions=None,
    t1: ScalarLike = 1.0,
    dt0: ScalarLike = 1.0 / 64,
    solver: diffrax.AbstractSolver = diffrax.Euler(),
    ts: Float[Array, " S"] | None = None,
    tangent: Float[Array, "n d"] | None = None,
    brownian_tol: ScalarLike | None = None,
    max_steps: int | None = None,
    kernel: AbstractAttentionKernel | None = None,
    saveat: diffrax.SaveAt | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    throw: bool = True,
    progress_meter: diffrax.AbstractProgressMeter | None = None,
) -> SDESolution:
    """Solve the common-noise SDE of the stochastic transformer limit
    (docs/theory.md, section 9),

        dX_i = b(X_i, mu_t) dt + Sigma(X_i, mu_t) dW_t,
        Sigma dW = M^{-1/2} sum_m H^{-1/2} G(x, mu_t; theta_m) dB^m
                   + M'^{-1/2} sum_m F(x; phi_m) dB'^m,

    one Brownian motion per feature, shared by every token (common noise), in
    the Itô sense, on `t in [0, t1]`. `Sigma(x) Sigma(y)^T` is an unbiased
    estimate of the covariance `C(x, y; mu)` of one layer of the `1/sqrt(L)`
    transformer when the features are draws from its parameter laws (see
    [`mfattn.noise_covariance`][]). `b = Gamma(x, mu; nu_bar_t)` when a `drift`
    path is given, else `0`.

    Itô solvers (`diffrax.Euler()`, Euler-Maruyama, the default) integrate
    the equation as is; Stratonovich solvers (`diffrax.Heun()`,
    `diffrax.SPaRK()`, ...) integrate the equivalent Stratonovich equation,
    whose drift is `b - (1/2) sum_k D sigma_k[sigma_k]` (computed by
    forward-mode autodiff), so that every solver converges to the same Itô
    solution. The Brownian motion is a `diffrax.VirtualBrownianTree` on
    `[0, t1]` built from `key`: the same key gives the same path at every
    `dt0` (strong convergence), and `jax.vmap` over keys gives independent paths.

    **Arguments:**

    - `features`: `M` attention heads spanning the noise, an
      [`mfattn.AttentionParams`][] with leaves `(M, d, k)` (e.g. draws from
      `nu_0`), or `None` for no attention noise.
    - `measure`: the initial tokens, an [`mfattn.EmpiricalMeasure`][].
    - `beta`: inverse temperature.
    - `key`: the key of the Brownian path.
    - `heads`: the `H` of the `1/H` in the attention covariance (noise variance
      `1/H`).
    - `mlp`: `M'` MLP noise features, an [`mfattn.MLPParams`][] with leaves
      `(M', d, m)`, `(M', m)`, `(M', m, d)`, or `None`.
    - `activation`: the MLP's activation (a name or an elementwise callable).
    - `drift`: a deterministic mean-field part, a [`mfattn.ParamPath`][] (or
      an `AttentionParams` grid `(J+1, P, d, k)`, piecewise linear on
      `[0, 1]`; for `t1 > 1` the last node is held).
    - `test_points`, `test_positions`: test particles `(m, d)` moved by the
      same drift and noise without acting on the measure.
    - `t1`, `dt0`: final time and (constant) step.
    - `solver`: a Diffrax SDE solver. `stepsize_controller` (default
      `diffrax.ConstantStepSize()` with `dt0`), `throw`, `progress_meter`:
      Diffrax's options with Diffrax's meaning; `saveat` (a `diffrax.SaveAt`
      with `ts`, `t0`, `t1`) is the same as `ts` (give one of them).
    - `ts`: save times in `[0, t1]` (default `[0, t1]`). With `tangent`, they
      are also the renormalisation times and must start at `0`.
    - `tangent`: an initial tangent `dX_0 (n, d)`: the linearised flow of the
      tokens is propagated along the path (renormalised at every `ts`), and
      `log_tangent` is returned.
    - `brownian_tol`: the tree's resolution (default `t1 / 2^14`, fixed
      whatever `dt0`, so that paths agree across step sizes).
    - `max_steps`: static bound on the number of steps (default: from `dt0`,
      which must then be concrete).
    - `kernel`: the attention backend (default [`mfattn.DenseKernel`][]`()`).

    **Returns:** an [`mfattn.SDESolution`][].

    **Raises:** `ValueError`/`TypeError` for missing noise features or
    mismatched shapes, no features (`M = 0`), a `solver` that is not a Diffrax
    solver, a non-positive `dt0`, `max_steps` or `brownian_tol`; a NaN or inf
    in `features`, `mlp`, `drift`, `test_points` or `tangent`, or a zero
    `tangent`, raise naming the argument (a `ValueError` for concrete values,
    `equinox.EquinoxRuntimeError` inside `jit`).
    """
    if not isinstance(solver, diffrax.AbstractSolver):
        raise TypeError(f"`solver` must be a diffrax solver, got {type(solver).__name__}")
    dt0 = opts.check_dt0(dt0)
    max_steps = opts.check_max_steps(max_steps)
    sde, dtype = _build(
        features, measure, beta, heads, mlp, activation, drift, kernel, test_positions
    )
    n, d = measure.points.shape
    X0 = sde.measure.points
    Z0 = jnp.zeros((0, d), dtype)
    if test_points is not None:
        Z0 = as_float_array(test_points, "test_points", ndim=2).astype(dtype)
        if Z0.shape[1] != d:
            raise ValueError(f"`test_points` has dimension {Z0.shape[1]}, expected d={d}")
        Z0 = check_finite_args(test_points=Z0)
    N = n + Z0.shape[0]
    Y0 = jnp.concatenate([X0, Z0], axis=0)
    if saveat is not None:
        if ts is not None:
            raise TypeError("pass `saveat` or `ts`, not both")
        ts = opts.save_times(saveat, None, 0.0, t1, dtype=dtype)
    if ts is None:
        ts = jnp.stack([jnp.zeros((), dtype), jnp.asarray(t1, dtype)])
    ts = as_float_array(ts, "ts", ndim=1).astype(dtype)
    if stepsize_controller is None:
        stepsize_controller = diffrax.ConstantStepSize()
    if progress_meter is None:
        progress_meter = diffrax.NoProgressMeter()
    if max_steps is None:
        if not (is_concrete(dt0) and is_concrete(t1)):
            raise ValueError("pass a static `max_steps` when `dt0` or `t1` is traced")
        max_steps = int(math.ceil(float(t1) / float(dt0) * (1 + 1e-9))) + 2
    if brownian_tol is None:
        tol = jnp.asarray(t1, dtype) / 2**14
    else:
        tol = check_positive(brownian_tol, "brownian_tol")
    K = sum(_num_features(f) for f in (features, mlp) if f is not None)
    shape = jax.ShapeDtypeStruct((K,), dtype)
    bm = diffrax.VirtualBrownianTree(0.0, t1, tol, shape, key, levy_area=_levy_area(solver))
    families = sde.families()
    drift_fn = sde.drift
    if tangent is not None:
        tangent = as_float_array(tangent, "tangent", ndim=2).astype(dtype)
        if tangent.shape != (n, d):
            raise ValueError(f"`tangent` must have shape {(n, d)}, got {tangent.shape}")
        tangent = check_finite_args(tangent=tangent)
        tangent = check_nonzero(
            tangent, "tangent", "the linearised flow of a zero tangent has no growth rate"
        )
        families = [(_tangent(fn, n, N), feats, scale) for fn, feats, scale in families]
        drift_fn = _tangent(sde.drift, n, N)
    stratonovich = isinstance(solver, diffrax.AbstractStratonovichSolver)

    def drift_term(t, Y, args):
        b = drift_fn(t, Y)
        return b - _ito_correction(families, t, Y) if stratonovich else b

    terms = diffrax.MultiTerm(
        diffrax.ODETerm(drift_term),
        diffrax.ControlTerm(lambda t, Y, args: _diffusion(families, t, Y), bm),
    )

    def solve(t_start, t_end, Y, saveat):
        return diffrax.diffeqsolve(
            terms,
            solver,
            t_start,
            t_end,
            dt0,
            Y,
            saveat=saveat,
            stepsize_controller=stepsize_controller,
            max_steps=max_steps,
            throw=throw,
            progress_meter=progress_meter,
        )

    if tangent is None:
        sol = solve(0.0, t1, Y0, diffrax.SaveAt(ts=ts))
        Ys = sol.ys
        return SDESolution(
            ts=ts,
            xs=Ys[:, :n],
            test_xs=None if test_points is None else Ys[:, n:],
            stats=sol.stats,
        )

    ts = eqx.error_if(ts, ts[0] != 0, "with `tangent`, `ts` must start at 0")
    norm0 = jnp.linalg.norm(tangent)

    def segment(carry, t_pair):
        Y, log_norm = carry
        sol = solve(t_pair[0], t_pair[1], Y, diffrax.SaveAt(t1=True))
        Y1 = sol.ys[-1]
        r = jnp.linalg.norm(Y1[N:])
        Y1 = Y1.at[N:].divide(r)
        log_norm = log_norm + jnp.log(r)
        return (Y1, log_norm), (Y1[:N], log_norm)

    Ya0 = jnp.concatenate([Y0, tangent / norm0], axis=0)
    pairs = jnp.stack([ts[:-1], ts[1:]], axis=-1)
    _, (Ys, logs) = lax.scan(segment, (Ya0, jnp.zeros((), dtype)), pairs)
    Ys = jnp.concatenate([Y0[None], Ys], axis=0)
    logs = jnp.concatenate([jnp.zeros((1,), dtype), logs])
    return SDESolution(
        ts=ts,
        xs=Ys[:, :n],
        test_xs=None if test_points is None else Ys[:, n:],
        log_tangent=logs,
    )


def _num_features(f) -> int:
    """Number of features (leading axis) of an `AttentionParams` or `MLPParams`."""
    return jax.tree.leaves(f)[0].shape[0]


@eqx.filter_jit
def noise_covariance(
    features: AttentionParams | None,
    measure: EmpiricalMeasure,
    beta: BetaLike,
    x: Float[Array, "*p d"],
    y: Float[Array, "*q d"] | None = None,
    *,
    heads: ScalarLike = 1,
    mlp: MLPParams | None = None,
    activation: Activation = "tanh",
    kernel: AbstractAttentionKernel | None = None,
) -> Float[Array, "*pq d d"]:
    """The covariance of the noise of [`mfattn.solve_sde`][] between points
    `x` and `y` (docs/theory.md, section 9),

        Sigma(x) Sigma(y)^T = (1/M) sum_m H^{-1} G(x, mu; theta_m) G(y, mu; theta_m)^T
                              + (1/M') sum_m F(x; phi_m) F(y; phi_m)^T.

    With features drawn i.i.d. from the laws of one layer's parameters
    (`theta ~ nu_0`, `phi` from [`mfattn.MLPParams.init`][]), it is an unbiased
    estimate of the layer covariance `C(x, y; mu)` of the `1/sqrt(L)`
    transformer, and tends to it as `M, M'` grow.

    **Arguments:** `features`, `measure`, `beta`, `heads`, `mlp`, `activation`
    as in `solve_sde`; points `x (..., d)` and `y (..., d)` (default `x`).

    **Returns:** `(*x.shape[:-1], *y.shape[:-1], d, d)`: the covariance between
    every `x` and every `y`.
    """
    sde, dtype = _build(features, measure, beta, heads, mlp, activation, None, kernel, None)
    d = measure.dim
    x = as_float_array(x, "x").astype(dtype)
    y = x if y is None else as_float_array(y, "y").astype(dtype)
    x, y = check_finite_args(x=x, y=y)
    for name, a in (("x", x), ("y", y)):
        if a.shape[-1:] != (d,):
            raise ValueError(f"`{name}` must end with d={d}, got shape {a.shape}")
    px, py = x.shape[:-1], y.shape[:-1]
    pts = jnp.concatenate([x.reshape(-1, d), y.reshape(-1, d)], axis=0)
    n = measure.num_points
    Y = jnp.concatenate([sde.measure.points, pts], axis=0)
    S = _diffusion(sde.families(), 0.0, Y)[n:]
    Sx, Sy = S[: math.prod(px)], S[math.prod(px) :]
    C = jnp.einsum("pak,qbk->pqab", Sx, Sy)
    return C.reshape(px + py + (d, d))


__all__ = ["SDESolution", "solve_sde", "noise_covariance"]
