"""Token-sharded attention kernels (private): query blocks across devices.

The queries of every kernel call (`q`, and the per-query `o`, `lse`, `c`, `u`)
are split along the token axis over all the axes of a `jax.sharding.Mesh`
with `jax.shard_map`; keys and values are replicated (gathered) on every
device. Query-side outputs (`o`, `lse`, `dq`) stay sharded; key-side outputs
(`dk`, `dv`, sums over queries) are reduced with `psum`. Each device runs the
dense or chunked kernel of `_kernel.py` on its block (the fused backward too:
one density evaluation per query block serves both sides), so memory per device is
that of `m / devices` queries. Queries are padded to a multiple of the number
of devices with weight 0 (they do not contribute to key-side sums) and the
padding is sliced off.
"""

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P


def auto_mesh(mesh):
    """The same devices and axis names with `Auto` axis types (`jax.make_mesh`
    defaults to `Explicit` ones, under which `shard_map` would require inputs
    already sharded as its `in_specs`); the kernels here place data themselves."""
    axis_types = getattr(mesh, "axis_types", None)
    if axis_types is None or all(t == AxisType.Auto for t in axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(axis_types))


def _pad(x, axis, pad):
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _spec(mesh):
    return P(None, tuple(mesh.axis_names))


def _smap(mesh, f, in_specs, out_specs):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def forward(mesh, kernel, q, k, v, w):
    """`kernel(q, k, v, w) -> (o, lse)` with queries sharded."""
    m, pad = q.shape[1], (-q.shape[1]) % mesh.size
    S = _spec(mesh)
    f = _smap(mesh, kernel, (S, P(), P(), P()), (S, S))
    o, lse = f(_pad(q, 1, pad), k, v, w)
    return o[:, :m], lse[:, :m]


def query_side(mesh, kernel, q, k, v, w, o, lse, c):
    """`kernel(q, k, v, w, o, lse, c) -> dq` with queries sharded."""
    m, pad = q.shape[1], (-q.shape[1]) % mesh.size
    S = _spec(mesh)
    f = _smap(mesh, kernel, (S, P(), P(), P(), S, S, S), S)
    padq = lambda x: _pad(x, 1, pad)
    return f(padq(q), k, v, w, padq(o), padq(lse), padq(c))[:, :m]


def key_side(mesh, kernel, q, o, lse, c, u, kp, vp):
    """`kernel(q, o, lse, c, u, kp, vp) -> (dk, dv)`: sums over the sharded
    queries, reduced across devices."""
    pad = (-q.shape[1]) % mesh.size
    S = _spec(mesh)
    axes = tuple(mesh.axis_names)

    def local(q, o, lse, c, u, kp, vp):
        dk, dv = kernel(q, o, lse, c, u, kp, vp)
        return jax.lax.psum(dk, axes), jax.lax.psum(dv, axes)

    f = _smap(mesh, local, (S, S, S, S, P(axes), P(), P()), (P(), P()))
    padq = lambda x: _pad(x, 1, pad)
    return f(padq(q), padq(o), padq(lse), padq(c), _pad(u, 0, pad), kp, vp)


def backward(mesh, kernel, q, k, v, w, o, lse, c):
    """`kernel(q, k, v, w, o, lse, c, u=u) -> (dq, dk, dv)` for queries = the
    atoms: each device takes a block of queries (weights `u`) against all the
    keys; `dq` stays sharded, `dk, dv` are reduced."""
    m, pad = q.shape[1], (-q.shape[1]) % mesh.size
    S = _spec(mesh)
    axes = tuple(mesh.axis_names)

    def local(q, k, v, w, o, lse, c, u):
        dq, dk, dv = kernel(q, k, v, w, o, lse, c, u=u)
        return dq, jax.lax.psum(dk, axes), jax.lax.psum(dv, axes)

    f = _smap(mesh, local, (S, P(), P(), P(), S, S, S, P(axes)), (S, P(), P()))
    padq = lambda x: _pad(x, 1, pad)
    dq, dk, dv = f(padq(q), k, v, w, padq(o), padq(lse), padq(c), _pad(w, 0, pad))
    return dq[:, :m], dk, dv
