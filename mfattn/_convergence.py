"""Measuring the distance between a finite transformer and its mean-field limit
(docs/theory.md, section 7), through test particles."""

import warnings
from typing import NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._custom_types import ScalarLike
from ._discrete import solve_discrete
from ._geometry import as_geometry
from ._limit import solve_limit
from ._params import AttentionParams, _check_sizes
from ._renamed import renamed_kwargs


@renamed_kwargs(num_nodes="depth", particles="heads")
def antithetic_mean_field(
    key,
    depth,
    heads,
    dim,
    head_dim,
    dtype=None,
    *,
    sampling: str = "random",
    independent_nodes: bool = False,
    method: str | None = None,
):
    """The mean-field initialisation (docs/theory.md, section 6) with variance reduction that
    keeps the law `nu_0` exact.

    `heads / 2` draws from `nu_0` and their antithetic copies `O -> -O`.
    Xavier-uniform is invariant under that flip, so the law is exact, the
    empirical mean of `O` is exactly zero, and so is the limit velocity at
    initialisation (docs/theory.md, section 6): the particle approximation of the limit has
    no Monte-Carlo error at `k = 0`.

    **Arguments:**

    - `key`, `depth` (formerly `num_nodes`), `heads` (even; formerly
      `particles`), `dim`, `head_dim`, `dtype`: as in
      [`mfattn.AttentionParams.mean_field`][].
    - `sampling` (formerly `method`): `"random"` (i.i.d. uniform draws) or `"sobol"` (the `4 d k`
      uniform entries of the first half are a scrambled Sobol sequence, seeded
      from `key`: randomised quasi-Monte Carlo, still exactly `nu_0` marginally
      for every particle). `"sobol"` works best with `heads / 2` a power
      of two.
    - `independent_nodes`: if `False` (docs/theory.md, section 6), the same draws sit at
      every depth node. If `True`, every node gets its own draws: the law at
      every node is still exactly `nu_0`, and after training exactly
      `Phi_k(., t_j) # nu_0` in the limit `M -> oo`, but the Monte-Carlo errors
      of different nodes are independent and average out along depth, so a
      flow through `J` nodes sees about `J M` particles instead of `M`. Use it
      with `interpolation=mfattn.PiecewiseConstant()`: linear interpolation between independent
      particles would not preserve the law between nodes.
    """
    if method is not None:
        warnings.warn("`method=` is deprecated; use `sampling=`", DeprecationWarning, stacklevel=2)
        sampling = method
    if heads % 2:
        raise ValueError(f"`heads` must be even for antithetic pairs, got {heads}")
    if sampling not in ("random", "sobol"):
        raise ValueError(f"`sampling` must be 'random' or 'sobol', got {sampling!r}")
    draw = AttentionParams.mean_field if sampling == "random" else _sobol_mean_field
    if independent_nodes:
        _check_sizes(depth=depth)
        nodes = [
            draw(jax.random.fold_in(key, j), 1, heads // 2, dim, head_dim, dtype)
            for j in range(depth)
        ]
        half = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *nodes)
    else:
        half = draw(key, depth, heads // 2, dim, head_dim, dtype)
    return AttentionParams(
        *(
            jnp.concatenate([a, b], axis=1)
            for a, b in zip((half.Q, half.K, half.V, half.O), (half.Q, half.K, half.V, -half.O))
        )
    )


def _sobol_mean_field(key, num_nodes, particles, dim, head_dim, dtype):
    from scipy.stats import qmc

    _check_sizes(num_nodes=num_nodes, particles=particles, dim=dim, head_dim=head_dim)
    dtype = jnp.result_type(float) if dtype is None else dtype
    seed = np.asarray(jax.random.bits(key, (4,), dtype=jnp.uint32))
    sampler = qmc.Sobol(d=4 * dim * head_dim, scramble=True, seed=np.random.default_rng(seed))
    with warnings.catch_warnings():  # "balance properties" warning for non-powers of two
        warnings.simplefilter("ignore", UserWarning)
        u = sampler.random(particles)
    a = np.sqrt(6.0 / (dim + head_dim))
    mats = (a * (2.0 * u - 1.0)).reshape(particles, 4, dim, head_dim)
    mats = jnp.asarray(mats, dtype=dtype)
    return AttentionParams(*(jnp.repeat(mats[None, :, i], num_nodes, axis=0) for i in range(4)))


@renamed_kwargs(disc_params="params")
@eqx.filter_jit
def flow_error(
    params: AttentionParams,
    grid,
    measure,
    loss,
    beta,
    test_points,
    test_labels=None,
    *,
    test_positions=None,
    interpolation=None,
    rtol: ScalarLike | None = None,
    atol: ScalarLike | None = None,
    max_steps: int = 4096,
    kernel=None,
    geometry=None,
    normalization: str | None = None,
):
    """The theorem's error for every test particle `z` (docs/theory.md, section 7):

        max_l |z^l - z(l/L)| + |p_z^l - p_z(l/L)|,

    the discrete model's flow map and adjoint against the limit's, both carried
    by the field of the same token measure.

    **Returns:** `(m,)`, one error per test particle (take the max for the
    uniform error, one entry for a pointwise error). It is differentiable in
    `test_points`, for an adversarial search of the sup over `z`.

    **Arguments:** `params` (formerly `disc_params`): the discrete model's
    `(L, H, d, k)` parameters; `grid`: the limit's parameters (an
    `AttentionParams` depth grid or a [`mfattn.ParamPath`][]); the rest as in
    [`mfattn.solve_discrete`][] and [`mfattn.solve_limit`][] (the same `kernel`,
    causal or not, and the same `geometry`, for both models). With
    `geometry=mfattn.Sphere()` (formerly `normalization="sphere"`) the
    post-normalised transformer is compared with
    the projected flow; both adjoints are then tangent (docs/theory.md,
    section 10), so the same formula applies.
    """
    L = params.depth
    common = dict(
        test_labels=test_labels,
        test_positions=test_positions,
        kernel=kernel,
        geometry=as_geometry(geometry, normalization),
    )
    disc = solve_discrete(params, measure, loss, beta, test_points, **common)
    saveat = diffrax.SaveAt(ts=jnp.arange(L + 1, dtype=disc.ts.dtype) / L)
    lim = solve_limit(
        grid,
        measure,
        loss,
        beta,
        test_points,
        saveat=saveat,
        interpolation=interpolation,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        **common,
    )
    return jnp.max(_norm(disc.test_xs - lim.test_xs) + _norm(disc.test_ps - lim.test_ps), axis=0)


def _norm(x):
    """Euclidean norm over the last axis, with a zero (not NaN) gradient at 0, so
    that `flow_error` can be differentiated in `test_points` (at `l = 0` the two
    states coincide)."""
    sq = jnp.sum(x**2, axis=-1)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


class BiasFluctuation(NamedTuple):
    """What [`mfattn.bias_fluctuation`][] returns (all in the sup over points).

    - `total`: `(R,)`, each sample's error against the reference.
    - `bias`: the error of the mean over samples against the reference.
    - `fluctuation`: `(R,)`, each sample's distance to the mean over samples.
    - `noise`: the largest standard error of the mean at one point
      (`sum_c sqrt(trace Cov_c / R)`): the size of the Monte-Carlo error that
      `bias` carries from averaging only `R` samples; a bias below about
      twice this is not resolved.
    """

    total: Float[Array, " R"]
    bias: Float[Array, ""]
    fluctuation: Float[Array, " R"]
    noise: Float[Array, ""]


def bias_fluctuation(samples, reference) -> BiasFluctuation:
    """Split the error of independent samples (initialisations) of a random
    trajectory into a bias and a fluctuation (docs/theory.md, section 7).

    With the error at a point `q` (a test particle, a layer, a training step)
    `e(a, b)(q) = sum_c |a_c(q) - b_c(q)|` summed over the components `c`
    (e.g. the state and the adjoint), and `abar` the mean over samples:

        total_r     = max_q e(a_r, ref)(q)
        bias        = max_q e(abar, ref)(q)
        fluctuation_r = max_q e(a_r, abar)(q)

    so that `total_r <= bias + fluctuation_r`. For the transformer, `a_r` is
    the discrete model of initialisation `r` and `ref` the limit: the bias is
    what averaging over initialisations does not remove (the Euler term, and
    training), the fluctuation the central-limit part.

    **Arguments:**

    - `samples`: a tuple of components, each `(R, *points, c)` (the last axis
      is the vector whose Euclidean norm is taken; the `points` axes are
      maximised over).
    - `reference`: a tuple of the same components, each `(*points, c)`.

    **Returns:** a [`mfattn.BiasFluctuation`][].

    **Raises:** `ValueError` when shapes disagree or `R < 2`.
    """
    samples, reference = tuple(samples), tuple(reference)
    if len(samples) != len(reference) or not samples:
        raise ValueError("`samples` and `reference` must be tuples of the same components")
    R = samples[0].shape[0]
    if R < 2:
        raise ValueError(f"`samples` needs at least 2 samples on its leading axis, got {R}")
    for a, b in zip(samples, reference):
        if a.shape[1:] != b.shape or a.shape[0] != R:
            raise ValueError(
                f"each component of `samples` must be (R, *reference.shape); got {a.shape} "
                f"against {b.shape}"
            )
    means = tuple(jnp.mean(a, axis=0) for a in samples)
    axes = tuple(range(1, samples[0].ndim - 1))

    def err(a, b):
        return sum(jnp.linalg.norm(x - y, axis=-1) for x, y in zip(a, b))

    def one_sample(c):
        """`(1, *reference.shape)`: the sample axis written out against `samples`."""
        return tuple(y[None] for y in c)

    vs_ref, vs_means = err(samples, one_sample(reference)), err(samples, one_sample(means))
    total = jnp.max(vs_ref, axis=axes) if axes else vs_ref
    fluct = jnp.max(vs_means, axis=axes) if axes else vs_means
    bias = jnp.max(err(means, reference))
    noise = jnp.max(
        sum(jnp.sqrt(jnp.sum(jnp.var(a, axis=0, ddof=1), axis=-1) / R) for a in samples)
    )
    return BiasFluctuation(total, bias, fluct, noise)
