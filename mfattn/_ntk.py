"""The tangent kernel of a model on `N` token measures, and the log-sum-exp
criterion for its injectivity (docs/theory.md, section 12)."""

import abc
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._custom_types import ScalarLike
from ._measure import EmpiricalMeasure
from ._model import AbstractModel, DiscreteTransformer, MeanFieldTransformer
from ._params import AttentionParams
from ._path import ParamPath
from ._probe import probe_gradient

_BLOCKS = ("Q", "K", "V", "O")


# ------------------------------------------------------------- token laws
class AbstractTokenLaw(eqx.Module):
    """A batch of `N` token laws known through their log-Laplace transforms
    `z -> log int exp(<z, y>) mu_a(dy)` (the functions of the criterion in
    [`mfattn.lse_independence`][]), for laws that are not empirical measures.
    """

    @abc.abstractmethod
    def log_laplace(self, z: Float[Array, "P d"]) -> Float[Array, "P N"]:
        """`log int exp(<z_p, y>) mu_a(dy)` for every probe `z_p` and law `a`."""

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Token dimension `d`."""


class GaussianMixtureLaw(AbstractTokenLaw):
    """`N` Gaussian mixtures `mu_a = sum_c pi_{a,c} N(m_{a,c}, S_{a,c})`, with the
    exact log-Laplace transform `log sum_c pi_{a,c} exp(<z, m_{a,c}> + z^T S_{a,c} z / 2)`.

    **Arguments:** `means` `(N, C, d)`, `covariances` `(N, C, d, d)` (symmetric
    positive semi-definite), `mixing` `(N, C)` (rows summing to one; default
    uniform). One component (`C = 1`) is a Gaussian.
    """

    means: Float[Array, "N C d"]
    covariances: Float[Array, "N C d d"]
    mixing: Float[Array, "N C"]

    def __init__(self, means, covariances, mixing=None):
        means = jnp.asarray(means)
        covariances = jnp.asarray(covariances)
        if means.ndim != 3:
            raise ValueError(f"`means` must be (N, C, d), got {means.shape}")
        if covariances.shape != means.shape + means.shape[-1:]:
            raise ValueError(
                f"`covariances` must be (N, C, d, d) = {means.shape + means.shape[-1:]}, "
                f"got {covariances.shape}"
            )
        if mixing is None:
            mixing = jnp.full(means.shape[:2], 1.0 / means.shape[1], means.dtype)
        mixing = jnp.asarray(mixing, means.dtype)
        if mixing.shape != means.shape[:2]:
            raise ValueError(f"`mixing` must be (N, C) = {means.shape[:2]}, got {mixing.shape}")
        self.means, self.covariances, self.mixing = means, covariances, mixing

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    def log_laplace(self, z):
        lin = jnp.einsum("pd,ncd->pnc", z, self.means)
        quad = 0.5 * jnp.einsum("pd,ncde,pe->pnc", z, self.covariances, z)
        return jax.nn.logsumexp(lin + quad, axis=-1, b=self.mixing[None])


def _log_expm1_ratio(u):
    """`log((e^u - 1) / u)`, stable for every `u` (series near 0)."""
    small = jnp.abs(u) < 1e-3
    safe = jnp.where(small, 1.0, u)
    big = jnp.maximum(safe, 0.0) + jnp.log(-jnp.expm1(-jnp.abs(safe))) - jnp.log(jnp.abs(safe))
    series = u / 2 + u**2 / 24 - u**4 / 2880
    return jnp.where(small, series, big)


class UniformBoxLaw(AbstractTokenLaw):
    """`N` uniform laws on boxes `prod_i [lower_{a,i}, upper_{a,i}]`, with the exact
    log-Laplace transform `sum_i log((e^{z_i b_i} - e^{z_i a_i}) / (z_i (b_i - a_i)))`.

    **Arguments:** `lower`, `upper`, each `(N, d)`, `lower < upper`.
    """

    lower: Float[Array, "N d"]
    upper: Float[Array, "N d"]

    def __init__(self, lower, upper):
        lower, upper = jnp.asarray(lower), jnp.asarray(upper)
        if lower.ndim != 2 or lower.shape != upper.shape:
            raise ValueError(
                f"`lower`, `upper` must both be (N, d), got {lower.shape}, {upper.shape}"
            )
        if not isinstance(lower, jax.core.Tracer) and np.any(np.asarray(upper <= lower)):
            raise ValueError("every box needs `lower < upper`")
        self.lower, self.upper = lower, upper

    @property
    def dim(self) -> int:
        return self.lower.shape[-1]

    def log_laplace(self, z):
        u = z[:, None, :] * (self.upper - self.lower)[None]
        return jnp.sum(z[:, None, :] * self.lower[None] + _log_expm1_ratio(u), axis=-1)


def _empirical_log_laplace(measures, z):
    scores = jnp.einsum("pd,and->pan", z, measures.points)
    return jax.nn.logsumexp(scores, axis=-1, b=measures.weights[None])


# -------------------------------------------------------- the criterion
def lse_independence(
    measures: EmpiricalMeasure | AbstractTokenLaw,
    key: PRNGKeyArray,
    *,
    num_probes: int = 512,
    radius: ScalarLike = 1.0,
    modulo: str = "affine",
    return_coefficients: bool = False,
) -> Float[Array, " N"] | tuple[Float[Array, " N"], Float[Array, "N N"]]:
    """How far the log-sum-exp functions of `N` token laws are from linear
    dependence modulo affine functions: the criterion for the injectivity of
    the attention tangent kernel (docs/theory.md, section 12).

    The functions `F_a(z) = log int exp(<z, y>) mu_a(dy)` are evaluated at
    `P = num_probes` probes `z_p` drawn uniformly in the ball of radius `radius`;
    the span of `{1, z_1, ..., z_d}` is projected out (QR of the `P x (d+1)`
    affine design); the singular values of the projected `P x N` matrix divided
    by `sqrt(P)` are returned. With that normalisation they estimate the square
    roots of the eigenvalues of the Gram matrix
    `E_z[F_a^perp(z) F_b^perp(z)]` (`z` uniform in the ball, `F^perp` the
    empirical `L^2` residual of `F` after its affine fit), so they do not drift
    with `P`: the smallest is zero (to rounding) exactly when some nonzero
    combination `sum_a c_a F_a` is affine on the probes.

    How the smallest singular value depends on the probes (measured in
    `tests/test_ntk.py` and the notebook `06_gradient_flow`): near `z = 0`,
    `F_a(z) = <z, mean_a> + z^T Cov_a z / 2 + O(|z|^3)`, so for a small radius `r`
    a dependence among the covariances leaves a singular value of order `r^3`
    (`r^2` for the quadratic parts alone), and generic independent measures
    give values that grow like `r^2` to `r^4` for `r < 1` and roughly like `r`
    for large `r` (where `F_a` tends to the support function of `mu_a`). Use a
    radius of the order of `1 / (token scale)`, and `P >> N + d + 1`: with
    `P <= N + d` the matrix has rank `< N` and the smallest value is zero for
    every input; above that the estimate fluctuates by `O(P^{-1/2})` relative.

    **Arguments:**

    - `measures`: an [`mfattn.EmpiricalMeasure`][] whose leaves have a leading
      batch axis `N` (`points (N, n, d)`, `weights (N, n)`), or an
      [`mfattn.AbstractTokenLaw`][] with exact log-Laplace transforms
      ([`mfattn.GaussianMixtureLaw`][], [`mfattn.UniformBoxLaw`][]).
    - `key`: draws the probes.
    - `num_probes`: `P`, must exceed `N + d + 1`.
    - `radius`: radius of the probe ball.
    - `modulo`: `"affine"` (default, the criterion: project out `{1, z_1, ..., z_d}`)
      or `"constants"` (project out `{1}` only: independence modulo constants,
      the injectivity criterion of the full kernel, value and output blocks
      included, at the mean-field initialisation; see [`mfattn.tangent_kernel`][]).
    - `return_coefficients`: also return the right singular vectors.

    **Returns:** the `N` singular values, largest first; with
    `return_coefficients=True`, also the `(N, N)` matrix whose column `i` holds
    the coefficients `c` of the combination `sum_a c_a F_a` with singular value
    `i` (its last column is the near-dependence).

    **Raises:** `ValueError` for a measure without a batch axis, or too few probes.
    """
    if isinstance(measures, EmpiricalMeasure):
        if measures.points.ndim != 3:
            raise ValueError(
                "`measures` must carry a leading batch axis N: points (N, n, d), got "
                f"{measures.points.shape}"
            )
        N, d = measures.points.shape[0], measures.points.shape[-1]
    elif isinstance(measures, AbstractTokenLaw):
        d = measures.dim
        N = jax.eval_shape(measures.log_laplace, jnp.zeros((1, d))).shape[1]
    else:
        raise TypeError(
            f"`measures` must be an EmpiricalMeasure or a token law, got {type(measures).__name__}"
        )
    if num_probes <= N + d + 1:
        raise ValueError(
            f"`num_probes` must exceed N + d + 1 = {N + d + 1} (else the residual has rank < N)"
        )
    if modulo not in ("affine", "constants"):
        raise ValueError(f"`modulo` must be 'affine' or 'constants', got {modulo!r}")
    if not radius > 0:
        raise ValueError(f"`radius` must be positive, got {radius}")
    if isinstance(measures, EmpiricalMeasure):
        dtype = measures.points.dtype
    else:
        dtype = jnp.result_type(*jax.tree.leaves(measures))
    z = _ball_probes(key, num_probes, d, jnp.dtype(dtype))
    # the affine span of the unit probes is that of the scaled ones
    F = _log_laplace(measures, z, jnp.asarray(radius, dtype))
    s, v = _affine_residual_svd(F, z, modulo)
    return (s, v) if return_coefficients else s


# Three compiled pieces, so that the probes and the linear algebra are compiled
# once per shape whatever the law's type: only the log-Laplace transform is
# compiled per type.
@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _ball_probes(key, num_probes, d, dtype):
    """`num_probes` points uniform in the unit ball of `R^d`."""
    kd, kr = jax.random.split(key)
    g = jax.random.normal(kd, (num_probes, d), dtype)
    u = jax.random.uniform(kr, (num_probes, 1), dtype)
    return u ** (1.0 / d) * g / jnp.linalg.norm(g, axis=-1, keepdims=True)


@eqx.filter_jit
def _log_laplace(measures, z, radius):
    z = radius * z
    if isinstance(measures, EmpiricalMeasure):
        return _empirical_log_laplace(measures, z)
    return measures.log_laplace(z)


@functools.partial(jax.jit, static_argnames=("modulo",))
def _affine_residual_svd(F, z, modulo):
    """SVD of `F` (P, N) after projecting out `{1}` (and `z`, for "affine"),
    scaled by `1/sqrt(P)`."""
    P = F.shape[0]
    design = jnp.ones((P, 1), F.dtype)
    if modulo == "affine":
        design = jnp.concatenate([design, z], axis=1)
    Qd, _ = jnp.linalg.qr(design)
    resid = F - Qd @ (Qd.T @ F)
    resid = resid - Qd @ (Qd.T @ resid)  # second pass: projection to rounding
    _, s, vt = jnp.linalg.svd(resid / np.sqrt(P), full_matrices=False)
    return s, vt.T


# ------------------------------------------------------------ the kernel
def node_weights(model: AbstractModel) -> Float[Array, " J"]:
    """Quadrature weights `c_j` of the depth nodes: `1/L` for every layer of the
    discrete model; `int_0^1 b_j(t) dt` (the basis integrals of
    [`mfattn.ParamPath`][]) for the limit's grid."""
    if isinstance(model, DiscreteTransformer):
        L = model.params.depth
        return jnp.full((L,), 1.0 / L, model.params.dtype)
    if isinstance(model, MeanFieldTransformer):
        return ParamPath(model.params, model.times, model.interpolation).basis_integrals()
    raise TypeError(f"`model` must be an mfattn model, got {type(model).__name__}")


