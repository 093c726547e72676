"""The discrete transformer: explicit Euler steps of the attention vector field
(docs/theory.md, sections 3, 4, 9 and 10), by the one Euler scan of `_euler.py`."""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import ArrayLike, Float

from ._checks import (
    as_float_array,
    check_beta_in,
    check_finite_args,
    check_nonzero_rows,
    check_sizes,
    check_states_finite,
)
from ._custom_types import BetaLike
from ._euler import euler_adjoint, euler_forward
from ._field import AttentionField
from ._geometry import AbstractGeometry, as_geometry, is_sphere
from ._interpolation import PiecewiseConstant
from ._kernels import AbstractAttentionKernel
from ._loss import AbstractLoss, terminal_condition
from ._measure import EmpiricalMeasure, check_measure
from ._mlp import Activation, MLPParams, resolve_activation
from ._params import AttentionParams
from ._path import ParamPath
from ._residual import AbstractResidualScaling, as_residual_scaling
from ._solution import Solution
from ._vector_field import AttentionVectorField


def check_model_inputs(params, measure, loss, test_points, test_labels, name="params"):
    """Shared checks of `solve_discrete` and `solve_limit`: types and shapes at
    trace time, finite values of `params`, `test_points` and `test_labels`
    (through `eqx.error_if` when traced). `loss=None` is a forward-only solve.
    Returns the checked `(params, test_points, test_labels)`, which callers
    must use."""
    if not isinstance(params, AttentionParams):
        raise TypeError(f"`{name}` must be an AttentionParams, got {type(params).__name__}")
    if params.Q.ndim != 4:
        raise ValueError(f"`{name}` must have leaves of shape (L, H, d, k), got {params.Q.shape}")
    sizes = {f"{name}:L (depth nodes)": params.depth}
    sizes[f"{name}:H (heads, or particles)"] = params.heads
    check_sizes(**sizes)
    check_measure(measure)
    if params.dim != measure.dim:
        raise ValueError(
            f"`{name}` has token dimension d={params.dim} but `measure` has d={measure.dim}"
        )
    if loss is not None and not isinstance(loss, AbstractLoss):
        raise TypeError(f"`loss` must be an mfattn loss (AbstractLoss), got {type(loss).__name__}")
    if test_points is not None:
        test_points = as_float_array(test_points, "test_points", ndim=2)
        if test_points.shape[1] != measure.dim:
            raise ValueError(
                f"`test_points` has dimension {test_points.shape[1]}, expected d={measure.dim}"
            )
        if test_labels is not None:
            test_labels = as_float_array(test_labels, "test_labels", ndim=2)
            if test_labels.shape[0] != test_points.shape[0]:
                raise ValueError(
                    f"`test_labels` has {test_labels.shape[0]} rows but `test_points` has "
                    f"{test_points.shape[0]}: one label per test point"
                )
    elif test_labels is not None:
        raise ValueError("`test_labels` given without `test_points`")
    checked = check_finite_args(**{name: params}, test_points=test_points, test_labels=test_labels)
    return checked[0], checked[1], checked[2]


def check_mlp(mlp, params: AttentionParams, activation) -> None:
    """`mlp` has one block per layer of `params`, in the same dimension."""
    if mlp is None:
        return
    if not isinstance(mlp, MLPParams):
        raise TypeError(f"`mlp` must be an MLPParams or None, got {type(mlp).__name__}")
    if mlp.W1.ndim != 3:
        raise ValueError(
            f"`mlp` must have leaves with a depth axis, W1 (L, d, m), got {mlp.W1.shape}"
        )
    if mlp.depth != params.depth:
        raise ValueError(f"`mlp` has {mlp.depth} blocks but `params` has L={params.depth} layers")
    if mlp.dim != params.dim:
        raise ValueError(f"`mlp` has d={mlp.dim} but `params` has d={params.dim}")
    resolve_activation(activation)


