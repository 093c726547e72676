"""The continuous (large-depth, large-width) limit: forward and adjoint
McKean-Vlasov ODEs integrated with Diffrax (docs/theory.md, section 6)."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from ._checks import check_solve
from ._custom_types import BetaLike, ScalarLike
from ._discrete import check_model_inputs
from ._field import AttentionField
from ._kernels import AbstractAttentionKernel
from ._loss import AbstractLoss
from ._measure import EmpiricalMeasure
from ._params import AttentionParams
from ._path import ParamPath
from ._renamed import renamed_kwargs
from ._solution import Solution
from ._sphere import check_normalization, normalize, project_tangent
from ._vector_field import AdjointVectorField, AttentionVectorField


class ClosedFormAdjoint(eqx.Module):
    """Gradients of the limit by its closed-form adjoint ODE (optimise, then
    discretise; docs/theory.md, section 6): the backward McKean-Vlasov ODE is
    integrated with the forward solve's solver and tolerances, reading `x(t)`
    from its dense output, and `int b_j(t) g(theta(t), t) dt` is accumulated
    for every grid node as extra states. The default `adjoint=` of
    [`mfattn.limit_gradient`][]; the alternatives are Diffrax's adjoints
    (`diffrax.RecursiveCheckpointAdjoint()`, `diffrax.BacksolveAdjoint()`,
    `diffrax.DirectAdjoint()`), which differentiate through the forward solve."""


def as_path(params, times=None, interpolation="linear", name="params") -> ParamPath:
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


def _controller(path, rtol, atol, stepsize_controller):
    if stepsize_controller is not None:
        if rtol is not None or atol is not None:
            raise ValueError("pass `rtol`/`atol` or `stepsize_controller`, not both")
        return stepsize_controller
    pid = diffrax.PIDController(
        rtol=1e-6 if rtol is None else rtol, atol=1e-8 if atol is None else atol
    )
    jumps = path.breakpoints()
    if jumps.shape[0] == 0:
        return pid
    return diffrax.ClipStepSizeController(pid, jump_ts=jumps)


def _finite(tree, what):
    """`eqx.error_if` on non-finite values of a solve's states (the result is used)."""
    bad = jnp.array(False)
    for leaf in jax.tree.leaves(tree):
        bad = bad | ~jnp.all(jnp.isfinite(leaf))
    return eqx.error_if(tree, bad, f"{what} produced non-finite values")


class _LimitProblem(eqx.Module):
    """One instance of the limit: the vector field, the loss, test particles,
    and how to integrate (private; built by `_LimitProblem.build`)."""

    vf: AttentionVectorField
    loss: AbstractLoss
    test_points: Float[Array, "m d"]
    test_labels: Array | None
    solver: diffrax.AbstractSolver
    controller: diffrax.AbstractStepSizeController
    max_steps: int = eqx.field(static=True)

    @classmethod
    def build(
        cls,
        params,
        measure,
        loss,
        beta,
        *,
        test_points,
        test_labels,
        test_positions,
        times,
        interpolation,
        solver,
        rtol,
        atol,
        stepsize_controller,
        max_steps,
        kernel,
        chunk_size,
        mesh,
        normalization=None,
    ):
        path = as_path(params, times, interpolation)
        checked, test_points, test_labels = check_model_inputs(
            path.params, measure, loss, test_points, test_labels
        )
        path = eqx.tree_at(lambda p: p.params, path, checked)
        dtype = jnp.result_type(measure.points.dtype, path.params.dtype)
        measure = eqx.tree_at(
            lambda m: (m.points, m.weights),
            measure,
            (measure.points.astype(dtype), measure.weights.astype(dtype)),
        )
        d = measure.dim
        Z0 = jnp.zeros((0, d), dtype) if test_points is None else test_points.astype(dtype)
        if normalization == "sphere":  # the inputs are mapped to the sphere first
            measure = measure.with_points(normalize(measure.points)[0])
            Z0 = normalize(Z0)[0]
        field = AttentionField(beta, kernel, mesh, chunk_size=chunk_size)
        vf = AttentionVectorField(field, path, measure, test_positions, normalization)
        controller = _controller(path, rtol, atol, stepsize_controller)
        return cls(vf, loss, Z0, test_labels, solver, controller, max_steps)

    @property
    def path(self) -> ParamPath:
        return self.vf.path

    @property
    def measure(self) -> EmpiricalMeasure:
        return self.vf.measure

    def tangent(self, X, P):
        """`P_X P` on the sphere (the adjoints' part that acts), else `P`."""
        return P if self.vf.normalization is None else project_tangent(X, P)

    def forward(self, saveat, adjoint=diffrax.RecursiveCheckpointAdjoint(), name=None):
        """The forward McKean-Vlasov ODE from `t = 0` to `1`; with a `name`, a
        failed solve (e.g. `max_steps` reached) raises an error naming it."""
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(self.vf),
            self.solver,
            0.0,
            1.0,
            None,
            (self.measure.points, self.test_points),
            saveat=saveat,
            stepsize_controller=self.controller,
            adjoint=adjoint,
            max_steps=self.max_steps,
            throw=name is None,
        )
        return sol if name is None else check_solve(sol, name)

    def terminal(self, X1, Z1):
        """`Loss(mu_1)` and the terminal adjoints of the tokens and test particles
        (on the sphere, their tangent parts)."""
        terminal = self.measure.with_points(X1)
        value = self.loss(terminal)
        P1 = self.loss.lions_derivative(terminal).astype(X1.dtype)
        if self.test_points.shape[0] == 0:
            PZ1 = jnp.zeros_like(self.test_points)
        else:
            PZ1 = self.loss.lions_derivative(terminal, Z1, self.test_labels).astype(X1.dtype)
        return value, self.tangent(X1, P1), self.tangent(Z1, PZ1)

    def backward(self, fwd, P1, PZ1, integrate_gradient=False, name="the adjoint solve"):
        """The closed-form adjoint ODE from `t = 1` to `0` (dense output), or
        with `integrate_gradient` the node gradients accumulated as extra states."""
        y1 = (P1, PZ1)
        if integrate_gradient:
            y1 = y1 + (jax.tree.map(jnp.zeros_like, self.path.params),)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(AdjointVectorField(self.vf, fwd)),
            self.solver,
            1.0,
            0.0,
            None,
            y1,
            # the gradient accumulators are only needed at t = 0: no dense output
            saveat=diffrax.SaveAt(t1=True, dense=not integrate_gradient),
            stepsize_controller=self.controller,
            max_steps=self.max_steps,
            throw=False,
        )
        return check_solve(sol, name)


