"""The continuous (large-depth, large-width) limit: forward and adjoint
McKean-Vlasov ODEs integrated with Diffrax (docs/theory.md, section 6).

One forward/adjoint pair (`LimitProblem`) serves the limit's solve, its exact
gradient and the probes of [`mfattn.probe_gradient`][].
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from . import _solver_options as opts
from ._adjoint import AbstractLimitAdjoint, ClosedFormAdjoint, as_limit_adjoint
from ._checks import check_beta_in, check_nonzero_rows, check_solve
from ._custom_types import BetaLike, ScalarLike
from ._discrete import check_model_inputs
from ._field import AttentionField
from ._geometry import AbstractGeometry, as_geometry, is_sphere
from ._interpolation import AbstractInterpolation
from ._kernels import AbstractAttentionKernel
from ._loss import AbstractLoss
from ._measure import EmpiricalMeasure
from ._params import AttentionParams
from ._path import ParamPath
from ._renamed import renamed_kwargs
from ._solution import Solution
from ._vector_field import AdjointVectorField, AttentionVectorField

_DENSE_ADJOINTS = (diffrax.RecursiveCheckpointAdjoint, diffrax.DirectAdjoint)
# the checkpointed adjoint's default cap on the steps of one segment's forward
# solve: its dense output holds this many steps, whatever `max_steps` is
SEGMENT_MAX_STEPS = 64


def check_checkpoints(checkpoints, segment_max_steps):
    """`checkpoints` (`None` or a positive int) and `segment_max_steps` (a
    positive int), checked at trace time."""
    for name, value, none_ok in (
        ("checkpoints", checkpoints, True),
        ("segment_max_steps", segment_max_steps, False),
    ):
        if value is None and none_ok:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            allowed = "a positive int or None" if none_ok else "a positive int"
            raise ValueError(f"`{name}` must be {allowed}, got {value!r}")
    return (None if checkpoints is None else int(checkpoints)), int(segment_max_steps)


class _Checked(eqx.Module):
    """A value and the `diffrax.RESULTS` of the solves that made it (what
    `check_solve` reads)."""

    value: object
    result: diffrax.RESULTS


def as_path(params, times=None, interpolation=None, name="params") -> ParamPath:
    """Accept an [`mfattn.ParamPath`][] or an `AttentionParams` grid."""
    if isinstance(params, ParamPath):
        if times is not None:
            raise ValueError("pass `times` to the ParamPath, not to the solver")
        return params
    if isinstance(params, AttentionParams):
        if params.Q.ndim != 4:
            raise ValueError(
                f"`{name}` must have leaves (J+1, M, d, k) on a depth grid, got {params.Q.shape}"
            )
        return ParamPath(params, times, interpolation)
    raise TypeError(
        f"`{name}` must be an AttentionParams or a ParamPath, got {type(params).__name__}"
    )


def finite(tree, what):
    """`eqx.error_if` on non-finite values of a solve's states (the result is used)."""
    bad = jnp.array(False)
    for leaf in jax.tree.leaves(tree):
        bad = bad | ~jnp.all(jnp.isfinite(leaf))
    return eqx.error_if(tree, bad, f"{what} produced non-finite values")


