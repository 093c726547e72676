"""Clusters of tokens: counting them, the time to one cluster, and metastable
plateaus of the number of clusters along a trajectory (docs/theory.md, section 10).

A *cluster at tolerance `tol`* is a connected component of the graph that links
two tokens when their distance is at most `tol` (single linkage). When the tokens
sit in `K` groups of diameter below `tol` that are more than `tol` apart, this
counts `K` whatever `tol` in between; at intermediate times (tokens spread out,
chains of close neighbours) the count depends on `tol`, which is why every
function here takes it as an argument.

Distances: `metric="angle"` (default) is the geodesic distance between the
*directions* `x / |x|`, in radians, `2 arcsin(|u - v| / 2)` for unit `u, v`: the
natural one for normalised tokens on the sphere. `metric="euclidean"` is `|x - y|`
(on the unit sphere this is the chordal distance `2 sin(angle / 2)`). Both are
computed from Gram matrices, so that memory is `O(n^2)`, not `O(n^2 d)`; the
resolution is about `1e-7` (angle) in float64 and `3e-3` in float32, so use
tolerances well above that.
"""

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ._checks import as_float_array, check_finite, check_finite_args, check_nonnegative_weights
from ._custom_types import ScalarLike


def _check_metric(metric):
    if metric not in ("angle", "euclidean"):
        raise ValueError(f"`metric` must be 'angle' or 'euclidean', got {metric!r}")


def _check_tol(tol, name="tol"):
    if isinstance(tol, (bool, np.bool_)) or np.ndim(tol) != 0:
        raise TypeError(f"`{name}` must be a non-negative scalar, got {tol!r}")
    if not isinstance(tol, jax.core.Tracer) and not (float(tol) >= 0):
        raise ValueError(f"`{name}` must be a non-negative number, got {tol!r}")


def pairwise_distances(
    points: Float[ArrayLike, "n d"], *, metric: str = "angle"
) -> Float[Array, "n n"]:
    """All pairwise distances between tokens (see the module docstring for the
    metrics). Diagonal exactly zero."""
    _check_metric(metric)
    return _pairwise(check_finite(as_float_array(points, "points", ndim=2), "points"), metric)


@functools.partial(jax.jit, static_argnums=1)
def _pairwise(x, metric):
    if metric == "angle":
        u = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        chord2 = 2.0 - 2.0 * (u @ u.T)
    else:
        sq = jnp.sum(x * x, axis=-1)
        chord2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    chord = jnp.sqrt(jnp.maximum(chord2, 0.0))
    if metric == "angle":
        chord = 2.0 * jnp.arcsin(jnp.minimum(chord / 2.0, 1.0))
    return jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, chord)


def diameter(points: Float[ArrayLike, "n d"], *, metric: str = "angle") -> Float[Array, ""]:
    """The diameter of a token set, `max_{i,j} dist(x_i, x_j)`: the tokens form one
    cluster of size at most `tol` when it is at most `tol`.

    **Arguments:**

    - `points`: tokens `(n, d)`.
    - `metric`: `"angle"` (radians between directions, default) or `"euclidean"`.

    **Returns:** a scalar.
    """
    return jnp.max(pairwise_distances(points, metric=metric))


def _labels_from_adjacency(adj: Bool[Array, "n n"]) -> Int[Array, " n"]:
    # Min-label propagation with pointer jumping. Invariants: labels[i] is the
    # index of a token in i's component and labels[i] <= i, so the labels
    # decrease monotonically; at the fixed point they are constant on every
    # component and equal to its smallest index.
    n = adj.shape[0]
    big = jnp.asarray(n, jnp.int32)

    def body(state):
        labels, _ = state
        new = jnp.min(jnp.where(adj, labels[None, :], big), axis=1)
        new = new[new]
        return new, jnp.any(new != labels)

    labels, _ = lax.while_loop(
        lambda s: s[1], body, (jnp.arange(n, dtype=jnp.int32), jnp.asarray(True))
    )
    return labels


