"""Losses of the terminal measure and their Lions derivatives (docs/theory.md, section 4)."""

import abc

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._checks import as_float_array, check_finite, check_positive
from ._measure import EmpiricalMeasure


class AbstractLoss(eqx.Module):
    """A loss `Loss(mu)` of the terminal token measure.

    Subclasses implement `__call__(measure)` and the Lions derivative
    `lions_derivative(measure, x=None, labels=None)`, the terminal condition of
    the rescaled adjoint `p_i^L = d_mu Loss(mu^L)(x_i^L)` (docs/theory.md,
    section 4).

    **The contract.** At the atoms, the Lions derivative is the gradient of
    the loss with respect to the atom's position divided by its weight,

        lions_derivative(measure)[i] = (1 / w_i) dLoss/dx_i,

    (for a loss `int f dmu` that is `grad f(x_i)`). A wrong one trains
    silently: check a new loss once with [`mfattn.check_loss`][], which
    compares it with `jax.grad`. At other points `x` (test particles), it is
    the same function of `x` evaluated there, with their `labels`.

    **Batches.** [`mfattn.train`][] maps `model.solve` over a batch of
    `(measure, loss)` pairs with `jax.vmap`: array fields of a loss that hold
    per-sample data carry the batch axis; scalar fields (a Python or 0-d
    `float` such as a scale) are shared by the batch.
    """

    @abc.abstractmethod
    def __call__(self, measure: EmpiricalMeasure) -> Float[Array, ""]:
        """The loss of `measure`."""

    @abc.abstractmethod
    def lions_derivative(self, measure: EmpiricalMeasure, x=None, labels=None):
        """`d_mu Loss(mu)(x)`, shape `(m, d)`. With `x=None`, at the atoms of
        `measure`. `labels` are the static labels of the points `x` for a
        supervised loss (test particles); unused by unsupervised losses."""


def terminal_condition(loss, measure, x_last, z_last, test_labels, dtype):
    """The loss at the terminal tokens `x_last` and the adjoints' terminal
    values: `p(1) = (1/w) dLoss/dx` (the Lions derivative at the tokens) and,
    for test particles `z_last`, the Lions derivative there with their labels
    (`None` without test particles). Shared by the discrete solvers."""
    terminal = measure.with_points(x_last)
    p_last = loss.lions_derivative(terminal).astype(dtype)
    pz_last = None
    if z_last is not None:
        pz_last = loss.lions_derivative(terminal, z_last, test_labels).astype(dtype)
    return loss(terminal), p_last, pz_last


def _check_measure(measure):
    if not isinstance(measure, EmpiricalMeasure):
        raise TypeError(f"`measure` must be an EmpiricalMeasure, got {type(measure).__name__}")


class DenoisingLoss(AbstractLoss):
    """The linear supervised loss `Loss(mu) = sum_i w_i |x_i - y_i|^2 / 2`.

    Each token carries a static label `y_i` (its clean version); the velocity
    acts on `x` only. The Lions derivative at a token is `x_i - y_i`.

    **Arguments:** `targets`, the labels `y`, shape `(n, d)`, in the order of
    the measure's atoms.

    **Raises:** `TypeError`/`ValueError` for a non-floating or wrongly shaped
    `targets`, or one with a NaN or inf entry (inside a trace,
    `equinox.EquinoxRuntimeError`); non-finite `labels` given to
    `lions_derivative` likewise (see [`mfattn.set_checks`][]).
    """

    targets: Float[Array, "n d"]

    def __init__(self, targets):
        self.targets = check_finite(as_float_array(targets, "targets", ndim=2), "targets")

    def _check(self, measure):
        _check_measure(measure)
        if measure.points.shape != self.targets.shape:
            raise ValueError(
                f"`targets` has shape {self.targets.shape} but the measure's points "
                f"have shape {measure.points.shape}"
            )

    def __call__(self, measure):
        self._check(measure)
        r = measure.points - self.targets
        return 0.5 * jnp.sum(measure.weights * jnp.sum(r * r, axis=-1))

    def lions_derivative(self, measure, x=None, labels=None):
        self._check(measure)
        if x is None:
            return measure.points - self.targets
        if labels is None:
            raise ValueError(
                "DenoisingLoss is supervised: pass `labels` (test_labels) for points "
                "that are not the measure's atoms"
            )
        return x - check_finite(labels, "labels")