_RENAMED = dict(params_grid="params")


@renamed_kwargs(**_RENAMED)
@eqx.filter_jit
def solve_limit(
    params: AttentionParams | ParamPath,
    measure: EmpiricalMeasure,
    loss: AbstractLoss,
    beta: BetaLike,
    test_points: Float[ArrayLike, "m d"] | None = None,
    *,
    test_labels: Array | None = None,
    test_positions=None,
    ts=None,
    times=None,
    interpolation: str = "linear",
    solver: diffrax.AbstractSolver = diffrax.Tsit5(),
    rtol: ScalarLike | None = None,
    atol: ScalarLike | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    max_steps: int = 4096,
    adjoint: diffrax.AbstractAdjoint = diffrax.RecursiveCheckpointAdjoint(),
    kernel: AbstractAttentionKernel | None = None,
    chunk_size: int | None = None,
    mesh=None,
    normalization: str | None = None,
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
    - `ts`: times at which to save `xs`, `ps` (default: the grid nodes, plus
      `t = 1` for constant interpolation, so that `xs` has `L + 1` states like
      the discrete model's).
    - `times`, `interpolation`: the grid nodes, when `params` is an `AttentionParams`.
    - `solver`, `rtol`, `atol`, `stepsize_controller`, `max_steps`: Diffrax
      options (default Tsit5 with a PID controller at `rtol=1e-6, atol=1e-8`;
      give `rtol`/`atol` or a `stepsize_controller`, not both).
    - `adjoint`: how Diffrax differentiates the *forward* solve if you
      differentiate through `solve_limit` (the returned `grads` never need it).
    - `normalization`: `None` (default) or `"sphere"`: the limit of the
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

    **Returns:** a [`mfattn.Solution`][]; `grads` has the shape of the grid.

    **Raises:** a runtime error naming the solve when Diffrax fails (e.g. it
    reaches `max_steps`) or a state becomes non-finite.
    """
    prob = _LimitProblem.build(
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
        max_steps=max_steps,
        kernel=kernel,
        chunk_size=chunk_size,
        mesh=mesh,
        normalization=check_normalization(normalization),
    )
    fwd = prob.forward(diffrax.SaveAt(t1=True, dense=True), adjoint, "solve_limit's forward solve")
    X1, Z1 = _finite((fwd.ys[0][-1], fwd.ys[1][-1]), "solve_limit's forward solve")
    loss_value, P1, PZ1 = prob.terminal(X1, Z1)
    bwd = prob.backward(fwd, P1, PZ1, name="solve_limit's adjoint solve")
    path = prob.path
    nodes = path.times
    if ts is None:
        save = path.save_times()
    else:
        save = jnp.asarray(ts, dtype=nodes.dtype)
        if save.ndim != 1:
            raise ValueError(f"`ts` must be 1-D, got shape {save.shape}")
    xs, zs = jax.vmap(fwd.evaluate)(save)
    ps, pzs = _finite(jax.vmap(bwd.evaluate)(save), "solve_limit's adjoint solve")
    ps, pzs = prob.tangent(xs, ps), prob.tangent(zs, pzs)
    if ts is None:  # the default save times start with the nodes
        Xn, Pn = xs[: nodes.shape[0]], ps[: nodes.shape[0]]
    else:
        Xn = jax.vmap(fwd.evaluate)(nodes)[0]
        Pn = jax.vmap(bwd.evaluate)(nodes)[0]

    def node_grad(t, X, P, layer):
        return prob.vf.adjoint(t, X, None, P, None, layer=layer)[2]

    grads = jax.vmap(node_grad)(nodes, Xn, Pn, path.params)
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


@renamed_kwargs(**_RENAMED)
@eqx.filter_jit
def limit_gradient(
    params: AttentionParams | ParamPath,
    measure: EmpiricalMeasure,
    loss: AbstractLoss,
    beta: BetaLike,
    *,
    adjoint: ClosedFormAdjoint | diffrax.AbstractAdjoint | None = None,
    method: str | diffrax.AbstractAdjoint | None = None,
    times=None,
    interpolation: str = "linear",
    solver: diffrax.AbstractSolver = diffrax.Tsit5(),
    rtol: ScalarLike | None = None,
    atol: ScalarLike | None = None,
    stepsize_controller=None,
    max_steps: int = 4096,
    kernel: AbstractAttentionKernel | None = None,
    chunk_size: int | None = None,
    mesh=None,
    normalization: str | None = None,
):
    """The exact gradient of the limit's loss with respect to the grid
    parameters, in the mean-field normalisation `M dLoss/dtheta_j^m / c_j`
    (`c_j` the integral of node `j`'s basis function, see
    [`mfattn.ParamPath.basis_integrals`][]). It is the basis-weighted time
    average of the gradient map, `(1/c_j) int b_j(t) g(theta^m(t), t) dt`, and
    tends to the pointwise `Solution.grads` as the grid is refined.

    **Arguments:** as [`mfattn.solve_limit`][], plus `adjoint`:

    - [`mfattn.ClosedFormAdjoint`][]`()` (default): integrate `b_j(t) g(theta(t), t)`
      as extra states of the closed-form adjoint ODE (same solver and
      tolerances), with `x(t)` from the forward dense output.
    - a `diffrax.AbstractAdjoint` (`RecursiveCheckpointAdjoint()`,
      `BacksolveAdjoint()`, `DirectAdjoint()`): `jax.grad` of the loss through
      `diffrax.diffeqsolve` with that adjoint.

    `method=` is the older name of `adjoint=` (`"closed_form"` or a Diffrax adjoint).
    `normalization="sphere"`: the limit on the sphere, with the projected
    field's closed-form adjoint (see [`mfattn.solve_limit`][]).

    **Returns:** `(loss, grads)` with `grads` an `AttentionParams` shaped like the grid.
    """
    if method is not None:
        if adjoint is not None:
            raise TypeError("pass `adjoint` only (`method` is its old name)")
        if isinstance(method, str):
            if method != "closed_form":
                raise ValueError(
                    f"`method` must be 'closed_form' or a diffrax adjoint, got {method!r}"
                )
            method = ClosedFormAdjoint()
        adjoint = method
    adjoint = ClosedFormAdjoint() if adjoint is None else adjoint
    if not isinstance(adjoint, (ClosedFormAdjoint, diffrax.AbstractAdjoint)):
        raise TypeError(
            "`adjoint` must be mfattn.ClosedFormAdjoint() or a diffrax adjoint, got "
            f"{type(adjoint).__name__}"
        )
    prob = _LimitProblem.build(
        params,
        measure,
        loss,
        beta,
        test_points=None,
        test_labels=None,
        test_positions=None,
        times=times,
        interpolation=interpolation,
        solver=solver,
        rtol=rtol,
        atol=atol,
        stepsize_controller=stepsize_controller,
        max_steps=max_steps,
        kernel=kernel,
        chunk_size=chunk_size,
        mesh=mesh,
        normalization=check_normalization(normalization),
    )
    path = prob.path
    M = path.params.heads
    c = path.basis_integrals()[:, None, None, None]
    if isinstance(adjoint, diffrax.AbstractAdjoint):

        def loss_of(p):
            sol = eqx.tree_at(lambda q: q.vf.path.params, prob, p).forward(
                diffrax.SaveAt(t1=True), adjoint
            )
            return prob.loss(prob.measure.with_points(sol.ys[0][-1]))

        value, g = jax.value_and_grad(loss_of)(path.params)
        return value, jax.tree.map(lambda a: M * a / c, g)
    fwd = prob.forward(diffrax.SaveAt(t1=True, dense=True), name="limit_gradient's forward solve")
    X1, Z1 = _finite((fwd.ys[0][-1], fwd.ys[1][-1]), "limit_gradient's forward solve")
    value, P1, PZ1 = prob.terminal(X1, Z1)
    bwd = prob.backward(
        fwd, P1, PZ1, integrate_gradient=True, name="limit_gradient's adjoint solve"
    )
    integral = _finite(jax.tree.map(lambda a: a[-1], bwd.ys[2]), "limit_gradient's adjoint solve")
    return value, jax.tree.map(lambda a: a / c, integral)
