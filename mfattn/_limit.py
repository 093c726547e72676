"""The continuous (large-depth, large-width) limit: forward and adjoint
McKean-Vlasov ODEs integrated with Diffrax (SPEC section 6)."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

from ._discrete import check_model_inputs
from ._field import AttentionField
from ._params import AttentionParams
from ._path import ParamPath
from ._solution import Solution


class MeanFieldVectorField(eqx.Module):
    """`dx_i/dt = Gamma(x_i, mu_t; nu_t)` for the tokens and test particles, as
    a Diffrax vector field `(t, y, args) -> dy/dt` with `y = (X, Z)`. The
    measure `mu_t` is the tokens' own (McKean-Vlasov); `Z` is carried along."""

    field: AttentionField
    path: ParamPath
    weights: jax.Array

    def __call__(self, t, y, args):
        X, Z = y
        measure = _measure(X, self.weights)
        vx, vz = self.field.forward(measure, self.path(t), Z)
        return vx, vz


class AdjointVectorField(eqx.Module):
    """The backward McKean-Vlasov ODE of SPEC section 6,

        dp_i/dt = -[grad_x Gamma(x_i)^T p_i + sum_j w_j d_mu Gamma(x_j)(x_i)^T p_j],

    in closed form, reading `x(t)` from the forward solution's dense output."""

    field: AttentionField
    path: ParamPath
    weights: jax.Array
    forward: diffrax.Solution

    def __call__(self, t, y, args):
        P, PZ = y[0], y[1]
        X, Z = self.forward.evaluate(t)
        b, bz, g = self.field.backward(_measure(X, self.weights), self.path(t), P, Z, PZ)
        if len(y) == 2:
            return -b, -bz
        # Optionally accumulate int_t^1 b_j(s) g(theta(s), s) ds for every node j.
        basis = self.path.basis(t)
        dG = jax.tree.map(lambda a: -jnp.einsum("n,m...->nm...", basis, a), g)
        return -b, -bz, dG


def _measure(points, weights):
    from ._measure import EmpiricalMeasure

    m = object.__new__(EmpiricalMeasure)  # trusted inside the solver: no re-checks
    object.__setattr__(m, "points", points)
    object.__setattr__(m, "weights", weights)
    return m


def as_path(params_grid, times=None, interpolation="linear") -> ParamPath:
    """Accept an [`mfattn.ParamPath`][] or an `AttentionParams` grid."""
    if isinstance(params_grid, ParamPath):
        if times is not None:
            raise ValueError("pass `times` to the ParamPath, not to the solver")
        return params_grid
    if isinstance(params_grid, AttentionParams):
        if params_grid.Q.ndim != 4:
            raise ValueError(
                "`params_grid` must have leaves (J+1, M, d, k) on a depth grid, got "
                f"{params_grid.Q.shape}"
            )
        return ParamPath(params_grid, times, interpolation)
    raise TypeError(
        f"`params_grid` must be an AttentionParams or a ParamPath, got {type(params_grid).__name__}"
    )


def _controller(path, rtol, atol, stepsize_controller):
    if stepsize_controller is not None:
        return stepsize_controller
    pid = diffrax.PIDController(rtol=rtol, atol=atol)
    jumps = path.breakpoints()
    if jumps.shape[0] == 0:
        return pid
    return diffrax.ClipStepSizeController(pid, jump_ts=jumps)


def _forward_solve(path, field, measure, Z0, solver, controller, saveat, adjoint, max_steps):
    term = diffrax.ODETerm(MeanFieldVectorField(field, path, measure.weights))
    return diffrax.diffeqsolve(
        term,
        solver,
        0.0,
        1.0,
        None,
        (measure.points, Z0),
        saveat=saveat,
        stepsize_controller=controller,
        adjoint=adjoint,
        max_steps=max_steps,
    )


