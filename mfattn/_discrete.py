"""The discrete transformer: explicit Euler steps of the attention vector field."""

import equinox as eqx
import jax.numpy as jnp
from jax import lax
from jaxtyping import ArrayLike, Float

from ._checks import as_float_array, check_finite_args
from ._custom_types import BetaLike
from ._field import AttentionField
from ._kernels import AbstractAttentionKernel
from ._loss import AbstractLoss
from ._measure import EmpiricalMeasure
from ._mlp import Activation, MLPParams
from ._params import AttentionParams
from ._path import ParamPath
from ._solution import Solution
from ._stochastic import solve_stochastic_discrete, stochastic_discrete_loss
from ._vector_field import AttentionVectorField


def check_model_inputs(params, measure, loss, test_points, test_labels, name="params"):
    """Shared checks of `solve_discrete` and `solve_limit`: types and shapes at
    trace time, finite values of `params`, `test_points` and `test_labels`
    (through `eqx.error_if` when traced). Returns the checked
    `(params, test_points, test_labels)`, which callers must use."""
    if not isinstance(params, AttentionParams):
        raise TypeError(f"`{name}` must be an AttentionParams, got {type(params).__name__}")
    if params.Q.ndim != 4:
        raise ValueError(f"`{name}` must have leaves of shape (L, H, d, k), got {params.Q.shape}")
    if not isinstance(measure, EmpiricalMeasure):
        raise TypeError(f"`measure` must be an EmpiricalMeasure, got {type(measure).__name__}")
    if measure.points.ndim != 2:
        raise ValueError(
            f"`measure.points` must be (n, d), got {measure.points.shape}; use "
            "`jax.vmap` for a batch of measures"
        )
    if params.dim != measure.dim:
        raise ValueError(
            f"`{name}` has token dimension d={params.dim} but `measure` has d={measure.dim}"
        )
    if not isinstance(loss, AbstractLoss):
        raise TypeError(f"`loss` must be an mfattn loss (AbstractLoss), got {type(loss).__name__}")
    if test_points is not None:
        test_points = as_float_array(test_points, "test_points", ndim=2)
        if test_points.shape[1] != measure.dim:
            raise ValueError(
                f"`test_points` has dimension {test_points.shape[1]}, expected d={measure.dim}"
            )
        if test_labels is not None:
            test_labels = as_float_array(test_labels, "test_labels", ndim=2)
    elif test_labels is not None:
        raise ValueError("`test_labels` given without `test_points`")
    checked = check_finite_args(**{name: params}, test_points=test_points, test_labels=test_labels)
    return checked[0], checked[1], checked[2]


def _discrete_vector_field(params, measure, beta, kernel, chunk_size, mesh, test_positions):
    """The vector field of the `L`-layer model: the field on the
    piecewise-constant path whose `J = L` nodes are the layers."""
    field = AttentionField(beta, kernel, mesh, chunk_size=chunk_size)
    path = ParamPath(params, interpolation="constant")
    return AttentionVectorField(field, path, measure, test_positions)