def mean_field_inner(
    model: AbstractModel,
    a: AttentionParams,
    b: AttentionParams,
    blocks: tuple[str, ...] = _BLOCKS,
) -> Float[Array, ""]:
    """`<a, b>` in the mean-field normalisation, `sum_j c_j (1/M) sum_m <a_jm, b_jm>`
    over the chosen blocks (`(1/(L H)) sum_{l,h}` for the discrete model), for
    gradient maps shaped like `model.params`."""
    c = node_weights(model)
    M = model.params.heads
    total = 0.0
    for name in blocks:
        x, y = getattr(a, name), getattr(b, name)
        total = total + jnp.einsum("j,jmdk,jmdk->", c, x, y) / M
    return total


def tangent_kernel(
    model: AbstractModel,
    measures: EmpiricalMeasure,
    probes: Float[Array, "m d"],
    *,
    blocks: tuple[str, ...] = _BLOCKS,
) -> Float[Array, "Nmd Nmd"]:
    """The tangent kernel of `model` on `N` token measures, with the probes'
    terminal states as the outputs (docs/theory.md, section 12).

    The output of the model on a measure `mu_a` is the flow map of the probes,
    `f_a = Phi_{mu_a}(z) in R^{m x d}` (see [`mfattn.probe_gradient`][]). For every
    output component `(a, k, c)` the closed-form adjoint gives its gradient map
    `G_{akc}(theta, t_j)` at every depth node; the kernel is their Gram matrix in
    the mean-field normalisation,

        K_{akc, ble} = sum_j c_j (1/M) sum_m <G_{akc}(theta_j^m, t_j), G_{ble}(theta_j^m, t_j)>,

    with `c_j` from [`mfattn.node_weights`][]: for the discrete model
    `K = (1/(L H)) sum_{l,h} <G, G> = L H <df/dtheta, df/dtheta>` (tested against
    `jax.jacrev`); for the limit the node quadrature of
    `int_0^1 int <G_a, G_b> nu_t(dtheta) dt`. It is the kernel of the
    linearised flow: along [`mfattn.gradient_flow`][] of [`mfattn.ProbeRisk`][],
    `d f/ds = -(1/N) K (f - y)`.

    **Arguments:**

    - `model`: a [`mfattn.DiscreteTransformer`][] or [`mfattn.MeanFieldTransformer`][].
    - `measures`: an [`mfattn.EmpiricalMeasure`][] with a leading batch axis `N`.
    - `probes`: `(m, d)`, the same probes for every measure.
    - `blocks`: the parameter blocks whose derivatives enter the Gram matrix,
      a subset of `("Q", "K", "V", "O")`; `("Q", "K")` is the attention-score
      kernel, whose injectivity at the mean-field initialisation is exactly the
      log-sum-exp criterion of [`mfattn.lse_independence`][].

    **Returns:** `K`, `(N m d, N m d)`, symmetric positive semi-definite, rows in
    the order `(a, k, c)` (sample, probe, component).
    """
    if not isinstance(measures, EmpiricalMeasure) or measures.points.ndim != 3:
        raise ValueError("`measures` must be an EmpiricalMeasure with points (N, n, d)")
    blocks = tuple(blocks)
    if not blocks or any(b not in _BLOCKS for b in blocks):
        raise ValueError(f"`blocks` must be a non-empty subset of {_BLOCKS}, got {blocks}")
    G = output_gradient_maps(model, measures, probes)
    c = node_weights(model)
    M = model.params.heads
    # sqrt(c_j / M) on every (node, particle): a plain Gram matrix of the scaled maps
    scale = jnp.sqrt(c / M)[None, None, :, None, None, None]
    rows = G.Q.shape[0] * G.Q.shape[1]
    F = jnp.concatenate([(getattr(G, b) * scale).reshape(rows, -1) for b in blocks], axis=1)
    return F @ F.T


