"""Probe outputs: the flow map of query points carried by a token measure, and
the gradient map of a linear functional of it (docs/theory.md, section 12).

A probe `z` is a query particle that attends to the tokens at every depth,

    z^{l+1} = z^l + (1/L) Gamma(z^l, mu^l; nu^l)      (discrete model)
    dz/dt   = Gamma(z, mu_t; nu_t)                     (the limit),

without acting on them (a test particle, docs/theory.md, section 6). Its
terminal state `Phi_mu(z) = z(1)` is the model's *output* on the measure `mu`
in the tangent kernel and in [`mfattn.ProbeRisk`][]. Its parameter derivative
needs, besides the probe's own adjoint, the adjoint of the tokens *driven by
the probe* (the probe reads the tokens, which the parameters move): with the
cotangent `q = c` at the terminal time and token adjoints `p = 0` there,

    q^l = q^{l+1} + (1/L) grad_x Gamma(z^l)^T q^{l+1}
    p_i^l = p_i^{l+1} + (1/L) [ grad_x Gamma(x_i^l)^T p_i^{l+1}
                                + sum_j w_j d_mu Gamma(x_j^l)(x_i^l)^T p_j^{l+1}
                                + sum_k d_mu Gamma(z_k^l)(x_i^l)^T q_k^{l+1} ]
    g(theta, l) = sum_i w_i grad_theta G(x_i^l; theta)^T p_i^{l+1}
                  + sum_k grad_theta G(z_k^l; theta)^T q_k^{l+1},

and `g(theta_{l,h}, l) = L H d<c, Phi>/dtheta_{l,h}` (the gradient map of
docs/theory.md, section 4, for the output `<c, Phi>`). The limit integrates
the same brackets backwards with Diffrax. A probe is a query of weight 1 and
key weight 0: every term is the field's one closed-form pullback
([`mfattn.AttentionField.backward`][] with `probes=True`), stepped by the
discrete model's Euler scan or the limit's Diffrax adjoint; a causal kernel
places the probes after the last token (they see every
token).
"""

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._checks import check_finite_args
from ._discrete import discrete_vector_field
from ._euler import euler_adjoint, euler_forward
from ._limit import finite
from ._measure import EmpiricalMeasure, check_measure
from ._model import AbstractModel, DiscreteTransformer, MeanFieldTransformer
from ._params import AttentionParams
from ._residual import InverseDepth


class ProbeSolution(eqx.Module):
    """What [`mfattn.probe_gradient`][] returns.

    **Fields:**

    - `outputs`: the probes' terminal states `Phi_mu(z)`, `(m, d)`.
    - `grads`: the gradient map of `<c, Phi_mu(z)>` at every depth node, an
      [`mfattn.AttentionParams`][] shaped like the model's parameters
      (`L H d<c, Phi>/dtheta` for the discrete model, `g(theta^m(t_j), t_j)` at
      the grid nodes for the limit).
    """

    outputs: Float[Array, "m d"]
    grads: AttentionParams


def _check(model, measure, probes):
    if not isinstance(model, AbstractModel):
        raise TypeError(f"`model` must be an mfattn model, got {type(model).__name__}")
    if model.normalization is not None:
        raise ValueError(
            "probes (probe_outputs, probe_gradient, tangent_kernel, ProbeRisk) are not "
            "implemented on the sphere (`geometry=Sphere()`)"
        )
    if not isinstance(getattr(model, "residual_scaling", InverseDepth()), InverseDepth):
        raise ValueError("probes are implemented for the `1/L` residual scaling only")
    check_measure(measure)
    probes = jnp.asarray(probes)
    if probes.ndim != 2 or probes.shape[1] != measure.dim:
        raise ValueError(f"`probes` must be (m, d={measure.dim}), got shape {probes.shape}")
    if model.params.dim != measure.dim:
        raise ValueError(
            f"the model has token dimension {model.params.dim}, `measure` has {measure.dim}"
        )
    dtype = jnp.result_type(measure.points.dtype, model.params.dtype, probes.dtype)
    measure = eqx.tree_at(
        lambda m: (m.points, m.weights),
        measure,
        (measure.points.astype(dtype), measure.weights.astype(dtype)),
    )
    # one check of the probes and the model's parameters, threaded through the probes
    _, probes = check_finite_args(params=model.params, probes=probes.astype(dtype))
    return measure, probes