def discrete_vector_field(
    params,
    measure,
    field,
    *,
    test_positions=None,
    geometry=None,
    mlp=None,
    activation="tanh",
    probes=False,
) -> AttentionVectorField:
    """The vector field of the `L`-layer model: the field on the
    piecewise-constant path whose `J = L` nodes are the layers."""
    path = ParamPath(params, interpolation=PiecewiseConstant())
    return AttentionVectorField(
        field, path, measure, test_positions, geometry, mlp, activation, probes
    )


def _cast(measure, test_points, params, mlp):
    """Tokens, test points and weights in the common floating dtype."""
    dtype = jnp.result_type(measure.points.dtype, params.dtype)
    if mlp is not None:
        dtype = jnp.result_type(dtype, mlp.dtype)
    measure = eqx.tree_at(
        lambda m: (m.points, m.weights),
        measure,
        (measure.points.astype(dtype), measure.weights.astype(dtype)),
    )
    test_points = None if test_points is None else test_points.astype(dtype)
    return measure, test_points, dtype


def _setup(
    params,
    measure,
    loss,
    beta,
    test_points,
    test_labels,
    test_positions,
    kernel,
    chunk_size,
    mesh,
    mlp,
    activation,
    residual_scaling,
    normalization,
    geometry,
):
    geometry = as_geometry(geometry, normalization)
    scaling = as_residual_scaling(residual_scaling)
    params, test_points, test_labels = check_model_inputs(
        params, measure, loss, test_points, test_labels
    )
    check_mlp(mlp, params, activation)
    measure, test_points, dtype = _cast(measure, test_points, params, mlp)
    beta = check_beta_in(beta, dtype)
    if is_sphere(geometry):
        why = "it cannot be mapped to the unit sphere (`geometry=mfattn.Sphere()`)"
        measure = measure.with_points(check_nonzero_rows(measure.points, "measure.points", why))
        test_points = check_nonzero_rows(test_points, "test_points", why)
    measure = measure.with_points(geometry.initial(measure.points))
    test_points = None if test_points is None else geometry.initial(test_points)
    field = AttentionField(beta, kernel, mesh, chunk_size=chunk_size)
    vf = discrete_vector_field(
        params,
        measure,
        field,
        test_positions=test_positions,
        geometry=geometry,
        mlp=mlp,
        activation=activation,
    )
    return vf, scaling.factor(params.depth), measure, test_points, test_labels, dtype