class LimitProblem(eqx.Module):
    """One instance of the limit: the vector field, the loss (or `None`),
    extra particles, and how to integrate (private; built by
    [`limit_problem`][])."""

    vf: AttentionVectorField
    loss: AbstractLoss | None
    test_points: Float[Array, "m d"]
    test_labels: Array | None
    solver: diffrax.AbstractSolver
    controller: diffrax.AbstractStepSizeController
    dt0: ScalarLike | None
    max_steps: int | None = eqx.field(static=True)
    throw: bool = eqx.field(static=True)
    progress_meter: diffrax.AbstractProgressMeter

    @property
    def path(self) -> ParamPath:
        return self.vf.path

    @property
    def measure(self) -> EmpiricalMeasure:
        return self.vf.measure

    def _check(self, sol, name):
        return check_solve(sol, name) if self.throw else sol

    def forward(self, saveat, adjoint=diffrax.RecursiveCheckpointAdjoint(), name=None):
        """The forward McKean-Vlasov ODE from `t = 0` to `1`; with a `name`, a
        failed solve (e.g. `max_steps` reached) raises an error naming it."""
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(self.vf),
            self.solver,
            0.0,
            1.0,
            self.dt0,
            (self.measure.points, self.test_points),
            saveat=saveat,
            stepsize_controller=self.controller,
            adjoint=adjoint,
            max_steps=self.max_steps,
            throw=name is None and self.throw,
            progress_meter=self.progress_meter,
        )
        return sol if name is None else self._check(sol, name)

    def terminal(self, X1, Z1):
        """`Loss(mu_1)` and the terminal adjoints of the tokens and test particles
        (their tangent parts)."""
        tangent = self.vf.geometry.tangent
        terminal = self.measure.with_points(X1)
        value = self.loss(terminal)
        P1 = self.loss.lions_derivative(terminal).astype(X1.dtype)
        if self.test_points.shape[0] == 0:
            PZ1 = jnp.zeros_like(self.test_points)
        else:
            PZ1 = self.loss.lions_derivative(terminal, Z1, self.test_labels).astype(X1.dtype)
        return value, tangent(X1, P1), tangent(Z1, PZ1)

    def backward(self, fwd, P1, PZ1, integrate_gradient=False, name="the adjoint solve"):
        """The closed-form adjoint ODE from `t = 1` to `0` (dense output), or
        with `integrate_gradient` the node gradients accumulated as extra states."""
        y1 = (P1, PZ1)
        if integrate_gradient:
            y1 = y1 + (jax.tree.map(jnp.zeros_like, self.path.params),)
        dt0 = None if self.dt0 is None else -self.dt0
        controller = self.controller
        if isinstance(controller, diffrax.StepTo):  # the same steps, backwards
            controller = diffrax.StepTo(ts=jnp.flip(jnp.asarray(controller.ts)))
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(AdjointVectorField(self.vf, fwd)),
            self.solver,
            1.0,
            0.0,
            dt0,
            y1,
            # the gradient accumulators are only needed at t = 0: no dense output
            saveat=diffrax.SaveAt(t1=True, dense=not integrate_gradient),
            stepsize_controller=controller,
            max_steps=self.max_steps,
            throw=False,
            progress_meter=self.progress_meter,
        )
        return self._check(sol, name)

    def checkpoint_times(self, checkpoints):
        """`checkpoints + 1` equally spaced times from `0` to `1`: the ends of
        the checkpointed adjoint's segments."""
        return jnp.linspace(0.0, 1.0, checkpoints + 1, dtype=self.path.times.dtype)

    def backward_segments(
        self,
        ts,
        Xs,
        Zs,
        P1,
        PZ1,
        segment_max_steps,
        *,
        integrate_gradient=False,
        query=None,
        name="the adjoint solve",
    ):
        """The closed-form adjoint ODE from `t = 1` to `0`, one segment
        `[ts[c], ts[c + 1]]` at a time, the last first (a `lax.scan`): on each,
        the forward ODE is solved again from its checkpoint `(Xs[c], Zs[c])`
        with dense output of at most `segment_max_steps` steps, and the adjoint
        ODE across the segment reads `x(t)` from it. The memory is that of the
        checkpoints and of one segment's dense output, whatever `max_steps`.

        **Returns:** `(y0, at_query, result, steps)`: the adjoint states at
        `t = 0` (with the gradient integrals as a third state when
        `integrate_gradient`), `(X, Z, P, PZ)` at the times `query` (or `None`),
        the worst `diffrax.RESULTS` of the solves (checked when `throw`), and
        the adjoint solves' accepted steps.
        """
        if isinstance(self.controller, diffrax.StepTo):
            raise ValueError(
                "`checkpoints` needs an adaptive or a constant step size; with "
                "`stepsize_controller=diffrax.StepTo(...)` leave `checkpoints=None`"
            )
        y1 = (P1, PZ1)
        if integrate_gradient:
            y1 = y1 + (jax.tree.map(jnp.zeros_like, self.path.params),)
        dt0 = None if self.dt0 is None else -self.dt0
        n_seg = ts.shape[0] - 1
        if query is not None:  # the backward solves save at decreasing times
            order = jnp.argsort(-query, stable=True)
            qs = query[order]
            q_seg = jnp.clip(jnp.searchsorted(ts, qs, side="right") - 1, 0, n_seg - 1)
            nq = qs.shape[0]
            acc = (
                jnp.zeros((nq,) + Xs.shape[1:], Xs.dtype),
                jnp.zeros((nq,) + Zs.shape[1:], Zs.dtype),
                jnp.zeros((nq,) + P1.shape, P1.dtype),
                jnp.zeros((nq,) + PZ1.shape, PZ1.dtype),
            )
        else:
            acc = None

        def segment(carry, xs):
            y, acc, fres, bres, steps = carry
            c, a, b, Xa, Za = xs
            fwd = diffrax.diffeqsolve(
                diffrax.ODETerm(self.vf),
                self.solver,
                a,
                b,
                self.dt0,
                (Xa, Za),
                saveat=diffrax.SaveAt(t1=True, dense=True),
                stepsize_controller=self.controller,
                max_steps=segment_max_steps,
                throw=False,
            )
            if query is None:
                saveat = diffrax.SaveAt(t1=True)
            else:
                tq = jnp.clip(qs, a, b)
                saveat = diffrax.SaveAt(ts=tq, t1=True)
            bwd = diffrax.diffeqsolve(
                diffrax.ODETerm(AdjointVectorField(self.vf, fwd)),
                self.solver,
                b,
                a,
                dt0,
                y,
                saveat=saveat,
                stepsize_controller=self.controller,
                max_steps=self.max_steps,
                throw=False,
            )
            if query is not None:
                inside = q_seg == c
                new = jax.vmap(fwd.evaluate)(tq) + (bwd.ys[0][:-1], bwd.ys[1][:-1])
                acc = jax.tree.map(
                    lambda n, o: jnp.where(inside.reshape((-1,) + (1,) * (n.ndim - 1)), n, o),
                    new,
                    acc,
                )
            y = jax.tree.map(lambda s: s[-1], bwd.ys)
            fres, bres = _worst(fres, fwd.result), _worst(bres, bwd.result)
            steps = steps + bwd.stats["num_accepted_steps"].astype(steps.dtype)
            return (y, acc, fres, bres, steps), None

        ok = diffrax.RESULTS.successful
        init = (y1, acc, ok, ok, jnp.asarray(0))
        segs = (jnp.arange(n_seg), ts[:-1], ts[1:], Xs[:-1], Zs[:-1])
        (y0, acc, fres, bres, steps), _ = jax.lax.scan(segment, init, segs, reverse=True)
        if acc is not None:
            back = jnp.argsort(order)
            acc = jax.tree.map(lambda a: a[back], acc)
        if self.throw:
            out = _Checked((y0, acc), fres)
            out = check_solve(
                out,
                f"{name} (a segment's forward solve, capped at segment_max_steps="
                f"{segment_max_steps} steps: raise it or `checkpoints`)",
            )
            y0, acc = check_solve(eqx.tree_at(lambda c: c.result, out, bres), name).value
        return y0, acc, _worst(fres, bres), steps

    def grad_map(self, t, layer, X, Z, P, PZ):
        """The gradient map `g(theta, t)` of the heads `layer` (leaves
        `(M, d, k)`) at the states `X`, `Z` and adjoints `P`, `PZ` at time `t`
        (extra particles enter when they are probes)."""
        P = self.vf.geometry.tangent(X, P)
        if not self.vf.probes:
            Z = PZ = None
        return self.vf.adjoint(t, X, Z, P, PZ, layer=(layer, None))[2]

    def node_grads(self, fwd, bwd, ts=None):
        """The gradient map at the grid nodes (or at `ts`), from the forward and
        adjoint dense solutions (extra particles enter when they are probes)."""

        def grad_at(t, layer):
            return self.grad_map(t, layer, *fwd.evaluate(t), *bwd.evaluate(t))

        if ts is None:
            return jax.vmap(grad_at)(self.path.times, self.path.params)
        return jax.vmap(lambda t: grad_at(t, self.path(t)))(ts)