def cluster_labels(
    points: Float[ArrayLike, "n d"], *, tol: ScalarLike, metric: str = "angle"
) -> Int[Array, " n"]:
    """Which cluster every token belongs to, at tolerance `tol` (single linkage:
    the connected components of the graph linking tokens at distance `<= tol`).

    **Arguments:**

    - `points`: tokens `(n, d)`. Map over a trajectory with `jax.vmap`.
    - `tol`: the linking distance (radians for `metric="angle"`).
    - `metric`: `"angle"` (default) or `"euclidean"`; see the module docstring.

    **Returns:** `(n,)` int32 labels; the label of a cluster is the smallest index
    of its tokens, so two tokens are in one cluster iff their labels are equal.

    See docs/theory.md, section 10.
    """
    _check_tol(tol)
    _check_metric(metric)
    x = check_finite(as_float_array(points, "points", ndim=2), "points")
    return _labels(x, jnp.asarray(tol, x.dtype), metric)


@functools.partial(jax.jit, static_argnums=2)
def _labels(x, tol, metric):
    return _labels_from_adjacency(_pairwise(x, metric) <= tol)


def count_clusters(
    points: Float[ArrayLike, "n d"],
    *,
    tol: ScalarLike,
    weights: Float[ArrayLike, " _n"] | None = None,
    min_mass: ScalarLike = 0.0,
    metric: str = "angle",
) -> Int[Array, ""]:
    """The number of clusters of a token set at tolerance `tol` (see
    [`mfattn.cluster_labels`][]), counting only clusters whose mass exceeds
    `min_mass`.

    **Arguments:**

    - `points`: tokens `(n, d)`. Map over a trajectory `(T, n, d)` with `jax.vmap`.
    - `tol`: the linking distance (radians for `metric="angle"`).
    - `weights`: token masses `(n,)` (default uniform `1/n`); zero-mass tokens
      never make a cluster of their own.
    - `min_mass`: clusters of total mass `<= min_mass` are not counted (e.g.
      `2.5 / n` ignores stragglers of one or two tokens between clusters).
      Default `0`: every cluster of positive mass counts.
    - `metric`: `"angle"` (default) or `"euclidean"`.

    **Returns:** an int32 scalar.

    See docs/theory.md, section 10.
    """
    _check_tol(min_mass, "min_mass")
    x = check_finite(as_float_array(points, "points", ndim=2), "points")
    n = x.shape[0]
    if weights is None:
        weights = jnp.full((n,), 1.0 / n, x.dtype)
    else:
        weights = as_float_array(weights, "weights", ndim=1)
        if weights.shape[0] != n:
            raise ValueError(f"`weights` has length {weights.shape[0]}, `points` has {n} tokens")
        weights = check_nonnegative_weights(weights, "weights")
    _check_tol(tol)
    _check_metric(metric)
    return _count(x, weights.astype(x.dtype), jnp.asarray(tol, x.dtype), min_mass, metric)


@functools.partial(jax.jit, static_argnums=4)
def _count(x, weights, tol, min_mass, metric):
    labels = _labels(x, tol, metric)
    mass = jax.ops.segment_sum(weights, labels, num_segments=x.shape[0])
    return jnp.sum(mass > min_mass).astype(jnp.int32)


def time_to_one_cluster(
    ts: Float[ArrayLike, " T"] | Sequence[float],
    xs: Float[ArrayLike, "T n d"],
    *,
    tol: ScalarLike,
    metric: str = "angle",
    interpolate: bool = False,
) -> Float[Array, ""]:
    """The first time at which all tokens fit in one cluster of diameter `<= tol`.

    A diameter below `tol` implies `count_clusters(x, tol=tol) == 1`; the
    converse fails for chains of tokens, which is why the diameter is used here.

    **Arguments:**

    - `ts`: increasing save times `(T,)`; `xs`: the tokens at those times `(T, n, d)`.
    - `tol`: the diameter threshold (radians for `metric="angle"`).
    - `metric`: `"angle"` (default) or `"euclidean"`.
    - `interpolate`: `False` (default) returns the first save time with diameter
      `<= tol` (resolution: the spacing of `ts`). `True` interpolates
      `log(diameter)` linearly between that save time and the previous one, which
      is exact when the diameter decays exponentially between them (as it does
      once the tokens are in one cluster).

    **Returns:** a scalar time; `inf` if the diameter never drops to `tol`.

    See docs/theory.md, section 10.
    """
    _check_tol(tol)
    ts = as_float_array(ts, "ts", ndim=1)
    xs = as_float_array(xs, "xs", ndim=3)
    if xs.shape[0] != ts.shape[0]:
        raise ValueError(f"`xs` has {xs.shape[0]} states but `ts` has {ts.shape[0]} times")
    ts, xs = check_finite_args(ts=ts, xs=xs)
    _check_metric(metric)
    return _time_to_one(ts, xs, jnp.asarray(tol, xs.dtype), metric, interpolate)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _time_to_one(ts, xs, tol, metric, interpolate):
    diam = jax.vmap(lambda x: jnp.max(_pairwise(x, metric)))(xs)
    hit = diam <= tol
    i = jnp.argmax(hit)
    t = ts[i]
    if interpolate:
        j = jnp.maximum(i - 1, 0)
        ld0, ld1 = jnp.log(diam[j]), jnp.log(jnp.maximum(diam[i], 1e-300))
        frac = (ld0 - jnp.log(tol)) / jnp.where(ld0 > ld1, ld0 - ld1, 1.0)
        t = jnp.where(i > 0, ts[j] + jnp.clip(frac, 0.0, 1.0) * (ts[i] - ts[j]), t)
    return jnp.where(jnp.any(hit), t, jnp.inf)