@eqx.filter_jit
def solve_discrete(
    params: AttentionParams,
    measure: EmpiricalMeasure,
    loss: AbstractLoss | None,
    beta: BetaLike,
    test_points: Float[ArrayLike, "m d"] | None = None,
    *,
    test_labels: Float[ArrayLike, "m _"] | None = None,
    test_positions=None,
    kernel: AbstractAttentionKernel | None = None,
    chunk_size: int | None = None,
    mesh=None,
    mlp: MLPParams | None = None,
    activation: Activation = "tanh",
    residual_scaling: AbstractResidualScaling | str | None = None,
    geometry: AbstractGeometry | str | None = None,
    normalization: str | None = None,
) -> Solution:
    """Run the `L`-layer attention-only transformer and its closed-form adjoint.

    Forward (docs/theory.md, section 3): explicit Euler with step `1/L` on the
    [`mfattn.AttentionVectorField`][] of the piecewise-constant parameter path
    whose `L` nodes are the layers,

        x_i^{l+1} = x_i^l + (1/L) Gamma(x_i^l, mu^l; nu^l).

    Backward (docs/theory.md, section 4), the exact adjoint recursion in closed
    form (not `jax.grad`):

        p_i^L = d_mu Loss(mu^L)(x_i^L),
        p_i^l = p_i^{l+1} + (1/L) [grad_x Gamma(x_i^l)^T p_i^{l+1}
                                   + sum_j w_j d_mu Gamma(x_j^l)(x_i^l)^T p_j^{l+1}],

    and the gradient map `g(theta_{l,h}) = sum_i w_i grad_theta G(x_i^l; theta_{l,h})^T p_i^{l+1}
    = L H dLoss/dtheta_{l,h}`.

    With `geometry=mfattn.Sphere()` (docs/theory.md, section 10), every layer
    ends by mapping the tokens (and test particles) back onto the unit sphere,

        x^{l+1} = N(y^l),  y^l = x^l + (1/L) Gamma(x^l, mu^l; nu^l),  N(y) = y / |y|,

    and the adjoint goes back through the normalisation's Jacobian
    `J_N(y) = (I - n n^T) / |y|`, `n = N(y)`, then through the same attention
    pullback: with `q^l = J_N(y^l) p^{l+1}`,

        p^l = P_{x^l} [q^l + (1/L) b(x^l, mu^l; q^l)],
        g(theta_{l,h}) = sum_i w_i grad_theta G(x_i^l; theta_{l,h})^T q_i^l,

    `b` the bracket above evaluated at the cotangents `q` and `P_x = I - x x^T`.
    The input tokens and test particles are first mapped to the sphere,
    `x^0 = N(x_in)` (a no-op for unit inputs). The adjoints are tangent: `p^l`
    is the rescaled derivative of the loss along the sphere at `x^l` (the
    normal part of a gradient at a point that is renormalised next does not
    act), so that `ps[0] = (1/w) dLoss/dx_in` for unit inputs
    (`(1/(w |x_in|)) dLoss/dx_in` in general).

    **Arguments:**

    - `params`: an [`mfattn.AttentionParams`][] with leaves `(L, H, d, k)`.
    - `measure`: the input tokens, an [`mfattn.EmpiricalMeasure`][] with `(n, d)`
      points (`jax.vmap` over a batch of measures), in sequence order.
    - `loss`: an [`mfattn.AbstractLoss`][] of the terminal measure, or `None`
      for the forward pass only (then `ps`, `grads`, `loss` are `None`; any
      kernel that implements a forward pass is accepted).
    - `beta`: inverse temperature `> 0`.
    - `test_points`: optional `(m, d)` test particles `z`, carried by the field
      of the tokens without acting on it, with their own adjoint (the same
      backward formula evaluated at `z`; docs/theory.md, section 6).
    - `test_labels`: labels of the test particles for supervised losses.
    - `test_positions`: for a causal kernel, the sequence positions of the test
      particles, `(m,)` (default `n`: after the last token, they see all tokens).
    - `kernel`: the attention backend, an [`mfattn.AbstractAttentionKernel`][]
      (default [`mfattn.AutoKernel`][]`()`: dense up to 128 keys, chunked
      beyond; `DenseKernel(causal=True)` or `AutoKernel(causal=True)` for causal
      masking, docs/theory.md, section 8).
    - `chunk_size`, `mesh`: shortcuts for `kernel=ChunkedKernel(chunk_size)` and
      a [`mfattn.ShardedKernel`][] over `mesh` (see [`mfattn.AttentionField`][]).
    - `mlp`: MLP blocks, an [`mfattn.MLPParams`][] with one block per layer
      (leaves `(L, d, m)`, `(L, m)`, `(L, m, d)`), added to the attention in
      every residual step (docs/theory.md, section 9); `None` (default): none.
    - `activation`: the MLP's `sigma`: `"tanh"` (default), `"relu"`, `"gelu"`,
      `"linear"`, or an elementwise callable.
    - `residual_scaling`: [`mfattn.InverseDepth`][]`()` (default, the model
      above) or [`mfattn.InverseSqrtDepth`][]`()` (formerly `"1/sqrt(L)"`),
      `x^{l+1} = x^l + L^{-1/2} [Gamma + F]`, the regime whose limit with
      random per-layer parameters is the common-noise SDE of
      [`mfattn.solve_sde`][] (docs/theory.md, section 9).
    - `geometry`: [`mfattn.Euclidean`][]`()` (default, the model above) or
      [`mfattn.Sphere`][]`()` (the post-normalised transformer).
      `normalization="sphere"` is its deprecated spelling.

    **Returns:** a [`mfattn.Solution`][] with `xs`, `ps` of shape `(L+1, n, d)`,
    `grads` shaped like `params`, `loss`, and `test_xs`, `test_ps` when test
    points are given; with MLP blocks, `mlp_grads` (the MLP's gradient map,
    shaped like `mlp`). With either scaling, `grads` is the gradient map `g`:
    `dLoss/dtheta_{l,h} = (h / H) g(theta_{l,h})`, `h` the residual factor.

    **Raises:** `TypeError`/`ValueError` naming the argument for bad types or
    shapes, for no layers or heads (`L = 0`, `H = 0`) or no tokens; a NaN or
    inf in `params`, `test_points` or `test_labels`, a `beta` that overflows
    or underflows the working dtype, or (with `geometry=mfattn.Sphere()`) a
    zero token, raise naming the argument (`ValueError` for concrete values,
    `equinox.EquinoxRuntimeError` inside `jit`); a runtime error naming
    `solve_discrete` when its forward or adjoint states become NaN or inf.
    """
    vf, h, measure, test_points, test_labels, dtype = _setup(
        params,
        measure,
        loss,
        beta,
        test_points,
        test_labels,
        test_positions,
        kernel,
        chunk_size,
        mesh,
        mlp,
        activation,
        residual_scaling,
        normalization,
        geometry,
    )
    L = vf.path.num_nodes
    ts = jnp.arange(L + 1, dtype=dtype) / L
    forward_only = loss is None
    xs, zs, trace = euler_forward(vf, measure.points, test_points, h, keep=not forward_only)
    if forward_only:
        xs, zs = check_states_finite((xs, zs), (xs[-1], zs), None, "solve_discrete")
        return Solution(ts=ts, xs=xs, test_xs=zs)
    loss_value, p_last, pz_last = terminal_condition(
        loss, measure, xs[-1], None if zs is None else zs[-1], test_labels, dtype
    )
    p_last = vf.geometry.tangent(xs[-1], p_last)
    pz_last = None if zs is None else vf.geometry.tangent(zs[-1], pz_last)
    ps, pzs, (grads, mlp_grads) = euler_adjoint(vf, xs, zs, trace, p_last, pz_last, h)
    # one check: a non-finite state anywhere reaches the last forward state or the first adjoint
    outputs = (xs, zs, ps, pzs, grads, mlp_grads, loss_value)
    forward = (xs[-1], None if zs is None else zs[-1], loss_value)
    adjoint = (ps[0], None if pzs is None else pzs[0])
    outputs = check_states_finite(outputs, forward, adjoint, "solve_discrete")
    xs, zs, ps, pzs, grads, mlp_grads, loss_value = outputs
    return Solution(
        ts=ts,
        xs=xs,
        ps=ps,
        grads=grads,
        loss=loss_value,
        test_xs=zs,
        test_ps=pzs,
        mlp_grads=mlp_grads,
    )