def _cotangent(cotangent, z_last):
    q = cotangent(z_last) if callable(cotangent) else cotangent
    return jnp.broadcast_to(jnp.asarray(q, z_last.dtype), z_last.shape)


def _discrete(model, measure, probes, cotangent):
    vf = discrete_vector_field(model.params, measure, model.field, probes=True)
    h = 1.0 / model.params.depth
    xs, zs, trace = euler_forward(vf, measure.points, probes, h)
    p_last = jnp.zeros_like(xs[-1])
    _, _, (grads, _) = euler_adjoint(vf, xs, zs, trace, p_last, _cotangent(cotangent, zs[-1]), h)
    return ProbeSolution(zs[-1], grads)


def _limit(model, measure, probes, cotangent):
    prob = model.problem(measure, test_points=probes, probes=True)
    fwd = prob.forward(diffrax.SaveAt(t1=True, dense=True), name="the probes' forward solve")
    X1, Z1 = finite((fwd.ys[0][-1], fwd.ys[1][-1]), "the probes' forward solve")
    bwd = prob.backward(
        fwd, jnp.zeros_like(X1), _cotangent(cotangent, Z1), name="the probes' adjoint solve"
    )
    return ProbeSolution(Z1, prob.node_grads(fwd, bwd))


@eqx.filter_jit
def probe_gradient(
    model: AbstractModel,
    measure: EmpiricalMeasure,
    probes: Float[Array, "m d"],
    cotangent: Float[Array, "m d"] | Callable,
) -> ProbeSolution:
    """The probes' terminal states `Phi_mu(z)` and the gradient map of the output
    `<c, Phi_mu(z)>` at every depth node, by the closed-form adjoint of the
    probes and of the tokens they read (docs/theory.md, section 12).

    **Arguments:**

    - `model`: a [`mfattn.DiscreteTransformer`][] (explicit Euler, exact
      adjoint recursion) or a [`mfattn.MeanFieldTransformer`][] (Diffrax
      forward and backward with the model's solver and controller; the gradient map is
      evaluated at the grid nodes, as `solve` does).
    - `measure`: the tokens, an [`mfattn.EmpiricalMeasure`][] with `(n, d)`
      points (`jax.vmap` over a batch of measures).
    - `probes`: the probes' initial positions `z`, `(m, d)`; they attend to the
      tokens and do not act on them.
    - `cotangent`: `c`, `(m, d)`, or a function of the terminal states
      `Phi (m, d) -> c` (e.g. `lambda phi: phi - targets` for the squared error).

    **Returns:** a [`mfattn.ProbeSolution`][]. For the discrete model
    `grads = L H d<c, Phi>/dtheta`, exactly (tested against `jax.jacrev`).

    **Raises:** `TypeError`/`ValueError` for a model that is not an mfattn
    model, or shapes that do not match.
    """
    measure, probes = _check(model, measure, probes)
    if isinstance(model, DiscreteTransformer):
        return _discrete(model, measure, probes, cotangent)
    if isinstance(model, MeanFieldTransformer):
        return _limit(model, measure, probes, cotangent)
    raise TypeError(f"probe outputs are implemented for the two mfattn models, not {type(model)}")


@eqx.filter_jit
def probe_outputs(
    model: AbstractModel, measure: EmpiricalMeasure, probes: Float[Array, "m d"]
) -> Float[Array, "m d"]:
    """The probes' terminal states `Phi_mu(z)`, `(m, d)` (forward only;
    `jax.vmap` over a batch of measures): `model(measure, test_points=probes)`
    at the last depth (a probe moves as a test particle)."""
    measure, probes = _check(model, measure, probes)
    return model(measure, test_points=probes).test_xs[-1]


__all__ = ["ProbeSolution", "probe_gradient", "probe_outputs", "jax"]
