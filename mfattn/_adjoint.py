"""How the limit is differentiated: typed strategies, as Diffrax's
`AbstractAdjoint` (docs/theory.md, section 6)."""

import abc
import warnings

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp


class AbstractLimitAdjoint(eqx.Module):
    """How [`mfattn.limit_gradient`][] computes the gradient of the limit's loss
    with respect to the grid parameters: [`mfattn.ClosedFormAdjoint`][] (the
    default) or [`mfattn.DiffraxAdjoint`][] (through the solver; any
    `diffrax.AbstractAdjoint` passed as `adjoint=` is wrapped in it)."""

    @abc.abstractmethod
    def loss_and_integrals(self, problem):
        """`(loss, integrals)`: the loss and `dLoss/dtheta_j^m * M` at every
        node, an `AttentionParams` shaped like the grid."""


class ClosedFormAdjoint(AbstractLimitAdjoint):
    """Gradients of the limit by its closed-form adjoint ODE (optimise, then
    discretise; docs/theory.md, section 6): the backward McKean-Vlasov ODE is
    integrated with the forward solve's solver and step-size controller,
    reading `x(t)` from the forward solution, and `int b_j(t) g(theta(t), t) dt`
    is accumulated for every grid node as extra states. The default `adjoint=`
    of [`mfattn.limit_gradient`][].

    **Arguments** (keyword-only):

    - `checkpoints`: `None` (default) to read `x(t)` from the dense output of
      one forward solve, whose buffers Diffrax sizes by `max_steps` (memory
      `O(max_steps n d)` however few steps are taken); or a number `C` of
      equal segments of `[0, 1]`. The forward solve then keeps the states at
      the `C + 1` segment ends only, and the adjoint ODE is solved segment by
      segment from the last: on each, the forward ODE is solved again from
      the segment's first state with dense output of at most
      `segment_max_steps` steps, and the adjoint reads `x(t)` from it. Memory
      `O((C + segment_max_steps) n d)` whatever `max_steps` (as Diffrax's
      `RecursiveCheckpointAdjoint(checkpoints=...)` trades recomputation for
      memory), for about twice the forward work and, at every segment end,
      the restart of the step-size controller; the result agrees with the
      dense one to the solver's tolerance. Not with `diffrax.StepTo`.
    - `segment_max_steps`: the steps one segment's forward solve may take
      (default 64); a segment that needs more fails like a solve that
      reaches `max_steps` (raise it or `checkpoints`).
    """

    checkpoints: int | None = eqx.field(static=True)
    segment_max_steps: int = eqx.field(static=True)

    def __init__(self, *, checkpoints: int | None = None, segment_max_steps: int | None = None):
        from ._limit import SEGMENT_MAX_STEPS, check_checkpoints

        if segment_max_steps is None:
            segment_max_steps = SEGMENT_MAX_STEPS
        self.checkpoints, self.segment_max_steps = check_checkpoints(checkpoints, segment_max_steps)

    def loss_and_integrals(self, problem):
        from ._limit import finite

        name = "limit_gradient's forward solve"
        bname = "limit_gradient's adjoint solve"
        if self.checkpoints is None:
            fwd = problem.forward(diffrax.SaveAt(t1=True, dense=True), name=name)
            X1, Z1 = finite((fwd.ys[0][-1], fwd.ys[1][-1]), name)
            value, P1, PZ1 = problem.terminal(X1, Z1)
            bwd = problem.backward(fwd, P1, PZ1, integrate_gradient=True, name=bname)
            integral = jax.tree.map(lambda a: a[-1], bwd.ys[2])
            return value, finite(integral, bname)
        ts = problem.checkpoint_times(self.checkpoints)
        fwd = problem.forward(diffrax.SaveAt(ts=ts), name=name)
        Xs, Zs = fwd.ys
        X1, Z1 = finite((Xs[-1], Zs[-1]), name)
        value, P1, PZ1 = problem.terminal(X1, Z1)
        y0, _, _, _ = problem.backward_segments(
            ts, Xs, Zs, P1, PZ1, self.segment_max_steps, integrate_gradient=True, name=bname
        )
        return value, finite(y0[2], bname)


class DiffraxAdjoint(AbstractLimitAdjoint):
    """`jax.grad` of the loss through `diffrax.diffeqsolve` with a Diffrax
    adjoint (`diffrax.RecursiveCheckpointAdjoint()`, `DirectAdjoint()`,
    `BacksolveAdjoint()`; discretise, then optimise). `limit_gradient(...,
    adjoint=diffrax.BacksolveAdjoint())` wraps it for you.

    **Arguments:** `adjoint`, a `diffrax.AbstractAdjoint`.
    """

    adjoint: diffrax.AbstractAdjoint

    def __check_init__(self):
        if not isinstance(self.adjoint, diffrax.AbstractAdjoint):
            raise TypeError(
                f"`adjoint` must be a diffrax adjoint, got {type(self.adjoint).__name__}"
            )

    def loss_and_integrals(self, problem):
        M = problem.path.params.heads

        def loss_of(p):
            prob = eqx.tree_at(lambda q: q.vf.path.params, problem, p)
            sol = prob.forward(diffrax.SaveAt(t1=True), self.adjoint)
            return prob.loss(prob.measure.with_points(sol.ys[0][-1]))

        value, g = jax.value_and_grad(loss_of)(problem.path.params)
        return value, jax.tree.map(lambda a: M * a, g)


def as_limit_adjoint(adjoint=None, method=None) -> AbstractLimitAdjoint:
    """The strategy from `adjoint=` (or its old name `method=`, which also took
    the string `"closed_form"`)."""
    if method is not None:
        if adjoint is not None:
            raise TypeError("pass `adjoint` only (`method` is its old name)")
        warnings.warn(
            "`method=` is deprecated; use `adjoint=` (e.g. `adjoint=mfattn.ClosedFormAdjoint()`)",
            DeprecationWarning,
            stacklevel=4,
        )
        if isinstance(method, str):
            if method != "closed_form":
                raise ValueError(
                    f"`method` must be 'closed_form' or a diffrax adjoint, got {method!r}"
                )
            method = ClosedFormAdjoint()
        adjoint = method
    if adjoint is None:
        return ClosedFormAdjoint()
    if isinstance(adjoint, AbstractLimitAdjoint):
        return adjoint
    if isinstance(adjoint, diffrax.AbstractAdjoint):
        return DiffraxAdjoint(adjoint)
    raise TypeError(
        "`adjoint` must be mfattn.ClosedFormAdjoint() or a diffrax adjoint, got "
        f"{type(adjoint).__name__}"
    )


__all__ = ["AbstractLimitAdjoint", "ClosedFormAdjoint", "DiffraxAdjoint", "as_limit_adjoint", "jnp"]
