"""A pathwise coupling of the `1/sqrt(L)` transformer and its common-noise SDE:
one Brownian path drives both (docs/theory.md, section 9, "Pathwise coupling")."""

import abc
import math

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.special as jsp
from jaxtyping import Array, Float, PRNGKeyArray

from ._checks import check_positive, is_concrete
from ._custom_types import BetaLike, ScalarLike
from ._discrete import solve_discrete
from ._kernels import AbstractAttentionKernel
from ._measure import EmpiricalMeasure
from ._mlp import Activation, MLPParams
from ._params import AttentionParams
from ._path import ParamPath
from ._residual import InverseSqrtDepth
from ._sde import _build, _levy_area, _num_features, solve_sde


class AbstractMultipliers(eqx.Module):
    """The law of the per-layer multipliers `xi_{l,k}` (mean 0, variance 1) of
    the output weights `O` and `W_2` of the coupled discrete model, and how
    they are built from the Brownian path of the SDE: layer `l` moves by
    `sqrt(dt) xi_{l,k}` where the SDE moves by `B^k(t_{l+1}) - B^k(t_l)`."""

    @abc.abstractmethod
    def multipliers(self, values: Float[Array, "L+1 K"], dt) -> Float[Array, "L K"]:
        """The multipliers from the Brownian path at the layer times
        `values[l] = B(t_l)`, `t_l = l dt`."""


class GaussianMultipliers(AbstractMultipliers):
    """Gaussian multipliers `xi_{l,k} = (B^k(t_{l+1}) - B^k(t_l)) / sqrt(dt)`:
    the layer increments are the Brownian increments, and the discrete model
    is exactly the Euler-Maruyama scheme of the SDE with step `dt`."""

    def multipliers(self, values, dt):
        return jnp.diff(values, axis=0) / jnp.sqrt(dt)


class RademacherMultipliers(AbstractMultipliers):
    """Sign multipliers `xi_{l,k} = +-1` (i.i.d., probability 1/2 each), coupled
    with the Brownian path by the dyadic construction of Komlos, Major and
    Tusnady: the number of `+1` in the whole walk is the binomial quantile of
    `Phi(B(t_L) / sqrt(t_L))`, and, recursively, the number in the left half
    of a block is the hypergeometric quantile (given the block's count) of
    `Phi(Z)`, `Z` the standardised midpoint of the Brownian bridge over the
    block. The `Z` are independent standard normals (Levy's construction), so
    the signs are exactly i.i.d.; the partial sums stay within
    `O(log L)` steps of `B / sqrt(dt)`. Needs `L` a power of two."""

    def multipliers(self, values, dt):
        L = values.shape[0] - 1
        if L & (L - 1):
            raise ValueError(f"RademacherMultipliers needs `depth` a power of two, got {L}")
        W = values / jnp.sqrt(dt)  # a unit-step walk, (L+1, K)
        normal = jax.scipy.stats.norm.cdf
        counts = _quantile(normal(W[-1:] / math.sqrt(L)), L, None)  # (1, K): pluses
        size = L
        while size > 1:
            m = size // 2
            left, mid, right = W[0:-1:size], W[m::size], W[size::size]
            Z = (mid - 0.5 * (left + right)) / math.sqrt(m / 2)
            k_left = _quantile(normal(Z), m, counts)
            counts = jnp.stack([k_left, counts - k_left], axis=1).reshape(-1, W.shape[1])
            size = m
        return 2.0 * counts - 1.0


def _quantile(u, m, total):
    """The quantile at `u` of Bin(m, 1/2) (`total=None`) or of the number of
    successes among `m` draws from `2m` items of which `total` are successes
    (hypergeometric), elementwise; `u`, `total` of one shape `(B, K)`."""
    j = jnp.arange(m + 1, dtype=u.dtype).reshape((1,) * u.ndim + (m + 1,))
    lg = jsp.gammaln
    if total is None:
        logp = lg(m + 1.0) - lg(j + 1) - lg(m - j + 1) - m * math.log(2.0)
        logp = jnp.broadcast_to(logp, u.shape + (m + 1,))
    else:
        K = total[..., None]
        ok = (j <= K) & (m - j <= 2 * m - K)
        Kc = jnp.where(ok, K, m)
        logp = (
            lg(Kc + 1) - lg(j + 1) - lg(Kc - j + 1)
            + lg(2 * m - Kc + 1) - lg(m - j + 1) - lg(m - Kc + j + 1)
            - (lg(2.0 * m + 1) - 2 * lg(m + 1.0))
        )  # fmt: skip
        logp = jnp.where(ok, logp, -jnp.inf)
    cdf = jnp.cumsum(jnp.exp(logp), axis=-1)
    below = jnp.sum(cdf[..., :-1] < u[..., None], axis=-1)
    return below.astype(u.dtype)


