"""Cluster counting, time to one cluster and metastable plateaus, on
configurations with known answers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.sparse.csgraph import connected_components

import mfattn


def _on_sphere(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _tight_clusters(key, num_clusters, per_cluster, d, spread):
    """`num_clusters` random directions, each with `per_cluster` tokens within
    angle ~`spread` of it."""
    kc, kp = jax.random.split(key)
    centres = _on_sphere(jax.random.normal(kc, (num_clusters, d)))
    noise = spread * jax.random.normal(kp, (num_clusters, per_cluster, d)) / math.sqrt(d)
    return _on_sphere(centres[:, None] + noise).reshape(-1, d), centres


def test_pairwise_distances_metrics(getkey):
    x = _on_sphere(jax.random.normal(getkey(), (30, 3)))
    ang = mfattn.pairwise_distances(x, metric="angle")
    ref = np.arccos(np.clip(np.asarray(x @ x.T), -1, 1))
    np.fill_diagonal(ref, 0)
    assert np.max(np.abs(np.asarray(ang) - ref)) < 1e-7
    chord = mfattn.pairwise_distances(x, metric="euclidean")
    ref_chord = np.linalg.norm(np.asarray(x)[:, None] - np.asarray(x)[None], axis=-1)
    assert np.max(np.abs(np.asarray(chord) - ref_chord)) < 1e-7
    # on the unit sphere the chord is 2 sin(angle / 2)
    assert np.max(np.abs(np.asarray(chord) - 2 * np.sin(np.asarray(ang) / 2))) < 1e-7
    # "angle" only sees directions
    ang_scaled = mfattn.pairwise_distances(3.0 * x, metric="angle")
    assert np.max(np.abs(np.asarray(ang_scaled) - np.asarray(ang))) < 1e-12
    assert np.all(np.diag(np.asarray(ang)) == 0)


@pytest.mark.parametrize(
    "num_clusters,d", [(4, 3), (7, 5), pytest.param(1, 3, marks=pytest.mark.slow)]
)
def test_count_tight_clusters(getkey, num_clusters, d):
    x, centres = _tight_clusters(getkey(), num_clusters, 6, d, spread=1e-4)
    gaps = np.asarray(mfattn.pairwise_distances(centres))
    sep = gaps[~np.eye(num_clusters, dtype=bool)].min() if num_clusters > 1 else np.pi
    assert sep > 0.1  # the random centres are well separated
    perm = jax.random.permutation(getkey(), x.shape[0])
    for tol in (1e-2, 0.05):
        assert int(mfattn.count_clusters(x[perm], tol=tol)) == num_clusters
    # below the clusters' size every token is alone
    assert int(mfattn.count_clusters(x, tol=1e-8)) == x.shape[0]
    # the whole sphere links everything
    assert int(mfattn.count_clusters(x, tol=4.0)) == 1


def test_labels_match_scipy_connected_components(getkey):
    """Random points and a tolerance in the percolating regime: the partition
    equals scipy's connected components of the same graph."""
    for _ in range(5):
        x = _on_sphere(jax.random.normal(getkey(), (80, 3)))
        dist = np.asarray(mfattn.pairwise_distances(x))
        tol = float(np.quantile(dist[np.triu_indices(80, 1)], 0.03))
        labels = np.asarray(mfattn.cluster_labels(x, tol=tol))
        ncomp, ref = connected_components(dist <= tol, directed=False)
        assert len(np.unique(labels)) == ncomp == int(mfattn.count_clusters(x, tol=tol))
        # same partition: a bijection between label sets
        pairs = set(zip(labels.tolist(), ref.tolist()))
        assert len(pairs) == ncomp
        # labels are the smallest index of each cluster
        for lab in np.unique(labels):
            assert lab == np.flatnonzero(labels == lab).min()


def test_chain_is_one_cluster_but_has_large_diameter():
    """Tokens along an arc, 0.05 apart: one cluster at tol 0.06 (single
    linkage chains them), each alone at tol 0.04; the diameter is the arc."""
    theta = 0.05 * np.arange(20)
    x = jnp.stack([jnp.cos(theta), jnp.sin(theta)], -1)
    assert int(mfattn.count_clusters(x, tol=0.06)) == 1
    assert int(mfattn.count_clusters(x, tol=0.04)) == 20
    assert abs(float(mfattn.diameter(x)) - 0.95) < 1e-7
    assert abs(float(mfattn.diameter(x, metric="euclidean")) - 2 * np.sin(0.475)) < 1e-12