def limit_problem(
    params,
    measure,
    loss,
    beta,
    *,
    test_points=None,
    test_labels=None,
    test_positions=None,
    times=None,
    interpolation=None,
    solver=None,
    rtol=None,
    atol=None,
    stepsize_controller=None,
    dt0=None,
    max_steps=opts.MAX_STEPS,
    throw=True,
    progress_meter=None,
    kernel=None,
    chunk_size=None,
    mesh=None,
    geometry=None,
    probes=False,
    field=None,
) -> LimitProblem:
    """Check the inputs and build the [`LimitProblem`][] (private)."""
    solver = opts.default_solver() if solver is None else solver
    path = as_path(params, times, interpolation)
    checked, test_points, test_labels = check_model_inputs(
        path.params, measure, loss, test_points, test_labels
    )
    path = eqx.tree_at(lambda p: p.params, path, checked)
    geometry = as_geometry(geometry)
    dtype = jnp.result_type(measure.points.dtype, path.params.dtype)
    measure = eqx.tree_at(
        lambda m: (m.points, m.weights),
        measure,
        (measure.points.astype(dtype), measure.weights.astype(dtype)),
    )
    d = measure.dim
    Z0 = jnp.zeros((0, d), dtype) if test_points is None else test_points.astype(dtype)
    beta = check_beta_in(beta, dtype)
    if is_sphere(geometry):
        why = "it cannot be mapped to the unit sphere (`geometry=mfattn.Sphere()`)"
        measure = measure.with_points(check_nonzero_rows(measure.points, "measure.points", why))
        Z0 = check_nonzero_rows(Z0, "test_points", why)
    measure = measure.with_points(geometry.initial(measure.points))
    Z0 = geometry.initial(Z0) if Z0.shape[0] else Z0
    if field is None:
        field = AttentionField(beta, kernel, mesh, chunk_size=chunk_size)
    vf = AttentionVectorField(field, path, measure, test_positions, geometry, probes=probes)
    controller = opts.controller(
        solver, rtol, atol, stepsize_controller, dt0, jumps=path.breakpoints()
    )
    if progress_meter is None:
        progress_meter = diffrax.NoProgressMeter()
    return LimitProblem(
        vf,
        loss,
        Z0,
        test_labels,
        solver,
        controller,
        dt0,
        opts.check_max_steps(max_steps),
        bool(throw),
        progress_meter,
    )