def layer_parameters(features, mlp, drift, increments, ts, heads, h):
    """The parameters of the layers `l = 0..L-1` whose residual steps (factor
    `h`) move the tokens by the SDE's Euler-Maruyama increment with noise
    increments `increments (L, K)` and drift read at `ts[l]`, step
    `ts[l+1] - ts[l]`: attention heads `(Q_m, K_m, V_m, c O_m)` and MLP blocks
    with `W_2` rows scaled likewise (every scale enters linearly, through `O`
    and `W_2`). Returns `(AttentionParams (L, H_tot, d, k), MLPParams or None)`."""
    dts = jnp.diff(ts)
    P = 0 if drift is None else drift(ts[0]).heads
    M = 0 if features is None else features.heads
    H_tot = P + M  # the layer averages its heads: every scale carries H_tot
    blocks = []
    if drift is not None:
        theta = jax.vmap(drift)(ts[:-1])  # (L, P, d, k)
        c = H_tot * dts / (P * h)
        blocks.append(eqx.tree_at(lambda p: p.O, theta, theta.O * c[:, None, None, None]))
    if features is not None:
        L = increments.shape[0]
        c = H_tot * (heads * M) ** -0.5 * increments[:, :M] / h  # (L, M)
        theta = jax.tree.map(lambda a: jnp.broadcast_to(a, (L,) + a.shape), features)
        blocks.append(eqx.tree_at(lambda p: p.O, theta, theta.O * c[:, :, None, None]))
    if not blocks:  # MLP noise alone: one head that writes nothing
        d, L = mlp.dim, increments.shape[0]
        zero = jnp.zeros((L, 1, d, 1), increments.dtype)
        blocks.append(AttentionParams(zero, zero, zero, zero))
    params = jax.tree.map(lambda *a: jnp.concatenate(a, axis=1), *blocks)
    blocks_mlp = None
    if mlp is not None:
        Mp, m, d = mlp.W2.shape
        c = Mp**-0.5 * increments[:, -Mp:] / h  # (L, M')
        W2 = mlp.W2[None] * c[:, :, None, None]  # (L, M', m, d)
        L = increments.shape[0]
        blocks_mlp = MLPParams(
            W1=jnp.broadcast_to(jnp.moveaxis(mlp.W1, 0, 1).reshape(d, Mp * m), (L, d, Mp * m)),
            b1=jnp.broadcast_to(mlp.b1.reshape(Mp * m), (L, Mp * m)),
            W2=W2.reshape(L, Mp * m, d),
        )
    return params, blocks_mlp


class CoupledPaths(eqx.Module):
    """The discrete `1/sqrt(L)` model and the common-noise SDE on one Brownian
    path, at the layer times.

    **Fields:**

    - `ts`: the layer times `t_l = l t1 / L`, `(L+1,)`.
    - `discrete`: the tokens of the `L`-layer model, `(L+1, n, d)`.
    - `sde`: the tokens of the SDE at the same times, `(L+1, n, d)`.
    - `params`, `mlp`: the layers' parameters (`(L, H_tot, d, k)` and
      `(L, d, M' m)`, `(L, M' m)`, `(L, M' m, d)`, or `None`), as
      [`mfattn.solve_discrete`][] takes them.
    - `multipliers`: `xi (L, K)`, the per-layer multipliers of the `K`
      features (attention first, then MLP).
    """

    ts: Float[Array, " S"]
    discrete: Float[Array, "S n d"]
    sde: Float[Array, "S n d"]
    params: AttentionParams
    mlp: MLPParams | None
    multipliers: Float[Array, "L K"]

    def distance(self) -> Float[Array, " S"]:
        """`|X^L_t - X_t|` at every layer time, the root mean square over tokens."""
        return jnp.sqrt(jnp.mean(jnp.sum((self.discrete - self.sde) ** 2, axis=-1), axis=-1))

    def sup_distance(self) -> Float[Array, ""]:
        """`sup_t |X^L_t - X_t|` over the layer times."""
        return jnp.max(self.distance())


