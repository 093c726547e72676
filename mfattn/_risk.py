"""Risks on a fixed training set: the value and the gradient map that a
gradient flow or an optimiser follows (docs/theory.md, section 12)."""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._loss import AbstractLoss
from ._measure import EmpiricalMeasure
from ._model import AbstractModel
from ._params import AttentionParams
from ._probe import probe_gradient, probe_outputs


def _check_batch(measures, name="measures"):
    if not isinstance(measures, EmpiricalMeasure):
        raise TypeError(f"`{name}` must be an EmpiricalMeasure, got {type(measures).__name__}")
    if measures.points.ndim != 3:
        raise ValueError(
            f"`{name}` must carry a leading batch axis N: points (N, n, d), got "
            f"{measures.points.shape}"
        )


def _check_model(model):
    if not isinstance(model, AbstractModel):
        raise TypeError(f"`model` must be an mfattn model, got {type(model).__name__}")


class AbstractRisk(eqx.Module):
    """A training risk `R(theta)` on a fixed set of `N` token measures.

    Subclasses implement `value_and_gradient_map(model) -> (R, g)`, where `g`
    is the gradient map shaped like `model.params` (for the discrete model
    `g = L H dR/dtheta`, for the limit the gradient map at the grid nodes):
    what [`mfattn.gradient_flow`][] follows (`d theta/ds = -g`) and what
    [`mfattn.train`][] feeds to the optimiser. Calling the risk on a model
    gives its value.
    """

    @abc.abstractmethod
    def value_and_gradient_map(
        self, model: AbstractModel
    ) -> tuple[Float[Array, ""], AttentionParams]:
        """`(R, g)` at the model's parameters."""

    def __call__(self, model: AbstractModel) -> Float[Array, ""]:
        """The risk `R` (forward and adjoint; use `value_and_gradient_map` when
        the gradient is needed too)."""
        return self.value_and_gradient_map(model)[0]


class EmpiricalRisk(AbstractRisk):
    """The mean loss over a fixed batch, `R = (1/N) sum_a Loss_a(mu_a^L)`, with
    the batch mean of the gradient maps of `model.solve` (exactly the gradient
    [`mfattn.train`][] uses on that batch).

    **Arguments:** `measures` (an [`mfattn.EmpiricalMeasure`][] with leading axis
    `N`) and `losses` (an [`mfattn.AbstractLoss`][] with the same leading axis),
    as a sampler such as [`mfattn.DenoisingTask`][] returns them.
    """

    measures: EmpiricalMeasure
    losses: AbstractLoss

    def __check_init__(self):
        _check_batch(self.measures)
        if not isinstance(self.losses, AbstractLoss):
            raise TypeError(f"`losses` must be an mfattn loss, got {type(self.losses).__name__}")

    def value_and_gradient_map(self, model):
        _check_model(model)
        sols = jax.vmap(lambda m, lo: model.solve(m, lo))(self.measures, self.losses)
        return jnp.mean(sols.loss), jax.tree.map(lambda g: jnp.mean(g, axis=0), sols.grads)


class ProbeRisk(AbstractRisk):
    """Squared error of the probe outputs,
    `R = (1/N) sum_a |Phi_{mu_a}(z) - y_a|^2 / 2` (sum over probes and
    components), with `Phi` the probes' flow map of [`mfattn.probe_gradient`][].
    Its linearisation is governed by [`mfattn.tangent_kernel`][]:
    `dR/ds = -(1/N^2) r^T K r` with `r = Phi - y` flattened, so
    `R(s) <= R(0) exp(-2 lambda_min(K) s / N)` while `K` stays near its
    initial value.

    **Arguments:** `measures` (leading axis `N`), `probes` `(m, d)` shared by all
    measures, `targets` `(N, m, d)`.
    """

    measures: EmpiricalMeasure
    probes: Float[Array, "m d"]
    targets: Float[Array, "N m d"]

    def __check_init__(self):
        _check_batch(self.measures)
        N, _, d = self.measures.points.shape
        if self.probes.ndim != 2 or self.probes.shape[1] != d:
            raise ValueError(f"`probes` must be (m, d={d}), got {self.probes.shape}")
        if self.targets.shape != (N,) + self.probes.shape:
            raise ValueError(
                f"`targets` must be (N, m, d) = {(N,) + self.probes.shape}, got "
                f"{self.targets.shape}"
            )

    def outputs(self, model: AbstractModel) -> Float[Array, "N m d"]:
        """The probe outputs `Phi_{mu_a}(z)` of every measure, `(N, m, d)`."""
        _check_model(model)
        return jax.vmap(lambda m: probe_outputs(model, m, self.probes))(self.measures)

    def __call__(self, model):
        r = self.outputs(model) - self.targets
        return 0.5 * jnp.sum(r**2) / r.shape[0]

    def value_and_gradient_map(self, model):
        _check_model(model)

        def one(measure, target):
            sol = probe_gradient(model, measure, self.probes, lambda phi: phi - target)
            return 0.5 * jnp.sum((sol.outputs - target) ** 2), sol.grads

        values, grads = jax.vmap(one)(self.measures, self.targets)
        return jnp.mean(values), jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)


__all__ = ["AbstractRisk", "EmpiricalRisk", "ProbeRisk"]