_RENAMED = dict(params_grid="params")


def _ts_to_saveat(ts, saveat):
    if ts is None:
        return saveat
    if saveat is not None:
        raise TypeError("pass `saveat` only (`ts=` is its old spelling)")
    import warnings

    warnings.warn(
        "`ts=` is deprecated; use `saveat=diffrax.SaveAt(ts=...)`", DeprecationWarning, stacklevel=3
    )
    return diffrax.SaveAt(ts=ts)


@renamed_kwargs(**_RENAMED)
@eqx.filter_jit
def solve_limit(
    params: AttentionParams | ParamPath,
    measure: EmpiricalMeasure,
    loss: AbstractLoss,
    beta: BetaLike,
    test_points: Float[ArrayLike, "m d"] | None = None,
    *,
    saveat: diffrax.SaveAt | None = None,
    ts=None,
    test_labels: Array | None = None,
    test_positions=None,
    times=None,
    interpolation: AbstractInterpolation | str | None = None,
    solver: diffrax.AbstractSolver | None = None,
    rtol: ScalarLike | None = None,
    atol: ScalarLike | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    dt0: ScalarLike | None = None,
    max_steps: int | None = opts.MAX_STEPS,
    throw: bool = True,
    progress_meter: diffrax.AbstractProgressMeter | None = None,
    adjoint: diffrax.AbstractAdjoint = diffrax.RecursiveCheckpointAdjoint(),
    kernel: AbstractAttentionKernel | None = None,
    chunk_size: int | None = None,
    mesh=None,
    geometry: AbstractGeometry | str | None = None,
    normalization: str | None = None,
    checkpoints: int | None = None,
    segment_max_steps: int = SEGMENT_MAX_STEPS,
) -> Solution:
    """Solve the mean-field limit: the forward McKean-Vlasov ODE, its closed-form
    adjoint ODE, and the gradient map at the depth-grid nodes (docs/theory.md,
    section 6).

        forward   dx_i/dt = Gamma(x_i, mu_t; nu_t),  x_i(0) = x_i^0,
        backward  dp_i/dt = -[grad_x Gamma(x_i)^T p_i + sum_j w_j d_mu Gamma(x_j)(x_i)^T p_j],
                  p_i(1) = d_mu Loss(mu_1)(x_i(1)),
        gradient  g(theta^m(t_j), t_j) = sum_i w_i grad_theta G(x_i(t_j); theta^m(t_j))^T p_i(t_j).

    Both ODEs are `diffrax.diffeqsolve` on the same [`mfattn.AttentionVectorField`][]
    that [`mfattn.solve_discrete`][] steps with explicit Euler (adaptive steps
    that land on the grid nodes, where the parameters have kinks or jumps); the
    backward solve reads `x(t)` from the forward solve's dense output. See
    [`mfattn.limit_gradient`][] for the exact gradient of the limit's loss.

    **Arguments:**

    - `params` (formerly `params_grid`): an [`mfattn.AttentionParams`][] with
      leaves `(J+1, M, d, k)` (parameter particles at the grid nodes) or an
      [`mfattn.ParamPath`][].
    - `measure`, `loss`, `beta`, `test_points`, `test_labels`, `test_positions`,
      `kernel`, `chunk_size`, `mesh`: as in [`mfattn.solve_discrete`][].
    - `saveat`: a `diffrax.SaveAt` with `ts` (and/or `t0`, `t1`): the times at
      which `xs`, `ps` are reported (default: the grid nodes, plus `t = 1` for
      constant interpolation, so that `xs` has `L + 1` states like the
      discrete model's). `ts=` is its deprecated spelling.
    - `times`, `interpolation`: the grid nodes, when `params` is an `AttentionParams`.
    - `solver`, `stepsize_controller`, `dt0`, `max_steps`, `throw`,
      `progress_meter`: Diffrax's options, with Diffrax's meaning, for both
      the forward and the adjoint solve (defaults in docs/conventions.md: Tsit5
      with a PID controller at `rtol=1e-6, atol=1e-8` that steps onto the
      grid nodes). `rtol`, `atol`: shortcuts for that controller (not with
      `stepsize_controller`). A fixed-step solver takes `dt0`:
      `solver=diffrax.Euler(), dt0=1/L` on the piecewise-constant path of `L`
      nodes is the discrete model (to rounding; exact node times need `L` a
      power of two, else pass `stepsize_controller=diffrax.StepTo(ts=...)`).
      With `throw=False` a failed solve returns its states as they are and its
      `diffrax.RESULTS` in `Solution.result` instead of raising.
    - `adjoint`: how Diffrax differentiates the *forward* solve if you
      differentiate through `solve_limit` (the returned `grads` never need
      it): any `diffrax.AbstractAdjoint`. `RecursiveCheckpointAdjoint` (the
      default) and `DirectAdjoint` differentiate the one dense solve; an
      adjoint without dense output (`BacksolveAdjoint`) differentiates `xs`
      and `loss` through a second forward solve that saves at the reported
      times, and `ps`, `grads` through the first.
    - `geometry`: [`mfattn.Euclidean`][]`()` (default) or
      [`mfattn.Sphere`][]`()` (formerly `normalization="sphere"`): the limit of the
      post-normalised transformer (docs/theory.md, section 10),

            forward   dx_i/dt = F(x_i, mu_t) = P_{x_i} Gamma(x_i, mu_t; nu_t),
                      P_x = I - x x^T / |x|^2,  x_i(0) = x_in,i / |x_in,i|,
            backward  the adjoint of F: dp_i/dt = -b_i with
                      b_i = [pullback of Gamma at the cotangents (P_{x_j} p_j)_j]_i
                            + c_x(x_i, Gamma(x_i), p_i),
                      p_i(1) = P_{x_i} d_mu Loss(mu_1)(x_i(1)),
            gradient  g at the cotangents P_{x_i} p_i,

      `c_x` the derivative of the projection itself. The exact flow keeps
      `|x_i| = 1`; the solver keeps it to its tolerance (`xs` are the solver's
      states, not re-projected). The saved adjoints `ps`, `test_ps` are the
      tangent parts `P_x p`, comparable with [`mfattn.solve_discrete`][]'s
      (the normal part depends on how `F` is extended off the sphere and
      enters no gradient).
    - `checkpoints`: `None` (default) to read `x(t)` in the adjoint solve from
      the forward solve's dense output, whose buffers Diffrax sizes by
      `max_steps` (memory `O(max_steps n d)`); or a number `C` of equal
      segments of `[0, 1]`: the forward solve keeps the states at their ends
      only, and the adjoint solve, segment by segment from the last, solves
      the forward again on the segment with dense output of at most
      `segment_max_steps` steps (memory `O((C + segment_max_steps) n d)`,
      whatever `max_steps`, for about twice the forward work; see
      [`mfattn.ClosedFormAdjoint`][]). Not with `diffrax.StepTo`.
    - `segment_max_steps`: the steps one segment's forward solve may take
      (default 64); a segment that needs more fails like a solve that
      reaches `max_steps`.

    **Returns:** a [`mfattn.Solution`][]; `grads` has the shape of the grid.

    **Raises:** a runtime error naming the solve when Diffrax fails (e.g. it
    reaches `max_steps`) or a state becomes non-finite.
    """
    saveat = _ts_to_saveat(ts, saveat)
    geometry = as_geometry(geometry, normalization)
    if loss is None:
        raise TypeError("`loss` must be an mfattn loss (AbstractLoss), got None")
    if not isinstance(adjoint, diffrax.AbstractAdjoint):
        raise TypeError(
            f"`adjoint` must be a diffrax adjoint (it differentiates the forward solve), got "
            f"{type(adjoint).__name__}; for the limit's gradient see mfattn.limit_gradient"
        )
    checkpoints, segment_max_steps = check_checkpoints(checkpoints, segment_max_steps)
    prob = limit_problem(
        params,
        measure,
        loss,
        beta,
        test_points=test_points,
        test_labels=test_labels,
        test_positions=test_positions,
        times=times,
        interpolation=interpolation,
        solver=solver,
        rtol=rtol,
        atol=atol,
        stepsize_controller=stepsize_controller,
        dt0=dt0,
        max_steps=max_steps,
        throw=throw,
        progress_meter=progress_meter,
        kernel=kernel,
        chunk_size=chunk_size,
        mesh=mesh,
        geometry=geometry,
    )
    path = prob.path
    nodes = path.times
    save = opts.save_times(saveat, path.save_times(), dtype=nodes.dtype)
    if checkpoints is not None:
        return _solve_checkpointed(
            prob, save, adjoint, checkpoints, segment_max_steps, test_points is not None
        )
    dense_adjoint = isinstance(adjoint, _DENSE_ADJOINTS)
    fname = "solve_limit's forward solve"
    fwd = prob.forward(
        diffrax.SaveAt(t1=True, dense=True),
        adjoint if dense_adjoint else diffrax.RecursiveCheckpointAdjoint(),
        fname,
    )
    X1, Z1 = fwd.ys[0][-1], fwd.ys[1][-1]
    if throw:
        X1, Z1 = finite((X1, Z1), fname)
    loss_value, P1, PZ1 = prob.terminal(X1, Z1)
    bwd = prob.backward(fwd, P1, PZ1, name="solve_limit's adjoint solve")
    xs, zs = jax.vmap(fwd.evaluate)(save)
    ps, pzs = jax.vmap(bwd.evaluate)(save)
    if throw:
        ps, pzs = finite((ps, pzs), "solve_limit's adjoint solve")
    tangent = prob.vf.geometry.tangent
    ps, pzs = tangent(xs, ps), tangent(zs, pzs)
    if not dense_adjoint:  # xs and loss differentiable through the user's adjoint
        sol = prob.forward(diffrax.SaveAt(ts=save, t1=True), adjoint, fname)
        xs, zs = sol.ys[0][:-1], sol.ys[1][:-1]
        loss_value = prob.loss(prob.measure.with_points(sol.ys[0][-1]))
    grads = prob.node_grads(fwd, bwd)
    has_test = test_points is not None
    return Solution(
        ts=save,
        xs=xs,
        ps=ps,
        grads=grads,
        loss=loss_value,
        test_xs=zs if has_test else None,
        test_ps=pzs if has_test else None,
        stats={
            "forward_steps": fwd.stats["num_accepted_steps"],
            "backward_steps": bwd.stats["num_accepted_steps"],
        },
        result=None if throw else _worst(fwd.result, bwd.result),
    )