class MMDLoss(AbstractLoss):
    """Squared maximum mean discrepancy with a Gaussian kernel,

        MMD^2(mu, nu) = iint k dmu dmu - 2 iint k dmu dnu + iint k dnu dnu,
        k(x, y) = exp(-|x - y|^2 / (2 bandwidth^2)),

    against a fixed target measure `nu`: a nonlinear measure loss. Its Lions
    derivative is `2 int grad_1 k(x, y) (mu - nu)(dy)`.

    **Arguments:** `target` (an [`mfattn.EmpiricalMeasure`][]) and `bandwidth > 0`
    (finite; checked also when traced).
    """

    target: EmpiricalMeasure
    bandwidth: float | Float[Array, ""]

    def __init__(self, target, bandwidth=1.0):
        _check_measure(target)
        self.target = target
        self.bandwidth = check_positive(bandwidth, "bandwidth")

    def _kernel(self, x, y):
        d2 = jnp.sum((x[:, None, :] - y[None, :, :]) ** 2, axis=-1)
        return jnp.exp(-d2 / (2 * self.bandwidth**2))

    def __call__(self, measure):
        _check_measure(measure)
        if measure.dim != self.target.dim:
            raise ValueError(f"`measure` has d={measure.dim}, target has d={self.target.dim}")
        x, w = measure.points, measure.weights
        y, v = self.target.points, self.target.weights
        kxx = w @ self._kernel(x, x) @ w
        kxy = w @ self._kernel(x, y) @ v
        kyy = v @ self._kernel(y, y) @ v
        return kxx - 2 * kxy + kyy

    def lions_derivative(self, measure, x=None, labels=None):
        _check_measure(measure)
        del labels
        if x is None:
            x = measure.points

        def grad_mean(pts, wts):
            kxy = self._kernel(x, pts)  # (m, n)
            diff = x[:, None, :] - pts[None, :, :]
            return -jnp.einsum("mn,n,mnd->md", kxy, wts, diff) / self.bandwidth**2

        return 2 * (
            grad_mean(measure.points, measure.weights)
            - grad_mean(self.target.points, self.target.weights)
        )


def check_loss(loss: AbstractLoss, measure: EmpiricalMeasure, *, rtol=None, atol=None):
    """Check a loss's `lions_derivative` against `jax.grad`: at the atoms of
    `measure` it must be `(1/w_i) dLoss/dx_i` (the contract of
    [`mfattn.AbstractLoss`][]).

    **Arguments:** `loss`, `measure` (concrete arrays, one token set), and
    tolerances (default by dtype: `rtol=1e-6` in float64, `1e-3` in float32,
    `atol` that times the largest entry of the gradient).

    **Returns:** the largest absolute difference, a float.

    **Raises:** `ValueError` naming the loss (its class) and the largest
    difference when they disagree; `TypeError` for arguments of the wrong type.
    """
    import jax
    import numpy as np

    if not isinstance(loss, AbstractLoss):
        raise TypeError(f"`loss` must be an mfattn loss (AbstractLoss), got {type(loss).__name__}")
    _check_measure(measure)
    if measure.points.ndim != 2:
        raise ValueError(f"`measure.points` must be (n, d), got {measure.points.shape}")
    grad = jax.grad(lambda pts: loss(measure.with_points(pts)))(measure.points)
    expected = np.asarray(grad / measure.weights[:, None])
    got = np.asarray(loss.lions_derivative(measure))
    if got.shape != expected.shape:
        raise ValueError(
            f"{type(loss).__name__}.lions_derivative returned shape {got.shape}, expected "
            f"{expected.shape} (one row per atom)"
        )
    wide = np.finfo(expected.dtype).eps < 1e-10
    rtol = (1e-6 if wide else 1e-3) if rtol is None else rtol
    scale = max(float(np.max(np.abs(expected))), np.finfo(expected.dtype).tiny)
    atol = rtol * scale if atol is None else atol
    err = float(np.max(np.abs(got - expected)))
    if not np.allclose(got, expected, rtol=rtol, atol=atol):
        raise ValueError(
            f"{type(loss).__name__}.lions_derivative disagrees with (1/w) jax.grad of the loss: "
            f"largest difference {err:.3g} against a gradient of size {scale:.3g}. It must be "
            "(1/w_i) dLoss/dx_i at the atoms (see mfattn.AbstractLoss)"
        )
    return err
