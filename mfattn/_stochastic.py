"""The discrete transformer with MLP blocks and a residual scaled by `1/L` or
`1/sqrt(L)` (docs/theory.md, section 9), with its closed-form adjoint."""

import equinox as eqx
import jax.numpy as jnp
from jax import lax

from ._field import AttentionField
from ._loss import AbstractLoss, terminal_condition
from ._measure import EmpiricalMeasure
from ._mlp import Activation, MLPParams, mlp_backward, mlp_forward, resolve_activation
from ._params import AttentionParams
from ._solution import Solution

RESIDUAL_SCALINGS = ("1/L", "1/sqrt(L)")


def residual_step(depth: int, residual_scaling: str) -> float:
    """The residual factor `h` of `x^{l+1} = x^l + h (Gamma + F)`: `1/L` or `1/sqrt(L)`."""
    if residual_scaling not in RESIDUAL_SCALINGS:
        raise ValueError(
            f"`residual_scaling` must be one of {RESIDUAL_SCALINGS}, got {residual_scaling!r}"
        )
    return 1.0 / depth if residual_scaling == "1/L" else float(depth) ** -0.5


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


def _cast(measure, test_points, params, mlp):
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


@eqx.filter_jit
def solve_stochastic_discrete(
    params: AttentionParams,
    measure: EmpiricalMeasure,
    loss: AbstractLoss,
    beta,
    test_points=None,
    *,
    test_labels=None,
    test_positions=None,
    mlp: MLPParams | None = None,
    activation: Activation = "tanh",
    residual_scaling: str = "1/sqrt(L)",
    kernel=None,
    chunk_size: int | None = None,
    mesh=None,
) -> Solution:
    """The `L`-layer transformer with attention and MLP blocks,

        x_i^{l+1} = x_i^l + h [Gamma(x_i^l, mu^l; nu^l) + F(x_i^l; phi_l)],
        h = 1/L or 1/sqrt(L),

    and its exact adjoint in closed form,

        p_i^l = p_i^{l+1} + h [grad_x Gamma(x_i^l)^T p_i^{l+1}
                               + sum_j w_j d_mu Gamma(x_j^l)(x_i^l)^T p_j^{l+1}
                               + grad_x F(x_i^l; phi_l)^T p_i^{l+1}].

    The gradient maps are those of the `1/L` model: `g(theta_{l,h})` for every
    head and `g(phi_l) = sum_i w_i grad_phi F(x_i^l; phi_l)^T p_i^{l+1}` for
    every block, so that `dLoss/dtheta_{l,h} = (h / H) g(theta_{l,h})` and
    `dLoss/dphi_l = h g(phi_l)` (docs/theory.md, section 9). Called by
    [`mfattn.solve_discrete`][] when `mlp` or `residual_scaling` is given; the
    arguments are those of `solve_discrete` (see there) plus

    - `mlp`: an [`mfattn.MLPParams`][] with one block per layer, or `None`.
    - `activation`: the MLP's `sigma`, a name (`"tanh"`, `"relu"`, `"gelu"`,
      `"linear"`) or an elementwise callable.
    - `residual_scaling`: `"1/L"` or `"1/sqrt(L)"`.

    **Returns:** a [`mfattn.Solution`][] whose `grads` is the attention
    gradient map and `mlp_grads` the MLP's (`None` without MLP blocks).
    """
    from ._discrete import check_model_inputs  # the checks shared with solve_discrete

    params, test_points, test_labels = check_model_inputs(
        params, measure, loss, test_points, test_labels
    )
    check_mlp(mlp, params, activation)
    L = params.depth
    h = residual_step(L, residual_scaling)
    measure, test_points, dtype = _cast(measure, test_points, params, mlp)
    field = AttentionField(beta, kernel, mesh, chunk_size=chunk_size)
    w = measure.weights

    def forward_step(carry, layer):
        x, z = carry
        theta, phi = layer
        vx, vz, cache = field.forward(
            measure.with_points(x), theta, z, return_cache=True, test_positions=test_positions
        )
        if phi is not None:
            vx = vx + mlp_forward(phi, x, activation)
            vz = None if z is None else vz + mlp_forward(phi, z, activation)
        z_next = None if z is None else z + h * vz
        return (x + h * vx, z_next), (x, z, cache)

    (x_last, z_last), (xs, zs, caches) = lax.scan(
        forward_step, (measure.points, test_points), (params, mlp)
    )
    xs = jnp.concatenate([xs, x_last[None]], axis=0)
    zs = None if z_last is None else jnp.concatenate([zs, z_last[None]], axis=0)

    loss_value, p_last, pz_last = terminal_condition(
        loss, measure, x_last, z_last, test_labels, dtype
    )

    def adjoint_step(carry, inputs):
        p, pz = carry
        x, z, theta, phi, cache = inputs
        b, bz, g = field.backward(
            measure.with_points(x), theta, p, z, pz, cache, test_positions=test_positions
        )
        g_phi = None
        if phi is not None:
            bx_mlp, g_phi = mlp_backward(phi, x, p, w, activation)
            b = b + bx_mlp
            if z is not None:
                bz = bz + mlp_backward(phi, z, pz, None, activation)[0]
        pz_prev = None if pz is None else pz + h * bz
        return (p + h * b, pz_prev), (p, pz, g, g_phi)

    (p_first, pz_first), (ps_next, pzs_next, grads, mlp_grads) = lax.scan(
        adjoint_step,
        (p_last, pz_last),
        (xs[:-1], None if zs is None else zs[:-1], params, mlp, caches),
        reverse=True,
    )
    ps = jnp.concatenate([p_first[None], ps_next], axis=0)
    pzs = None if pz_first is None else jnp.concatenate([pz_first[None], pzs_next], axis=0)
    ts = jnp.arange(L + 1, dtype=dtype) / L
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
def stochastic_discrete_loss(
    params: AttentionParams,
    measure: EmpiricalMeasure,
    loss: AbstractLoss,
    beta,
    *,
    mlp: MLPParams | None = None,
    activation: Activation = "tanh",
    residual_scaling: str = "1/sqrt(L)",
    kernel=None,
    chunk_size: int | None = None,
    mesh=None,
):
    """`Loss(mu^L)` of the forward pass of
    [`mfattn._stochastic.solve_stochastic_discrete`][] alone (differentiable
    by `jax.grad`); called by [`mfattn.discrete_loss`][]."""
    from ._discrete import check_model_inputs

    params, _, _ = check_model_inputs(params, measure, loss, None, None)
    check_mlp(mlp, params, activation)
    h = residual_step(params.depth, residual_scaling)
    field = AttentionField(beta, kernel, mesh, chunk_size=chunk_size)

    def step(x, layer):
        theta, phi = layer
        vx, _ = field.forward(measure.with_points(x), theta)
        if phi is not None:
            vx = vx + mlp_forward(phi, x, activation)
        return x + h * vx, None

    x_last, _ = lax.scan(step, measure.points, (params, mlp))
    return loss(measure.with_points(x_last))