def _solve_checkpointed(prob, save, adjoint, checkpoints, segment_max_steps, has_test):
    """`solve_limit` with the checkpointed adjoint: one forward solve saving at
    the reported times and the segments' ends (differentiable through the
    user's `adjoint`), then the adjoint segment by segment, collecting the
    states and adjoints at the reported times and at the grid nodes."""
    fname = "solve_limit's forward solve"
    path = prob.path
    ck = prob.checkpoint_times(checkpoints)
    times = jnp.concatenate([save, ck])
    order = jnp.argsort(times, stable=True)
    fwd = prob.forward(diffrax.SaveAt(ts=times[order]), adjoint, fname)
    ys = jax.tree.map(lambda a: a[jnp.argsort(order)], fwd.ys)
    ns = save.shape[0]
    xs, zs = ys[0][:ns], ys[1][:ns]
    Xc, Zc = ys[0][ns:], ys[1][ns:]
    X1, Z1 = Xc[-1], Zc[-1]
    if prob.throw:
        X1, Z1 = finite((X1, Z1), fname)
    loss_value, P1, PZ1 = prob.terminal(X1, Z1)
    query = jnp.concatenate([save, path.times])
    _, (qx, qz, qp, qpz), bres, bsteps = prob.backward_segments(
        ck, Xc, Zc, P1, PZ1, segment_max_steps, query=query, name="solve_limit's adjoint solve"
    )
    ps, pzs = qp[:ns], qpz[:ns]
    if prob.throw:
        ps, pzs = finite((ps, pzs), "solve_limit's adjoint solve")
    tangent = prob.vf.geometry.tangent
    ps, pzs = tangent(xs, ps), tangent(zs, pzs)
    grads = jax.vmap(prob.grad_map)(path.times, path.params, qx[ns:], qz[ns:], qp[ns:], qpz[ns:])
    return Solution(
        ts=save,
        xs=xs,
        ps=ps,
        grads=grads,
        loss=loss_value,
        test_xs=zs if has_test else None,
        test_ps=pzs if has_test else None,
        stats={
            "forward_steps": fwd.stats["num_accepted_steps"],
            "backward_steps": bsteps,
        },
        result=None if prob.throw else _worst(fwd.result, bres),
    )


