"""Gradient flow of the parameter particles in training time `s`: the
conditional Wasserstein gradient flow of the risk (docs/theory.md, section 12)."""

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from . import _solver_options as opts
from ._custom_types import ScalarLike
from ._measure import EmpiricalMeasure
from ._model import AbstractModel
from ._ntk import mean_field_inner
from ._params import AttentionParams
from ._risk import AbstractRisk, EmpiricalRisk


class GradientFlowField(eqx.Module):
    """The vector field of the gradient flow in training time,
    `d theta/ds = -g(theta)` (docs/theory.md, section 12), as a Diffrax vector
    field `(s, theta, args) -> d theta/ds`: every particle at every depth node
    moves by minus its own gradient map.

    **Arguments:** `model` (its parameters are replaced by `theta` at every
    evaluation) and `risk`, an [`mfattn.AbstractRisk`][].
    """

    model: AbstractModel
    risk: AbstractRisk

    def __call__(self, s, params, args):
        _, g = self.risk.value_and_gradient_map(self.model.with_params(params))
        return jax.tree.map(jnp.negative, g)


class GradientFlowSolution(eqx.Module):
    """What [`mfattn.gradient_flow`][] returns.

    **Fields:**

    - `ss`: the saved training times `(S,)`.
    - `params`: the parameters at `ss`, an [`mfattn.AttentionParams`][] whose
      leaves carry a leading axis `S`.
    - `risk`: `R(theta(s))` at `ss`, `(S,)`.
    - `dissipation`: `|g|^2` in the mean-field normalisation at `ss`,
      `sum_j c_j (1/M) sum_m |g(theta_j^m, t_j)|^2` (`(1/(L H)) sum_{l,h} |g|^2`
      for the discrete model), `(S,)`. For the discrete model
      `dR/ds = -dissipation` exactly; for the limit up to the depth quadrature.
    - `model`: the model with the parameters where the integration ended.
    - `s_end`: the training time where the integration ended: `s1`, or the
      time an `event` stopped it (or where it failed, with `throw=False`).
      Saves after `s_end` hold the state at `s_end`.
    - `stats`: Diffrax's step counts (`num_steps`, `num_accepted_steps`,
      `num_rejected_steps`, `max_steps`).
    - `result`: the `diffrax.RESULTS` of the solve.
    """

    ss: Float[Array, " S"]
    params: AttentionParams
    risk: Float[Array, " S"]
    dissipation: Float[Array, " S"]
    model: AbstractModel
    s_end: Float[Array, ""]
    stats: dict
    result: diffrax.RESULTS


def _as_risk(data, key, batch_size):
    if isinstance(data, AbstractRisk):
        return data
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], EmpiricalMeasure):
        return EmpiricalRisk(*data)
    if callable(data):
        if key is None or batch_size is None:
            raise ValueError("a sampler `data` needs `key` and `batch_size` (drawn once)")
        return EmpiricalRisk(*data(key, batch_size))
    raise TypeError(
        "`data` must be an mfattn risk (EmpiricalRisk, ProbeRisk), a (measures, losses) "
        f"tuple or a sampler, got {type(data).__name__}"
    )