@eqx.filter_jit
def output_gradient_maps(
    model: AbstractModel, measures: EmpiricalMeasure, probes: Float[Array, "m d"]
) -> AttentionParams:
    """The gradient maps of every output component of [`mfattn.tangent_kernel`][]:
    an [`mfattn.AttentionParams`][] with leaves `(N, m d, J, M, d, k)`, entry
    `[a, k d + c]` the gradient map of `Phi_{mu_a}(z_k)_c` at every node (one
    closed-form backward pass per component; the forward pass is shared)."""
    if not isinstance(measures, EmpiricalMeasure) or measures.points.ndim != 3:
        raise ValueError("`measures` must be an EmpiricalMeasure with points (N, n, d)")
    probes = jnp.asarray(probes)
    if probes.ndim != 2:
        raise ValueError(f"`probes` must be (m, d), got shape {probes.shape}")
    m, d = probes.shape
    eye = jnp.eye(m * d, dtype=jnp.result_type(probes.dtype, model.params.dtype))
    eye = eye.reshape(m * d, m, d)

    def features(points, weights):
        measure = EmpiricalMeasure.__new__(EmpiricalMeasure)
        object.__setattr__(measure, "points", points)
        object.__setattr__(measure, "weights", weights)
        return jax.vmap(lambda c: probe_gradient(model, measure, probes, c).grads)(eye)

    return jax.vmap(features)(measures.points, measures.weights)


__all__ = [
    "AbstractTokenLaw",
    "GaussianMixtureLaw",
    "UniformBoxLaw",
    "lse_independence",
    "mean_field_inner",
    "node_weights",
    "output_gradient_maps",
    "tangent_kernel",
]
