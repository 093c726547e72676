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
the same brackets backwards with Diffrax. Every term is a closed form of
the model's attention kernel ([`mfattn.AbstractAttentionKernel`][], `backward`
with query weights `w` for the tokens and `1` for the probes), one pullback per
depth; a causal kernel places the probes after the last token (they see every
token).
"""

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from ._field import AttentionField
from ._measure import EmpiricalMeasure
from ._model import AbstractModel, DiscreteTransformer, MeanFieldTransformer
from ._params import AttentionParams
from ._path import ParamPath


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


def _trusted_measure(points, weights):
    m = object.__new__(EmpiricalMeasure)  # inside the solver: no re-checks
    object.__setattr__(m, "points", points)
    object.__setattr__(m, "weights", weights)
    return m


def _probe_terms(field, measure, layer, P, q, z):
    """The brackets of one depth, `(b_tokens (n, d), b_probes (m, d), grads)`, by
    one closed-form pullback through the field's kernel: queries are the atoms
    (weights `w`, cotangents `P`) and the probes (weight 1, cotangents `q`), keys
    the atoms only. The probes' bracket is the query side alone: they carry no
    mass, so no Lions term acts on them (unlike the test particles of
    [`mfattn.solve_discrete`][], whose adjoint is the adjoint function `p(t, z)`)."""
    x, w = measure.points, measure.weights
    n, m = x.shape[0], z.shape[0]
    o, aux = field.forward(measure, layer, z, return_cache=True)[2]
    pts = jnp.concatenate([x, z], axis=0)
    u = jnp.concatenate([w, jnp.ones((m,), w.dtype)])
    C = jnp.concatenate([P, q], axis=0)
    qh = jnp.einsum("md,hdk->hmk", pts, layer.Q)
    kh = jnp.einsum("nd,hdk->hnk", x, layer.K)
    vh = jnp.einsum("nd,hdk->hnk", x, layer.V)
    c = jnp.einsum("hdk,md->hmk", layer.O, C)
    qpos = kpos = None
    if field.kernel.causal:  # the probes sit after the last token: they see every token
        kpos = jnp.arange(n)
        qpos = jnp.concatenate([kpos, jnp.full((m,), n, kpos.dtype)])
    dq, dk, dv = field.kernel.backward(qh, kh, vh, w, o, aux, c, u, field.beta, qpos, kpos)
    H = layer.heads
    query_side = jnp.einsum("hdk,hmk->md", layer.Q, dq) / H
    key_side = (jnp.einsum("hdk,hnk->nd", layer.K, dk) + jnp.einsum("hdk,hnk->nd", layer.V, dv)) / H
    grads = AttentionParams(
        Q=jnp.einsum("m,md,hmk->hdk", u, pts, dq),
        K=jnp.einsum("n,nd,hnk->hdk", w, x, dk),
        V=jnp.einsum("n,nd,hnk->hdk", w, x, dv),
        O=jnp.einsum("m,md,hmk->hdk", u, C, o),
    )
    return query_side[:n] + key_side, query_side[n:], grads


def _model_field(model):
    """The attention field of `model`, with its kernel."""
    return AttentionField(model.beta, model.kernel, model.mesh, chunk_size=model.chunk_size)


def _check(model, measure, probes):
    if not isinstance(model, AbstractModel):
        raise TypeError(f"`model` must be an mfattn model, got {type(model).__name__}")
    if getattr(model, "normalization", None) is not None:
        raise ValueError(
            "probes (probe_outputs, probe_gradient, tangent_kernel, ProbeRisk) are not "
            f"implemented for `normalization={model.normalization!r}`"
        )
    if not isinstance(measure, EmpiricalMeasure):
        raise TypeError(f"`measure` must be an EmpiricalMeasure, got {type(measure).__name__}")
    if measure.points.ndim != 2:
        raise ValueError(
            f"`measure.points` must be (n, d), got {measure.points.shape}; use `jax.vmap` "
            "over a batch of measures"
        )
    probes = jnp.asarray(probes)
    if probes.ndim != 2 or probes.shape[1] != measure.dim:
        raise ValueError(f"`probes` must be (m, d={measure.dim}), got shape {probes.shape}")
    if model.params.dim != measure.dim:
        raise ValueError(
            f"the model has token dimension {model.params.dim}, `measure` has {measure.dim}"
        )
    dtype = jnp.result_type(measure.points.dtype, model.params.dtype, probes.dtype)
    measure = _trusted_measure(measure.points.astype(dtype), measure.weights.astype(dtype))
    return measure, probes.astype(dtype)


# --------------------------------------------------------------- discrete model
def _discrete(model, measure, probes, cotangent):
    field = _model_field(model)
    params = model.params
    dt = 1.0 / params.depth

    def step(carry, layer):
        x, z = carry
        vx, vz = field.forward(measure.with_points(x), layer, z)
        return (x + dt * vx, z + dt * vz), (x, z)

    (_, z_last), (xs, zs) = lax.scan(step, (measure.points, probes), params)
    q_last = cotangent(z_last) if callable(cotangent) else cotangent
    q_last = jnp.broadcast_to(jnp.asarray(q_last, z_last.dtype), z_last.shape)

    def adjoint_step(carry, inputs):
        P, q = carry
        x, z, layer = inputs
        b, bz, g = _probe_terms(field, measure.with_points(x), layer, P, q, z)
        return (P + dt * b, q + dt * bz), g

    _, grads = lax.scan(
        adjoint_step, (jnp.zeros_like(measure.points), q_last), (xs, zs, params), reverse=True
    )
    return ProbeSolution(z_last, grads)


# ------------------------------------------------------------------ the limit
class _ProbeForward(eqx.Module):
    field: AttentionField
    path: ParamPath
    weights: Array

    def __call__(self, t, y, args):
        X, Z = y
        return self.field.forward(_trusted_measure(X, self.weights), self.path(t), Z)


class _ProbeAdjoint(eqx.Module):
    field: AttentionField
    path: ParamPath
    weights: Array
    forward: diffrax.Solution

    def __call__(self, t, y, args):
        P, q = y
        X, Z = self.forward.evaluate(t)
        measure = _trusted_measure(X, self.weights)
        b, bz, _ = _probe_terms(self.field, measure, self.path(t), P, q, Z)
        return -b, -bz


def _controller(model, path):
    pid = diffrax.PIDController(rtol=model.rtol, atol=model.atol)
    jumps = path.breakpoints()
    if jumps.shape[0] == 0:
        return pid
    return diffrax.ClipStepSizeController(pid, jump_ts=jumps)


def _limit_forward(model, measure, probes):
    path = ParamPath(model.params, model.times, model.interpolation)
    field = _model_field(model)
    controller = _controller(model, path)
    fwd = diffrax.diffeqsolve(
        diffrax.ODETerm(_ProbeForward(field, path, measure.weights)),
        diffrax.Tsit5(),
        0.0,
        1.0,
        None,
        (measure.points, probes),
        saveat=diffrax.SaveAt(t1=True, dense=True),
        stepsize_controller=controller,
        max_steps=model.max_steps,
    )
    return path, field, controller, fwd


def _limit(model, measure, probes, cotangent, ts=None):
    path, field, controller, fwd = _limit_forward(model, measure, probes)
    z_last = fwd.ys[1][-1]
    q_last = cotangent(z_last) if callable(cotangent) else cotangent
    q_last = jnp.broadcast_to(jnp.asarray(q_last, z_last.dtype), z_last.shape)
    bwd = diffrax.diffeqsolve(
        diffrax.ODETerm(_ProbeAdjoint(field, path, measure.weights, fwd)),
        diffrax.Tsit5(),
        1.0,
        0.0,
        None,
        (jnp.zeros_like(measure.points), q_last),
        saveat=diffrax.SaveAt(t1=True, dense=True),
        stepsize_controller=controller,
        max_steps=model.max_steps,
    )

    def grad_at(t, layer):
        X, Z = fwd.evaluate(t)
        P, q = bwd.evaluate(t)
        return _probe_terms(field, _trusted_measure(X, measure.weights), layer, P, q, Z)[2]

    if ts is None:
        grads = jax.vmap(grad_at)(path.times, model.params)
    else:
        grads = jax.vmap(lambda t: grad_at(t, path(t)))(ts)
    return ProbeSolution(z_last, grads)


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
      adjoint recursion) or a [`mfattn.MeanFieldTransformer`][] (Diffrax Tsit5
      forward and backward at the model's `rtol`/`atol`; the gradient map is
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
    `jax.vmap` over a batch of measures)."""
    measure, probes = _check(model, measure, probes)
    if isinstance(model, DiscreteTransformer):
        field = _model_field(model)
        dt = 1.0 / model.params.depth

        def step(carry, layer):
            x, z = carry
            vx, vz = field.forward(measure.with_points(x), layer, z)
            return (x + dt * vx, z + dt * vz), None

        (_, z_last), _ = lax.scan(step, (measure.points, probes), model.params)
        return z_last
    if isinstance(model, MeanFieldTransformer):
        return _limit_forward(model, measure, probes)[3].ys[1][-1]
    raise TypeError(f"probe outputs are implemented for the two mfattn models, not {type(model)}")


__all__ = ["ProbeSolution", "probe_gradient", "probe_outputs"]
