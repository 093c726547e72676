"""Any kernel with its queries sharded across the devices of a mesh."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from ._base import AbstractAttentionKernel, check_positions


def auto_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axis names with `Auto` axis types (`jax.make_mesh`
    defaults to `Explicit` ones, under which `shard_map` would require inputs
    already sharded as its `in_specs`); the kernel places data itself."""
    axis_types = getattr(mesh, "axis_types", None)
    if axis_types is None or all(t == AxisType.Auto for t in axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(axis_types))


def _pad(x, axis, pad):
    if x is None or not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


class ShardedKernel(AbstractAttentionKernel):
    """Wraps a kernel so that its queries are split over all the devices of a
    `jax.sharding.Mesh` (`jax.shard_map`): keys and values are gathered on
    every device, query-side outputs (`o`, `aux`, `dq`) stay sharded and
    key-side sums (`dk`, `dv`) are reduced with `psum`. Each device runs the
    wrapped kernel on its block, so memory per device is that of
    `m / devices` queries. Queries are padded to a multiple of the number of
    devices with weight 0 (no effect on the key sides) and the padding is
    sliced off. The numbers are those of one device, to rounding.

    **Arguments:**

    - `kernel`: the per-device kernel ([`mfattn.DenseKernel`][] or
      [`mfattn.ChunkedKernel`][]); it decides `causal`, `uses_positions` and
      whether there is a backward pass.
    - `mesh`: a `jax.sharding.Mesh`; its axes are used as `Auto` axes (an
      `Explicit` mesh, `jax.make_mesh`'s default, is converted). To place data
      on the devices yourself, e.g. parameters replicated so that a jitted
      training step sees the same input shardings at every call, create the
      mesh with `axis_types=(jax.sharding.AxisType.Auto,) * ndim`.
    """

    kernel: AbstractAttentionKernel
    mesh: Mesh = eqx.field(static=True)

    def __init__(self, kernel: AbstractAttentionKernel, mesh: Mesh):
        if not isinstance(kernel, AbstractAttentionKernel):
            raise TypeError(f"`kernel` must be an attention kernel, got {type(kernel).__name__}")
        if not isinstance(mesh, Mesh):
            raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}")
        self.kernel = kernel
        self.mesh = auto_mesh(mesh)

    @property
    def causal(self) -> bool:
        return self.kernel.causal

    @property
    def uses_positions(self) -> bool:
        return self.kernel.uses_positions

    @property
    def has_backward(self) -> bool:
        return self.kernel.has_backward

    def _specs(self):
        axes = tuple(self.mesh.axis_names)
        return axes, P(None, axes), P(axes)

    def _smap(self, f, in_specs, out_specs):
        return jax.shard_map(
            f, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )

    def _positions(self, qpos, kpos, pad):
        if qpos is None:
            return (), ()
        _, _, S0 = self._specs()
        return (_pad(qpos, 0, pad), kpos), (S0, P())

    def forward(self, q, k, v, w, beta, qpos=None, kpos=None):
        qpos, kpos = check_positions(self, qpos, kpos)
        m, pad = q.shape[1], (-q.shape[1]) % self.mesh.size
        _, S, S0 = self._specs()

        def local(q, k, v, w, beta, pos):
            return self.kernel.forward(q, k, v, w, beta, *pos)

        pos, pos_specs = self._positions(qpos, kpos, pad)
        f = self._smap(local, (S, P(), P(), P(), P(), pos_specs), (S, S))
        o, aux = f(_pad(q, 1, pad), k, v, w, jnp.asarray(beta), pos)
        return o[:, :m], jax.tree.map(lambda a: a[:, :m], aux)

    def backward(self, q, k, v, w, o, aux, c, u, beta, qpos=None, kpos=None):
        qpos, kpos = check_positions(self, qpos, kpos)
        m, pad = q.shape[1], (-q.shape[1]) % self.mesh.size
        axes, S, S0 = self._specs()

        def local(q, k, v, w, o, aux, c, u, beta, pos):
            dq, dk, dv = self.kernel.backward(q, k, v, w, o, aux, c, u, beta, *pos)
            return dq, jax.lax.psum(dk, axes), jax.lax.psum(dv, axes)

        pos, pos_specs = self._positions(qpos, kpos, pad)
        in_specs = (S, P(), P(), P(), S, S, S, S0, P(), pos_specs)
        f = self._smap(local, in_specs, (S, P(), P()))
        padq = lambda x: _pad(x, 1, pad)
        dq, dk, dv = f(
            padq(q),
            k,
            v,
            w,
            padq(o),
            jax.tree.map(padq, aux),
            padq(c),
            _pad(u, 0, pad),
            jnp.asarray(beta),
            pos,
        )
        return dq[:, :m], dk, dv