class Plateau(NamedTuple):
    """A stretch of a trajectory during which the number of clusters is constant.

    **Fields:** `num_clusters`; `start`, `end`: the first and last save times of
    the stretch; `final`: whether the trajectory ends on it (then `end` is the
    horizon and the true end is later).
    """

    num_clusters: int
    start: float
    end: float
    final: bool

    @property
    def duration(self) -> float:
        return self.end - self.start


def metastable_plateaus(
    ts: Float[ArrayLike, " T"] | Sequence[float],
    counts: Int[ArrayLike, " T"] | Sequence[int],
    *,
    min_duration: float,
    log_time: bool = False,
) -> list[Plateau]:
    """The plateaus of the number of clusters along a trajectory: maximal
    stretches of constant count lasting at least `min_duration`.

    Stretches shorter than `min_duration` (transients, a straggler token joining
    a cluster) are dropped first; consecutive kept stretches with the same count
    are then merged into one plateau (from the first one's start to the last
    one's end). This runs on the host (numpy); compute `counts` with
    `jax.vmap(count_clusters)` first.

    **Arguments:**

    - `ts`: increasing save times `(T,)`, e.g. log-spaced over a long horizon.
    - `counts`: the number of clusters at those times `(T,)`.
    - `min_duration`: the shortest stretch kept, in units of `t`, or of
      `log t` (a ratio `end / start >= exp(min_duration)`) when `log_time=True`,
      the natural unit when plateaus last exponentially long; then `ts` must be
      positive.
    - `log_time`: see `min_duration`.

    **Returns:** a list of [`mfattn.Plateau`][] in time order.

    See docs/theory.md, section 10.
    """
    ts = np.asarray(ts, dtype=np.float64)
    counts = np.asarray(counts)
    if ts.ndim != 1 or counts.shape != ts.shape:
        raise ValueError(
            f"`ts` and `counts` must be 1-D of equal length, got {ts.shape}, {counts.shape}"
        )
    if ts.size == 0:
        return []
    if np.any(np.diff(ts) <= 0):
        raise ValueError("`ts` must be strictly increasing")
    if log_time and ts[0] <= 0:
        raise ValueError("`log_time=True` needs positive `ts`")
    if not min_duration >= 0:
        raise ValueError(f"`min_duration` must be non-negative, got {min_duration!r}")
    clock = np.log(ts) if log_time else ts
    change = np.flatnonzero(np.diff(counts) != 0) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [ts.size]])  # exclusive
    runs = []
    for s, e in zip(starts, ends):
        # a stretch runs from its first to its last save time (conservative: the
        # count changes somewhere between its last save time and the next one)
        if clock[e - 1] - clock[s] >= min_duration:
            runs.append([int(counts[s]), s, e, e == ts.size])
    merged: list[list] = []
    for run in runs:
        if merged and merged[-1][0] == run[0]:
            merged[-1][2], merged[-1][3] = run[2], run[3]
        else:
            merged.append(run)
    return [Plateau(c, float(ts[s]), float(ts[e - 1]), bool(final)) for c, s, e, final in merged]
