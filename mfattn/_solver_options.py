"""The Diffrax options of every ODE/SDE solver of mfattn, and their defaults,
in one place (the table is `docs/conventions.md`).

Every solver that integrates with Diffrax (`solve_limit`, `limit_gradient`,
probes of the limit, `attention_flow`, `gradient_flow`, `solve_sde`) takes the
same keywords with Diffrax's meaning: `solver`, `stepsize_controller`, `dt0`,
`saveat`, `max_steps`, `throw`, `progress_meter` (and `rtol`, `atol` as
shortcuts for the default controller, never together with a controller).
"""

import diffrax
import jax.numpy as jnp
import numpy as np

# the defaults, shared: Tsit5 with a PID controller at these tolerances
RTOL = 1e-6
ATOL = 1e-8
MAX_STEPS = 4096
# the token flow runs over horizons far beyond depth 1 (clusters merge on
# time scales exponential in beta): tighter tolerances and more steps
FLOW_RTOL = 1e-8
FLOW_ATOL = 1e-10
FLOW_MAX_STEPS = 100_000


def default_solver():
    return diffrax.Tsit5()


def check_max_steps(max_steps):
    if max_steps is None:
        return None
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ValueError(f"`max_steps` must be a positive int or None, got {max_steps!r}")
    return int(max_steps)


def check_dt0(dt0):
    if dt0 is None:
        return None
    if isinstance(dt0, (int, float, np.floating, np.integer)) and not isinstance(dt0, bool):
        if not np.isfinite(dt0) or dt0 <= 0:
            raise ValueError(f"`dt0` must be a positive finite step, got {dt0!r}")
    return dt0


def check_tolerance(tol, name):
    """`rtol`/`atol`: `None` or a non-negative finite number (a NaN tolerance
    would make every step fail until `max_steps`)."""
    if tol is None:
        return None
    if isinstance(tol, (int, float, np.floating, np.integer)) and not isinstance(tol, bool):
        if not np.isfinite(tol) or tol < 0:
            raise ValueError(f"`{name}` must be a non-negative finite number, got {tol!r}")
    return tol


def controller(
    solver, rtol=None, atol=None, stepsize_controller=None, dt0=None, jumps=None, default_tols=None
):
    """The step-size controller: the user's, or Diffrax's PID controller at
    `rtol`/`atol` (clipped to step onto `jumps`, where a parameter path has
    kinks or jumps) for an adaptive solver, or constant steps of `dt0` for a
    fixed-step one (`solver=diffrax.Euler()`)."""
    if not isinstance(solver, diffrax.AbstractSolver):
        raise TypeError(f"`solver` must be a diffrax solver, got {type(solver).__name__}")
    check_dt0(dt0)
    check_tolerance(rtol, "rtol")
    check_tolerance(atol, "atol")
    if stepsize_controller is not None:
        if rtol is not None or atol is not None:
            raise ValueError("pass `rtol`/`atol` or `stepsize_controller`, not both")
        if not isinstance(stepsize_controller, diffrax.AbstractStepSizeController):
            raise TypeError(
                "`stepsize_controller` must be a diffrax step-size controller, got "
                f"{type(stepsize_controller).__name__}"
            )
        if isinstance(stepsize_controller, diffrax.ConstantStepSize) and dt0 is None:
            raise ValueError("`stepsize_controller=diffrax.ConstantStepSize()` needs `dt0`")
        return stepsize_controller
    if not isinstance(solver, diffrax.AbstractAdaptiveSolver):
        if rtol is not None or atol is not None:
            raise ValueError(
                f"{type(solver).__name__} is a fixed-step solver: it takes `dt0`, not `rtol`/`atol`"
            )
        if dt0 is None:
            raise ValueError(
                f"{type(solver).__name__} is a fixed-step solver: pass `dt0` (for example "
                "`dt0=1/L` for the Euler steps of the L-layer model)"
            )
        return diffrax.ConstantStepSize()
    r0, a0 = (RTOL, ATOL) if default_tols is None else default_tols
    pid = diffrax.PIDController(
        rtol=r0 if rtol is None else rtol, atol=a0 if atol is None else atol
    )
    if jumps is None or jumps.shape[0] == 0:
        return pid
    return diffrax.ClipStepSizeController(pid, jump_ts=jumps)


def save_times(saveat, default, t0=0.0, t1=1.0, dtype=None):
    """The times at which a solver that keeps a dense solution reports states:
    `saveat` a `diffrax.SaveAt` (`ts`, `t0`, `t1`; not `steps` nor `fn`) or
    `None` (the solver's `default`)."""
    if saveat is None:
        return default
    if not isinstance(saveat, diffrax.SaveAt):
        raise TypeError(f"`saveat` must be a diffrax.SaveAt, got {type(saveat).__name__}")
    sub = saveat.subs
    if not isinstance(sub, diffrax.SubSaveAt) or sub.steps or sub.fn.__name__ != "save_y":
        raise ValueError("`saveat` may set `ts`, `t0` and `t1` only (not `steps`, `fn` or `subs`)")
    dtype = default.dtype if dtype is None else dtype
    parts = []
    if sub.t0:
        parts.append(jnp.full((1,), t0, dtype))
    if sub.ts is not None:
        ts = jnp.asarray(sub.ts, dtype)
        if ts.ndim != 1:
            raise ValueError(f"`saveat.ts` must be 1-D, got shape {ts.shape}")
        parts.append(ts)
    if sub.t1:
        parts.append(jnp.full((1,), t1, dtype))
    if not parts:
        raise ValueError("`saveat` saves nothing: set `ts`, `t0` or `t1`")
    return jnp.concatenate(parts)