@eqx.filter_jit
def discrete_loss(
    params: AttentionParams,
    measure: EmpiricalMeasure,
    loss: AbstractLoss,
    beta: BetaLike,
    chunk_size: int | None = None,
    mesh=None,
    *,
    kernel: AbstractAttentionKernel | None = None,
    mlp: MLPParams | None = None,
    activation: Activation = "tanh",
    residual_scaling: AbstractResidualScaling | str | None = None,
    geometry: AbstractGeometry | str | None = None,
    normalization: str | None = None,
):
    """`Loss(mu^L)` of the forward pass alone: the function that `jax.grad`
    differentiates in the tests (and that users can differentiate freely).
    `mlp`, `activation`, `residual_scaling`, `geometry` as in
    [`mfattn.solve_discrete`][] (with [`mfattn.Sphere`][], the inputs are
    mapped to the sphere first and every layer ends with `N(y) = y / |y|`)."""
    if not isinstance(loss, AbstractLoss):
        raise TypeError(f"`loss` must be an mfattn loss (AbstractLoss), got {type(loss).__name__}")
    vf, h, measure, _, _, _ = _setup(
        params,
        measure,
        loss,
        beta,
        None,
        None,
        None,
        kernel,
        chunk_size,
        mesh,
        mlp,
        activation,
        residual_scaling,
        normalization,
        geometry,
    )
    xs, _, _ = euler_forward(vf, measure.points, None, h, keep=False)
    return loss(measure.with_points(xs[-1]))


__all__ = ["solve_discrete", "discrete_loss"]