def _worst(a, b):
    """The first failure of two solves' results (`successful` if none failed)."""
    return diffrax.RESULTS.where(diffrax.is_okay(a), b, a)


@renamed_kwargs(**_RENAMED)
@eqx.filter_jit
def limit_gradient(
    params: AttentionParams | ParamPath,
    measure: EmpiricalMeasure,
    loss: AbstractLoss,
    beta: BetaLike,
    *,
    adjoint: AbstractLimitAdjoint | diffrax.AbstractAdjoint | None = None,
    method=None,
    times=None,
    interpolation: AbstractInterpolation | str | None = None,
    solver: diffrax.AbstractSolver | None = None,
    rtol: ScalarLike | None = None,
    atol: ScalarLike | None = None,
    stepsize_controller=None,
    dt0: ScalarLike | None = None,
    max_steps: int | None = opts.MAX_STEPS,
    throw: bool = True,
    progress_meter: diffrax.AbstractProgressMeter | None = None,
    kernel: AbstractAttentionKernel | None = None,
    chunk_size: int | None = None,
    mesh=None,
    geometry: AbstractGeometry | str | None = None,
    normalization: str | None = None,
):
    """The exact gradient of the limit's loss with respect to the grid
    parameters, in the mean-field normalisation `M dLoss/dtheta_j^m / c_j`
    (`c_j` the integral of node `j`'s basis function, see
    [`mfattn.ParamPath.basis_integrals`][]). It is the basis-weighted time
    average of the gradient map, `(1/c_j) int b_j(t) g(theta^m(t), t) dt`, and
    tends to the pointwise `Solution.grads` as the grid is refined.

    **Arguments:** as [`mfattn.solve_limit`][] (without `saveat`), plus `adjoint`:

    - [`mfattn.ClosedFormAdjoint`][]`()` (default; an
      [`mfattn.AbstractLimitAdjoint`][]): integrate `b_j(t) g(theta(t), t)`
      as extra states of the closed-form adjoint ODE (same solver and
      tolerances), with `x(t)` from the forward dense output.
    - a `diffrax.AbstractAdjoint` (`RecursiveCheckpointAdjoint()`,
      `BacksolveAdjoint()`, `DirectAdjoint()`): `jax.grad` of the loss through
      `diffrax.diffeqsolve` with that adjoint (wrapped in
      [`mfattn.DiffraxAdjoint`][]).

    `method=` is the older name of `adjoint=` (`"closed_form"` or a Diffrax adjoint).
    `geometry=mfattn.Sphere()`: the limit on the sphere, with the projected
    field's closed-form adjoint (see [`mfattn.solve_limit`][]).

    **Returns:** `(loss, grads)` with `grads` an `AttentionParams` shaped like the grid.
    """
    adjoint = as_limit_adjoint(adjoint, method)
    geometry = as_geometry(geometry, normalization)
    if loss is None:
        raise TypeError("`loss` must be an mfattn loss (AbstractLoss), got None")
    prob = limit_problem(
        params,
        measure,
        loss,
        beta,
        times=times,
        interpolation=interpolation,
        solver=solver,
        rtol=rtol,
        atol=atol,
        stepsize_controller=stepsize_controller,
        dt0=dt0,
        max_steps=max_steps,
        throw=throw,
        progress_meter=progress_meter,
        kernel=kernel,
        chunk_size=chunk_size,
        mesh=mesh,
        geometry=geometry,
    )
    c = prob.path.basis_integrals()[:, None, None, None]
    value, integrals = adjoint.loss_and_integrals(prob)
    return value, jax.tree.map(lambda a: a / c, integrals)


__all__ = ["solve_limit", "limit_gradient", "ClosedFormAdjoint", "limit_problem", "LimitProblem"]


@eqx.filter_jit
def forward_limit(prob: LimitProblem, saveat=None) -> Solution:
    """The forward McKean-Vlasov ODE alone, reported at `saveat` (default the
    grid nodes, as [`mfattn.solve_limit`][]): a [`mfattn.Solution`][] with `xs`
    and `test_xs` (private; `MeanFieldTransformer.__call__`)."""
    save = opts.save_times(saveat, prob.path.save_times(), dtype=prob.path.times.dtype)
    name = "the limit's forward solve"
    fwd = prob.forward(diffrax.SaveAt(ts=save), name=name)
    xs, zs = fwd.ys
    if prob.throw:
        xs, zs = finite((xs, zs), name)
    return Solution(
        ts=save,
        xs=xs,
        test_xs=zs if zs.shape[1] else None,
        stats={"forward_steps": fwd.stats["num_accepted_steps"]},
        result=None if prob.throw else fwd.result,
    )