@eqx.filter_jit
def gradient_flow(
    model: AbstractModel,
    data: AbstractRisk | tuple | Callable,
    s1: ScalarLike,
    *,
    ss: Float[Array, " S"] | None = None,
    saveat: diffrax.SaveAt | None = None,
    key: PRNGKeyArray | None = None,
    batch_size: int | None = None,
    solver: diffrax.AbstractSolver = diffrax.Tsit5(),
    stepsize_controller: diffrax.AbstractStepSizeController = diffrax.PIDController(
        rtol=1e-6, atol=1e-8
    ),
    dt0: ScalarLike | None = None,
    max_steps: int = 16384,
    throw: bool = True,
    progress_meter: diffrax.AbstractProgressMeter = diffrax.NoProgressMeter(),
    event: diffrax.Event | None = None,
) -> GradientFlowSolution:
    """Integrate the gradient flow of a risk in training time `s` with Diffrax,

        d theta_j^m / ds = -g(theta_j^m, t_j),      s in [0, s1],

    every parameter particle at every depth node moved by minus its own
    gradient map (docs/theory.md, section 12). For the limit this is the
    particle discretisation of the conditional Wasserstein gradient flow of the
    risk; for the discrete model, `g = L H dR/dtheta`, so it is the gradient
    flow of `R` in the metric `(1/(L H)) sum_{l,h} |d theta_{l,h}|^2`, and its
    explicit Euler steps of size `eta` are `optax.sgd(eta)` fed with the gradient
    map (what [`mfattn.train`][] does): `k` steps of `sgd(eta)` reach `s = k eta`.
    In terms of the raw gradient `dR/dtheta` that is plain gradient descent with
    learning rate `eta L H`.

    **Arguments:**

    - `model`: a [`mfattn.DiscreteTransformer`][] or [`mfattn.MeanFieldTransformer`][].
    - `data`: the training set, fixed along the flow:
      an [`mfattn.AbstractRisk`][] ([`mfattn.EmpiricalRisk`][] for the mean of
      token losses, [`mfattn.ProbeRisk`][] for the squared error of probe
      outputs); a `(measures, losses)` tuple with a leading batch axis `N`
      (the mean loss); or a sampler `sampler(key, batch_size)`, drawn *once* with
      `key` (the flow of the empirical risk of that batch; fresh batches along
      `s` would make a stochastic process that an adaptive ODE solver cannot
      integrate: use [`mfattn.train`][] with `optax.sgd` for that).
    - `s1`: final training time.
    - `saveat`: a `diffrax.SaveAt` with `ts` (and/or `t0`, `t1`), the same as
      `ss` (give one of them).
    - `ss`: times at which to save parameters and risk (default 33 equispaced
      times in `[0, s1]`).
    - `key`, `batch_size`: for a sampler.
    - `solver`, `stepsize_controller`, `dt0`, `max_steps`, `throw`,
      `progress_meter`: passed to `diffrax.diffeqsolve` (default Tsit5 with a
      PID controller at `rtol=1e-6`, `atol=1e-8`; `diffrax.Euler()` with
      `diffrax.ConstantStepSize()` and `dt0=eta` is gradient descent).
    - `event`: a `diffrax.Event` that stops the flow, e.g. once the risk is
      small: `diffrax.Event(lambda s, theta, args, **kw: risk(model.with_params(theta)) < tol)`.
      Saves after the stop hold the stopped state (`s_end` says where).

    **Returns:** a [`mfattn.GradientFlowSolution`][].

    **Raises:** `TypeError`/`ValueError` for a model or data of the wrong kind.
    """
    if not isinstance(model, AbstractModel):
        raise TypeError(f"`model` must be an mfattn model, got {type(model).__name__}")
    risk = _as_risk(data, key, batch_size)
    dtype = model.params.dtype
    if saveat is not None:
        if ss is not None:
            raise TypeError("pass `saveat` or `ss`, not both")
        ss = opts.save_times(saveat, None, 0.0, s1, dtype=dtype)
    if ss is None:
        ss = jnp.linspace(0.0, s1, 33, dtype=dtype)
    ss = jnp.asarray(ss, dtype)
    if ss.ndim != 1:
        raise ValueError(f"`ss` must be 1-D, got shape {ss.shape}")

    def save(s, params, args):
        m = model.with_params(params)
        value, g = risk.value_and_gradient_map(m)
        return params, value, mean_field_inner(m, g, g)

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(GradientFlowField(model, risk)),
        solver,
        0.0,
        s1,
        dt0,
        model.params,
        saveat=diffrax.SaveAt(ts=ss, t1=True, fn=save),
        stepsize_controller=stepsize_controller,
        max_steps=max_steps,
        throw=throw,
        progress_meter=progress_meter,
        event=event,
    )
    # Diffrax packs the saves: those of `ss` it reached, then the one at the end
    # of the integration (s1, or where an event stopped it), then inf. Saves
    # of `ss` after the end hold the state there.
    end = jnp.sum(jnp.isfinite(sol.ts)) - 1
    index = jnp.minimum(jnp.arange(ss.shape[0]), end)
    params, risk_values, dissipation = jax.tree.map(lambda a: a[index], sol.ys)
    final = model.with_params(jax.tree.map(lambda a: a[end], sol.ys[0]))
    return GradientFlowSolution(
        ss=ss,
        params=params,
        risk=risk_values,
        dissipation=dissipation,
        model=final,
        s_end=sol.ts[end],
        stats=dict(sol.stats),
        result=sol.result,
    )


__all__ = ["GradientFlowField", "GradientFlowSolution", "gradient_flow"]
