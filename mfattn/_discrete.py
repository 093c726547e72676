"""The discrete transformer: explicit Euler steps of the attention vector field."""

import equinox as eqx
import jax.numpy as jnp
from jax import lax
from jaxtyping import ArrayLike, Float

from ._checks import as_float_array, check_finite_args
from ._custom_types import BetaLike
from ._field import AttentionField
from ._kernels import AbstractAttentionKernel
from ._loss import AbstractLoss, terminal_condition
from ._measure import EmpiricalMeasure
from ._mlp import Activation, MLPParams
from ._params import AttentionParams
from ._path import ParamPath
from ._solution import Solution
from ._sphere import check_normalization, normalize, project_tangent
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


def _check_normalization(normalization, mlp, residual_scaling) -> bool:
    """Whether the model is post-normalised; `ValueError` for what it does not support."""
    if check_normalization(normalization) is None:
        return False
    if mlp is not None or residual_scaling != "1/L":
        raise ValueError(
            "`normalization='sphere'` is not implemented with `mlp` blocks or "
            "`residual_scaling='1/sqrt(L)'`"
        )
    return True


def _step(x, v, dt):
    """The residual step `x + dt v` (no radii)."""
    return x + dt * v, None


def _normalized_step(x, v, dt):
    """The post-normalised step `N(x + dt v)` and the radii `|x + dt v|` (n, 1)."""
    return normalize(x + dt * v)


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

    With `normalization="sphere"` (docs/theory.md, section 10), every layer
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
    - `normalization`: `None` (default, the model above) or `"sphere"` (the
      post-normalised transformer; not with `mlp` or `"1/sqrt(L)"`).

    **Returns:** a [`mfattn.Solution`][] with `xs`, `ps` of shape `(L+1, n, d)`,
    `grads` shaped like `params`, `loss`, and `test_xs`, `test_ps` when test
    points are given; with MLP blocks, `mlp_grads` (the MLP's gradient map,
    shaped like `mlp`). With either scaling, `grads` is the gradient map `g`:
    `dLoss/dtheta_{l,h} = (h / H) g(theta_{l,h})`, `h` the residual factor.

    **Raises:** `ValueError` for a bad `normalization`, or `"sphere"` with `mlp`
    or `residual_scaling="1/sqrt(L)"`.
    """
    sphere = _check_normalization(normalization, mlp, residual_scaling)
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
    if sphere:
        measure = measure.with_points(normalize(measure.points)[0])
        test_points = None if test_points is None else normalize(test_points)[0]
    vf = _discrete_vector_field(params, measure, beta, kernel, chunk_size, mesh, test_positions)
    dt = 1.0 / L
    nodes = vf.path.times
    step = _normalized_step if sphere else _step

    def euler_step(carry, node):
        x, z = carry
        t, layer = node
        vx, vz, cache = vf.velocity(t, x, z, layer=layer, return_cache=True)
        x_next, rx = step(x, vx, dt)
        z_next, rz = (None, None) if z is None else step(z, vz, dt)
        return (x_next, z_next), (x, z, rx, rz, cache)

    # the kernel outputs of every layer (O(n) memory for the default kernels)
    # are kept for the adjoint pass, which then needs one pass over the keys
    (x_last, z_last), (xs, zs, rxs, rzs, caches) = lax.scan(
        euler_step, (measure.points, test_points), (nodes, params)
    )
    xs = jnp.concatenate([xs, x_last[None]], axis=0)
    zs = None if z_last is None else jnp.concatenate([zs, z_last[None]], axis=0)

    loss_value, p_last, pz_last = terminal_condition(
        loss, measure, x_last, z_last, test_labels, dtype
    )
    if sphere:  # tangent adjoints (the normal part meets J_N and does not act)
        p_last = project_tangent(x_last, p_last)
        pz_last = None if z_last is None else project_tangent(z_last, pz_last)

    def adjoint_step(carry, inputs):
        p, pz = carry
        t, x, z, rx, rz, layer, cache = inputs
        if sphere:  # through N: J_N(y)^T p = P_{N(y)} p / |y| = p / |y| for tangent p
            q, qz = p / rx, (None if pz is None else pz / rz)
        else:
            q, qz = p, pz
        b, bz, g = vf.adjoint(t, x, z, q, qz, layer=layer, cache=cache)
        p_prev = q + dt * b
        pz_prev = None if pz is None else qz + dt * bz
        if sphere:
            p_prev = project_tangent(x, p_prev)
            pz_prev = None if pz is None else project_tangent(z, pz_prev)
        return (p_prev, pz_prev), (p, pz, g)

    (p_first, pz_first), (ps_next, pzs_next, grads) = lax.scan(
        adjoint_step,
        (p_last, pz_last),
        (nodes, xs[:-1], None if zs is None else zs[:-1], rxs, rzs, params, caches),
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
    normalization: str | None = None,
):
    """`Loss(mu^L)` of the forward pass alone: the function that `jax.grad`
    differentiates in the tests (and that users can differentiate freely).
    `mlp`, `activation`, `residual_scaling`, `normalization` as in
    [`mfattn.solve_discrete`][] (with `"sphere"`, the inputs are mapped to the
    sphere first and every layer ends with `N(y) = y / |y|`)."""
    sphere = _check_normalization(normalization, mlp, residual_scaling)
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
    if sphere:
        measure = measure.with_points(normalize(measure.points)[0])
    vf = _discrete_vector_field(params, measure, beta, kernel, chunk_size, mesh, None)
    dt = 1.0 / params.depth
    step = _normalized_step if sphere else _step

    def euler_step(x, node):
        t, layer = node
        vx, _ = vf.velocity(t, x, layer=layer)
        return step(x, vx, dt)[0], None

    x_last, _ = lax.scan(euler_step, measure.points, (vf.path.times, params))
    return loss(measure.with_points(x_last))


__all__ = ["solve_discrete", "discrete_loss"]
