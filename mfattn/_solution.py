"""The solution type shared by the discrete model and the continuous limit."""

import equinox as eqx
from jaxtyping import Array, Float

from ._mlp import MLPParams
from ._params import AttentionParams


class Solution(eqx.Module):
    """Forward states, rescaled adjoints and gradient map of one model on one
    token measure. `solve_discrete` and `solve_limit` both return it, so that
    downstream code treats both models alike.

    **Fields:**

    - `ts`: times of the saved states, `(S,)`; `l / L` for the discrete model,
      the depth-grid nodes (or requested times) for the limit.
    - `xs`: token states `(S, n, d)`; `xs[l]` is `x^l` (discrete) or `x(t_l)`.
    - `ps`: rescaled adjoints `p = (1/w) dLoss/dx`, `(S, n, d)` (docs/theory.md, section 4).
    - `grads`: the gradient map as an [`mfattn.AttentionParams`][] shaped like the
      parameters; for the discrete model `L * H * dLoss/dtheta_{l,h}`, for the
      limit `g(theta^m(t_j), t_j)` at every grid node.
    - `loss`: `Loss(mu^L)` (scalar).

    A forward-only solve (`model(measure)`, `solve_discrete(..., loss=None)`)
    returns `ts`, `xs` (and `test_xs`) with `ps`, `grads`, `loss` set to `None`.
    - `test_xs`, `test_ps`: states and adjoints of test particles `(S, m, d)`,
      or `None` when no test points were given.
    - `stats`: solver statistics (the limit: Diffrax's step counts), else `{}`.
    - `result`: with `throw=False`, the `diffrax.RESULTS` of the solves (the
      first failure, or `successful`); else `None`.
    - `mlp_grads`: for a discrete model with MLP blocks, their gradient map
      `g(phi_l) = sum_i w_i grad_phi F(x_i^l; phi_l)^T p_i^{l+1}` as an
      [`mfattn.MLPParams`][] shaped like the blocks; else `None`.
    """

    ts: Float[Array, " S"]
    xs: Float[Array, "S n d"]
    ps: Float[Array, "S n d"] | None = None
    grads: AttentionParams | None = None
    loss: Float[Array, ""] | None = None
    test_xs: Float[Array, "S m d"] | None = None
    test_ps: Float[Array, "S m d"] | None = None
    stats: dict = eqx.field(default_factory=dict)
    mlp_grads: MLPParams | None = None
    result: object = None