def _solve(
    params_grid,
    measure,
    loss,
    beta,
    test_points,
    test_labels,
    times,
    interpolation,
    solver,
    rtol,
    atol,
    stepsize_controller,
    max_steps,
    adjoint,
    integrate_gradient=False,
    chunk_size=None,
    mesh=None,
):
    path = as_path(params_grid, times, interpolation)
    test_points, test_labels = check_model_inputs(
        path.params, measure, loss, test_points, test_labels, name="params_grid"
    )
    field = AttentionField(beta, chunk_size, mesh)
    dtype = jnp.result_type(measure.points.dtype, path.params.dtype)
    measure = _measure(measure.points.astype(dtype), measure.weights.astype(dtype))
    d = measure.points.shape[1]
    Z0 = jnp.zeros((0, d), dtype) if test_points is None else test_points.astype(dtype)
    controller = _controller(path, rtol, atol, stepsize_controller)
    fwd = _forward_solve(
        path,
        field,
        measure,
        Z0,
        solver,
        controller,
        diffrax.SaveAt(t1=True, dense=True),
        adjoint,
        max_steps,
    )
    X1, Z1 = fwd.ys[0][-1], fwd.ys[1][-1]
    terminal = _measure(X1, measure.weights)
    loss_value = loss(terminal)
    P1 = loss.lions_derivative(terminal).astype(dtype)
    PZ1 = (
        jnp.zeros((0, d), dtype)
        if test_points is None
        else loss.lions_derivative(terminal, Z1, test_labels).astype(dtype)
    )
    bterm = diffrax.ODETerm(AdjointVectorField(field, path, measure.weights, fwd))
    y1 = (P1, PZ1)
    if integrate_gradient:
        y1 = y1 + (jax.tree.map(jnp.zeros_like, path.params),)
    bwd = diffrax.diffeqsolve(
        bterm,
        solver,
        1.0,
        0.0,
        None,
        y1,
        # the gradient accumulators are only needed at t = 0: no dense output
        saveat=diffrax.SaveAt(t1=True, dense=not integrate_gradient),
        stepsize_controller=controller,
        max_steps=max_steps,
    )
    return path, field, measure, fwd, bwd, loss_value


@eqx.filter_jit
def solve_limit(
    params_grid,
    measure,
    loss,
    beta,
    *,
    test_points=None,
    test_labels=None,
    ts=None,
    times=None,
    interpolation: str = "linear",
    solver: diffrax.AbstractSolver = diffrax.Tsit5(),
    rtol: float = 1e-6,
    atol: float = 1e-8,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    max_steps: int = 4096,
    adjoint: diffrax.AbstractAdjoint = diffrax.RecursiveCheckpointAdjoint(),
    chunk_size: int | None = None,
    mesh=None,
) -> Solution:
    """Solve the mean-field limit: the forward McKean-Vlasov ODE, its closed-form
    adjoint ODE, and the gradient map at the depth-grid nodes (SPEC section 6).

        forward   dx_i/dt = Gamma(x_i, mu_t; nu_t),  x_i(0) = x_i^0,
        backward  dp_i/dt = -[grad_x Gamma(x_i)^T p_i + sum_j w_j d_mu Gamma(x_j)(x_i)^T p_j],
                  p_i(1) = d_mu Loss(mu_1)(x_i(1)),
        gradient  g(theta^m(t_j), t_j) = sum_i w_i grad_theta G(x_i(t_j); theta^m(t_j))^T p_i(t_j).

    Both ODEs are integrated with `diffrax.diffeqsolve` (adaptive steps that land
    on the grid nodes, where the parameters have kinks or jumps); the backward
    solve reads `x(t)` from the forward solve's dense output. This is
    optimise-then-discretise; see [`mfattn.limit_gradient`][] for gradients by
    differentiating through the solver instead.

    **Arguments:**

    - `params_grid`: an [`mfattn.AttentionParams`][] with leaves `(J+1, M, d, k)`
      (parameter particles at the grid nodes) or an [`mfattn.ParamPath`][].
    - `measure`, `loss`, `beta`, `test_points`, `test_labels`: as in
      [`mfattn.solve_discrete`][].
    - `ts`: times at which to save `xs`, `ps` (default: the grid nodes, plus
      `t = 1` for constant interpolation, so that `xs` has `L + 1` states like
      the discrete model's).
    - `times`, `interpolation`: the grid, when `params_grid` is an `AttentionParams`.
    - `solver`, `rtol`, `atol`, `stepsize_controller`, `max_steps`: Diffrax
      options (default Tsit5 with a PID controller at `rtol=1e-6, atol=1e-8`).
    - `chunk_size`, `mesh`: see [`mfattn.AttentionField`][].
    - `adjoint`: how Diffrax differentiates the *forward* solve if you
      differentiate through `solve_limit` (the returned `grads` never need it).

    **Returns:** a [`mfattn.Solution`][]; `grads` has the shape of the grid.
    """
    path, field, measure, fwd, bwd, loss_value = _solve(
        params_grid,
        measure,
        loss,
        beta,
        test_points,
        test_labels,
        times,
        interpolation,
        solver,
        rtol,
        atol,
        stepsize_controller,
        max_steps,
        adjoint,
        chunk_size=chunk_size,
        mesh=mesh,
    )
    nodes = path.times
    if ts is None:
        save = path.save_times()
    else:
        save = jnp.asarray(ts, dtype=nodes.dtype)
        if save.ndim != 1:
            raise ValueError(f"`ts` must be 1-D, got shape {save.shape}")
    xs, zs = jax.vmap(fwd.evaluate)(save)
    ps, pzs = jax.vmap(bwd.evaluate)(save)
    if ts is None:  # the default save times start with the nodes
        Xn, Pn = xs[: nodes.shape[0]], ps[: nodes.shape[0]]
    else:
        Xn = jax.vmap(fwd.evaluate)(nodes)[0]
        Pn = jax.vmap(bwd.evaluate)(nodes)[0]

    def node_grad(X, P, layer):
        return field.backward(_measure(X, measure.weights), layer, P)[2]

    grads = jax.vmap(node_grad)(Xn, Pn, path.params)
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
    )