@eqx.filter_jit
def solve_discrete(
    params: AttentionParams,
    measure: EmpiricalMeasure,
    loss: AbstractLoss,
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
    residual_scaling: str = "1/L",
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

    **Arguments:**

    - `params`: an [`mfattn.AttentionParams`][] with leaves `(L, H, d, k)`.
    - `measure`: the input tokens, an [`mfattn.EmpiricalMeasure`][] with `(n, d)`
      points (`jax.vmap` over a batch of measures), in sequence order.
    - `loss`: an [`mfattn.AbstractLoss`][] of the terminal measure.
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
    - `residual_scaling`: `"1/L"` (default, the model above) or `"1/sqrt(L)"`,
      `x^{l+1} = x^l + L^{-1/2} [Gamma + F]`, the regime whose limit with
      random per-layer parameters is the common-noise SDE of
      [`mfattn.solve_sde`][] (docs/theory.md, section 9).

    **Returns:** a [`mfattn.Solution`][] with `xs`, `ps` of shape `(L+1, n, d)`,
    `grads` shaped like `params`, `loss`, and `test_xs`, `test_ps` when test
    points are given; with MLP blocks, `mlp_grads` (the MLP's gradient map,
    shaped like `mlp`). With either scaling, `grads` is the gradient map `g`:
    `dLoss/dtheta_{l,h} = (h / H) g(theta_{l,h})`, `h` the residual factor.
    """
    if mlp is not None or residual_scaling != "1/L":
        return solve_stochastic_discrete(
            params,
            measure,
            loss,
            beta,
            test_points,
            test_labels=test_labels,
            test_positions=test_positions,
            mlp=mlp,
            activation=activation,
            residual_scaling=residual_scaling,
            kernel=kernel,
            chunk_size=chunk_size,
            mesh=mesh,
        )
    params, test_points, test_labels = check_model_inputs(
        params, measure, loss, test_points, test_labels
    )
    L = params.depth
    dtype = jnp.result_type(measure.points.dtype, params.dtype)
    measure = eqx.tree_at(
        lambda m: (m.points, m.weights),
        measure,
        (measure.points.astype(dtype), measure.weights.astype(dtype)),
    )
    if test_points is not None:
        test_points = test_points.astype(dtype)
    vf = _discrete_vector_field(params, measure, beta, kernel, chunk_size, mesh, test_positions)
    dt = 1.0 / L
    nodes = vf.path.times

    def euler_step(carry, node):
        x, z = carry
        t, layer = node
        vx, vz, cache = vf.velocity(t, x, z, layer=layer, return_cache=True)
        z_next = None if z is None else z + dt * vz
        return (x + dt * vx, z_next), (x, z, cache)

    # the kernel outputs of every layer (O(n) memory for the default kernels)
    # are kept for the adjoint pass, which then needs one pass over the keys
    (x_last, z_last), (xs, zs, caches) = lax.scan(
        euler_step, (measure.points, test_points), (nodes, params)
    )
    xs = jnp.concatenate([xs, x_last[None]], axis=0)
    zs = None if z_last is None else jnp.concatenate([zs, z_last[None]], axis=0)

    terminal = measure.with_points(x_last)
    loss_value = loss(terminal)
    p_last = loss.lions_derivative(terminal).astype(dtype)
    pz_last = None
    if z_last is not None:
        pz_last = loss.lions_derivative(terminal, z_last, test_labels).astype(dtype)

    def adjoint_step(carry, inputs):
        p, pz = carry
        t, x, z, layer, cache = inputs
        b, bz, g = vf.adjoint(t, x, z, p, pz, layer=layer, cache=cache)
        pz_prev = None if pz is None else pz + dt * bz
        return (p + dt * b, pz_prev), (p, pz, g)

    (p_first, pz_first), (ps_next, pzs_next, grads) = lax.scan(
        adjoint_step,
        (p_last, pz_last),
        (nodes, xs[:-1], None if zs is None else zs[:-1], params, caches),
        reverse=True,
    )
    ps = jnp.concatenate([p_first[None], ps_next], axis=0)
    pzs = None if pz_first is None else jnp.concatenate([pz_first[None], pzs_next], axis=0)
    ts = jnp.arange(L + 1, dtype=dtype) / L
    return Solution(ts=ts, xs=xs, ps=ps, grads=grads, loss=loss_value, test_xs=zs, test_ps=pzs)


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
    residual_scaling: str = "1/L",
):
    """`Loss(mu^L)` of the forward pass alone: the function that `jax.grad`
    differentiates in the tests (and that users can differentiate freely).
    `mlp`, `activation`, `residual_scaling` as in [`mfattn.solve_discrete`][]."""
    if mlp is not None or residual_scaling != "1/L":
        return stochastic_discrete_loss(
            params,
            measure,
            loss,
            beta,
            mlp=mlp,
            activation=activation,
            residual_scaling=residual_scaling,
            kernel=kernel,
            chunk_size=chunk_size,
            mesh=mesh,
        )
    params, _, _ = check_model_inputs(params, measure, loss, None, None)
    vf = _discrete_vector_field(params, measure, beta, kernel, chunk_size, mesh, None)
    dt = 1.0 / params.depth

    def euler_step(x, node):
        t, layer = node
        vx, _ = vf.velocity(t, x, layer=layer)
        return x + dt * vx, None

    x_last, _ = lax.scan(euler_step, measure.points, (vf.path.times, params))
    return loss(measure.with_points(x_last))


__all__ = ["solve_discrete", "discrete_loss"]