def test_min_mass_and_weights(getkey):
    x, _ = _tight_clusters(getkey(), 3, 10, 3, spread=1e-4)
    straggler = _on_sphere(jax.random.normal(getkey(), (1, 3)))
    y = jnp.concatenate([x, straggler])
    n = y.shape[0]
    assert int(mfattn.count_clusters(y, tol=1e-2)) == 4
    assert int(mfattn.count_clusters(y, tol=1e-2, min_mass=1.5 / n)) == 3
    w = jnp.concatenate([jnp.full((30,), 1 / 30), jnp.zeros(1)])
    assert int(mfattn.count_clusters(y, tol=1e-2, weights=w)) == 3


def test_vmap_and_traced_tol(getkey):
    xs = jnp.stack([_tight_clusters(getkey(), k, 10 // k, 3, 1e-4)[0] for k in (1, 2, 2)])
    counts = jax.vmap(lambda x: mfattn.count_clusters(x, tol=1e-2))(xs)
    assert counts.tolist() == [1, 2, 2]
    f = jax.jit(lambda x, t: mfattn.count_clusters(x, tol=t))
    assert int(f(xs[1], 1e-2)) == 2 and int(f(xs[1], 1e-8)) == 10


def test_bad_input():
    x = jnp.ones((3, 2))
    with pytest.raises(ValueError, match="metric"):
        mfattn.count_clusters(x, tol=0.1, metric="cosine")
    with pytest.raises(ValueError, match="tol"):
        mfattn.count_clusters(x, tol=-1.0)
    with pytest.raises(TypeError, match="points"):
        mfattn.count_clusters(jnp.ones((3, 2), int), tol=0.1)
    with pytest.raises(ValueError, match="weights"):
        mfattn.count_clusters(x, tol=0.1, weights=jnp.ones(4) / 4)


def _shrinking_pair(ts, a):
    """Two tokens at angle `a e^{-t}`: diameter `a e^{-t}`."""
    ang = a * jnp.exp(-ts)
    x1 = jnp.stack([jnp.ones_like(ts), jnp.zeros_like(ts)], -1)
    x2 = jnp.stack([jnp.cos(ang), jnp.sin(ang)], -1)
    return jnp.stack([x1, x2], axis=1)


def test_time_to_one_cluster_known_answer():
    a, tol = 1.0, 1e-3
    exact = math.log(a / tol)
    ts = jnp.linspace(0.0, 10.0, 101)
    xs = _shrinking_pair(ts, a)
    t_grid = float(mfattn.time_to_one_cluster(ts, xs, tol=tol))
    assert t_grid == pytest.approx(math.ceil(exact * 10) / 10, abs=1e-12)
    t_int = float(mfattn.time_to_one_cluster(ts, xs, tol=tol, interpolate=True))
    assert abs(t_int - exact) < 1e-6  # log-diameter is linear: interpolation is exact
    # never clustered within the horizon
    assert math.isinf(float(mfattn.time_to_one_cluster(ts[:50], xs[:50], tol=tol)))
    # already one cluster at t = 0
    assert float(mfattn.time_to_one_cluster(ts, xs, tol=2.0, interpolate=True)) == 0.0


def test_metastable_plateaus_known_answer():
    ts = np.arange(100, dtype=float)
    counts = np.array([5] * 10 + [4] + [5] * 5 + [3] * 30 + [2] * 2 + [1] * 52)
    plateaus = mfattn.metastable_plateaus(ts, counts, min_duration=3.0)
    assert [(p.num_clusters, p.start, p.end, p.final) for p in plateaus] == [
        (5, 0.0, 15.0, False),  # the one-sample flicker to 4 is dropped, the 5s merged
        (3, 16.0, 45.0, False),
        (1, 48.0, 99.0, True),
    ]
    assert plateaus[1].duration == 29.0
    # nothing is dropped at min_duration 0
    assert len(mfattn.metastable_plateaus(ts, counts, min_duration=0.0)) == 6
    # log time: plateaus of equal length on a log axis
    ts = np.logspace(0, 6, 61)
    counts = np.repeat([8, 4, 2, 1], [15, 15, 15, 16])
    got = mfattn.metastable_plateaus(ts, counts, min_duration=np.log(10), log_time=True)
    assert [p.num_clusters for p in got] == [8, 4, 2, 1]
    assert got[1].start == pytest.approx(10**1.5) and got[1].end == pytest.approx(10**2.9)
    assert mfattn.metastable_plateaus(ts, counts, min_duration=np.log(1e3), log_time=True) == []
    with pytest.raises(ValueError, match="increasing"):
        mfattn.metastable_plateaus(ts[::-1], counts, min_duration=1.0)