@eqx.filter_jit
def pathwise_coupling(
    features: AttentionParams | None,
    measure: EmpiricalMeasure,
    beta: BetaLike,
    key: PRNGKeyArray,
    depth: int,
    *,
    heads: ScalarLike = 1,
    mlp: MLPParams | None = None,
    activation: Activation = "tanh",
    drift: ParamPath | AttentionParams | None = None,
    multipliers: AbstractMultipliers = GaussianMultipliers(),
    t1: ScalarLike = 1.0,
    dt0: ScalarLike | None = None,
    solver: diffrax.AbstractSolver = diffrax.Euler(),
    kernel: AbstractAttentionKernel | None = None,
) -> CoupledPaths:
    """Run the `L`-layer `1/sqrt(L)` transformer and the common-noise SDE of
    [`mfattn.solve_sde`][] on one Brownian path (docs/theory.md, section 9,
    "Pathwise coupling").

    The SDE is driven by `K = M + M'` Brownian motions `B^k`, one per noise
    feature, from `key` (the path [`mfattn.solve_sde`][] builds from it). Layer
    `l` of the discrete model has the features' heads `(Q_m, K_m, V_m, O_m)`
    with `O_m` multiplied by `xi_{l,m}`, and their MLP blocks with `W_2`
    multiplied by `xi_{l,M+m}` (plus, with `drift`, the drift's heads at
    `t_l`, at scale `dt`); the parameters that enter nonlinearly
    (`Q, K, V, W_1, b_1`) are the features, shared by both models: the SDE is
    the one conditional on them. Every multiplier enters linearly, so layer
    `l` moves the tokens by

        x^{l+1} = x^l + dt b(x^l, mu^l) + sum_k sigma_k(x^l, mu^l) sqrt(dt) xi_{l,k},

    the SDE's own Euler-Maruyama step when `sqrt(dt) xi_{l,k} = B^k(t_{l+1}) -
    B^k(t_l)` ([`mfattn.GaussianMultipliers`][], the default: Gaussian
    per-layer parameters); [`mfattn.RademacherMultipliers`][] gives
    i.i.d. signs coupled with the same path.

    **Arguments:**

    - `features`, `measure`, `beta`, `heads`, `mlp`, `activation`, `drift`,
      `solver`, `kernel`: as in [`mfattn.solve_sde`][].
    - `key`: the key of the Brownian path.
    - `depth`: the number of layers `L` (static).
    - `multipliers`: an [`mfattn.AbstractMultipliers`][].
    - `t1`: the horizon: layer `l` sits at `t_l = l t1 / L` (default `1`).
    - `dt0`: the SDE's step (default `t1 / 2^14`, the Brownian tree's
      resolution, so that the SDE side is a fine reference).

    **Returns:** a [`mfattn.CoupledPaths`][]. Its `sde` equals
    `solve_sde(..., key, t1=t1, dt0=dt0, ts=ts)`, its `discrete` equals
    `solve_discrete(params, measure, None, beta, mlp=..., activation=...,
    residual_scaling=InverseSqrtDepth())` on its `params`.

    **Raises:** `ValueError`/`TypeError` as [`mfattn.solve_sde`][] for the
    shared arguments; for a `depth` that is not a positive int, a
    `multipliers` that is not an `AbstractMultipliers`, a non-positive `t1`
    or `dt0`, or (Rademacher multipliers) a `depth` that is not a power of two.
    """
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"`depth` must be a positive int (the number of layers), got {depth!r}")
    if not isinstance(multipliers, AbstractMultipliers):
        raise TypeError(
            f"`multipliers` must be an mfattn.AbstractMultipliers, got {type(multipliers).__name__}"
        )
    if not isinstance(solver, diffrax.AbstractSolver):
        raise TypeError(f"`solver` must be a diffrax solver, got {type(solver).__name__}")
    t1 = check_positive(t1, "t1")
    if dt0 is not None:
        dt0 = check_positive(dt0, "dt0")
    sde, dtype = _build(features, measure, beta, heads, mlp, activation, drift, None, None)
    if isinstance(drift, AttentionParams):
        drift = ParamPath(drift)
    L = depth
    ts = jnp.arange(L + 1, dtype=dtype) * (jnp.asarray(t1, dtype) / L)
    if dt0 is None:
        if not is_concrete(t1):
            raise ValueError("pass `dt0` when `t1` is traced")
        dt0 = float(t1) / 2**14
    K = sum(_num_features(f) for f in (features, mlp) if f is not None)
    tol = jnp.asarray(t1, dtype) / 2**14
    shape = jax.ShapeDtypeStruct((K,), dtype)
    bm = diffrax.VirtualBrownianTree(0.0, t1, tol, shape, key, levy_area=_levy_area(solver))
    values = jax.vmap(lambda t: _brownian(bm.evaluate(0.0, t)))(ts)
    values = values - values[:1]
    dt = ts[1] - ts[0]
    xi = multipliers.multipliers(values, dt)
    increments = jnp.sqrt(dt) * xi
    h = InverseSqrtDepth().factor(L)
    params, blocks = layer_parameters(sde.features, sde.mlp, drift, increments, ts, heads, h)
    discrete = solve_discrete(
        params,
        sde.measure,
        None,
        beta,
        mlp=blocks,
        activation=activation,
        residual_scaling=InverseSqrtDepth(),
        kernel=kernel,
    ).xs
    ref = solve_sde(
        features,
        measure,
        beta,
        key,
        heads=heads,
        mlp=mlp,
        activation=activation,
        drift=drift,
        t1=t1,
        dt0=dt0,
        ts=ts,
        solver=solver,
        kernel=kernel,
    ).xs
    return CoupledPaths(ts, discrete, ref, params, blocks, xi)


def _brownian(value):
    """The Brownian value of a Diffrax path evaluation (with or without Levy area)."""
    return value if isinstance(value, jax.Array) else value.W


__all__ = [
    "AbstractMultipliers",
    "GaussianMultipliers",
    "RademacherMultipliers",
    "CoupledPaths",
    "pathwise_coupling",
]