@eqx.filter_jit
def limit_gradient(
    params_grid,
    measure,
    loss,
    beta,
    *,
    method: str | diffrax.AbstractAdjoint = "closed_form",
    times=None,
    interpolation: str = "linear",
    solver: diffrax.AbstractSolver = diffrax.Tsit5(),
    rtol: float = 1e-6,
    atol: float = 1e-8,
    stepsize_controller=None,
    max_steps: int = 4096,
    chunk_size: int | None = None,
    mesh=None,
):
    """The exact gradient of the limit's loss with respect to the grid
    parameters, in the mean-field normalisation `M dLoss/dtheta_j^m / c_j`
    (`c_j` the integral of node `j`'s basis function, see
    [`mfattn.ParamPath.basis_integrals`][]). It is the basis-weighted time
    average of the gradient map, `(1/c_j) int b_j(t) g(theta^m(t), t) dt`, and
    tends to the pointwise `Solution.grads` as the grid is refined.

    **Arguments:** as [`mfattn.solve_limit`][], plus `method`:

    - `"closed_form"` (default): integrate `b_j(t) g(theta(t), t)` as extra
      states of the closed-form adjoint ODE (same solver and tolerances), with
      `x(t)` from the forward dense output.
    - a `diffrax.AbstractAdjoint` (`RecursiveCheckpointAdjoint()`,
      `BacksolveAdjoint()`, `DirectAdjoint()`): `jax.grad` of the loss through
      `diffrax.diffeqsolve` with that adjoint (discretise-then-optimise, or
      Diffrax's own continuous adjoint for `BacksolveAdjoint`).

    **Returns:** `(loss, grads)` with `grads` an `AttentionParams` shaped like the grid.
    """
    path = as_path(params_grid, times, interpolation)
    M = path.params.heads
    c = path.basis_integrals()[:, None, None, None]
    if isinstance(method, diffrax.AbstractAdjoint):
        check_model_inputs(path.params, measure, loss, None, None, name="params_grid")
        field = AttentionField(beta, chunk_size, mesh)
        dtype = jnp.result_type(measure.points.dtype, path.params.dtype)
        m = _measure(measure.points.astype(dtype), measure.weights.astype(dtype))
        d = m.points.shape[1]
        controller = _controller(path, rtol, atol, stepsize_controller)

        def loss_of(params):
            p = eqx.tree_at(lambda q: q.params, path, params)
            sol = _forward_solve(
                p,
                field,
                m,
                jnp.zeros((0, d), dtype),
                solver,
                controller,
                diffrax.SaveAt(t1=True),
                method,
                max_steps,
            )
            return loss(_measure(sol.ys[0][-1], m.weights))

        value, g = jax.value_and_grad(loss_of)(path.params)
        return value, jax.tree.map(lambda a: M * a / c, g)
    if method != "closed_form":
        raise ValueError(f"`method` must be 'closed_form' or a diffrax adjoint, got {method!r}")
    _, _, _, _, bwd, value = _solve(
        path,
        measure,
        loss,
        beta,
        None,
        None,
        None,
        interpolation,
        solver,
        rtol,
        atol,
        stepsize_controller,
        max_steps,
        diffrax.RecursiveCheckpointAdjoint(),
        integrate_gradient=True,
        chunk_size=chunk_size,
        mesh=mesh,
    )
    integral = jax.tree.map(lambda a: a[-1], bwd.ys[2])
    return value, jax.tree.map(lambda a: a / c, integral)
