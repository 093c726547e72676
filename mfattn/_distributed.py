"""Batches across the devices of several processes (multi-controller JAX).

Under `jax.distributed.initialize()` every process runs the same program and
`jax.devices()` lists the devices of all of them. A batch of token sets split
over a one-axis mesh of those devices is solved in parallel: each device runs
the vmapped solve on its part, and the batch-mean gradient map is one
all-reduce. The helpers here place host data on such a mesh and bring results
back; [`mfattn.train`][] uses them itself.

Work that is not one batch, such as a study's independent conditions, is
split instead: each process takes its [`mfattn.process_share`][] of the
list, writes its own results, and the processes meet at a
[`mfattn.barrier`][] before process 0 reads them all.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXIS = "batch"


def batch_mesh(devices=None) -> Mesh:
    """A one-axis mesh, axis `"batch"`, over every device of every process
    (`jax.devices()`; in one process, its own devices).

    **Arguments:** `devices`: a sequence of devices (default: all).

    **Returns:** a `jax.sharding.Mesh` with an `Auto` axis.

    **Raises:** `ValueError` for an empty `devices`.
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("`devices` must hold at least one device")
    return Mesh(np.asarray(devices), (BATCH_AXIS,), axis_types=(AxisType.Auto,))


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes files and shows progress."""
    return jax.process_index() == 0


def process_share(items) -> list:
    """This process's share of `items` under multi-controller JAX: the items
    at positions `i, i + P, i + 2P, ...` for process `i` of `P`
    (round-robin), in their order. Each item falls to exactly one process,
    and to the same one on every run with the same number of processes (a
    resumed study gives each process the conditions it had). In one process:
    every item.

    Every process must pass the same items in the same order. The split is by
    position, not by cost: where items differ much in cost, put them in an
    order that alternates them.

    **Arguments:** `items`: an iterable (e.g. a study's conditions, in the
    order they run; `enumerate(...)` of them to keep their positions).

    **Returns:** a list of this process's items.
    """
    return list(items)[jax.process_index() :: jax.process_count()]


_BARRIER_TIMEOUT = 7 * 24 * 3600
_barrier_counts: dict[str, int] = {}


def barrier(name: str, timeout: float | int = _BARRIER_TIMEOUT) -> None:
    """Wait until every process has reached the barrier `name` (e.g. after
    its share of a study, before process 0 reads every process's results).
    In one process: returns at once.

    It waits on the coordination service of `jax.distributed`, not on a
    collective of the devices: nothing is compiled, and no collective's own
    timeout cuts short a wait for a process whose share takes hours. A barrier
    of the same `name` may be reached again (each time is its own barrier).
    Every process must reach the same barriers in the same order.

    **Arguments:**

    - `name`: what the processes wait for, named in the error of a failed
      wait.
    - `timeout`: seconds to wait (default: a week) before failing.

    **Raises:** `ValueError` for an empty `name` or a `timeout` that is not
    positive; the error of `jax.distributed` when the wait times out or
    another process has failed.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string, got {name!r}")
    if not timeout > 0:
        raise ValueError(f"`timeout` must be positive, got {timeout!r}")
    if jax.process_count() == 1:
        return
    count = _barrier_counts.get(name, 0)
    _barrier_counts[name] = count + 1
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:  # processes without the coordination service
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"mfattn:{name}:{count}")
        return
    ms = min(int(timeout * 1000), 2**31 - 1)
    client.wait_at_barrier(f"mfattn:{name}:{count}", timeout_in_ms=ms)


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _place(x, sharding):
    """A global array from `x`, which every process holds whole (the same values)."""
    if _is_key(x):
        data = _place(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # already global: reshard
    a = np.asarray(x)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def _check_mesh(mesh):
    if not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}")


def replicate(tree, mesh: Mesh):
    """`tree` with every array leaf placed whole on every device of `mesh`
    (a model, an optimiser state): every process passes the same values.

    **Raises:** `TypeError` for a `mesh` that is not a `jax.sharding.Mesh`.
    """
    _check_mesh(mesh)
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: _place(x, sharding) if eqx.is_array(x) else x, tree)


def batch_spec(mesh: Mesh) -> P:
    """The partition spec of a batch: the leading axis over all the mesh's axes."""
    return P(tuple(mesh.axis_names))


def shard_batch(tree, mesh: Mesh):
    """A batch (array leaves with a leading batch axis, e.g. the
    `(measures, losses)` of a sampler) as global arrays whose leading axis is
    split over the devices of `mesh`; scalar leaves are replicated. Every
    process passes the whole batch (the same values: draw it from the same
    key); each keeps the parts of its own devices.

    **Raises:** `ValueError` when a leaf's leading axis is not a multiple of
    the number of devices of `mesh`; `TypeError` for a bad `mesh`.
    """
    _check_mesh(mesh)
    split = NamedSharding(mesh, batch_spec(mesh))
    whole = NamedSharding(mesh, P())

    def put(x):
        if not eqx.is_array(x):
            return x
        if jnp.ndim(x) == 0:
            return _place(x, whole)
        if x.shape[0] % mesh.size:
            raise ValueError(
                f"a batch of {x.shape[0]} cannot be split over the {mesh.size} devices of "
                "`mesh`: use a batch size that is a multiple of the number of devices"
            )
        return _place(x, split)

    return jax.tree.map(put, tree)


def constrain_batch(tree, mesh: Mesh, batch_size: int):
    """Inside `jit`: the leaves with a leading axis of `batch_size` split over
    `mesh` (the others left to the compiler)."""
    split = NamedSharding(mesh, batch_spec(mesh))

    def put(x):
        if eqx.is_array(x) and jnp.ndim(x) >= 1 and x.shape[0] == batch_size:
            return jax.lax.with_sharding_constraint(x, split)
        return x

    return jax.tree.map(put, tree)


def gather(tree):
    """Every array leaf as a host-local array, the same on every process: a
    batch split over the processes' devices is gathered (all processes must
    call this); an array of this process alone is returned as it is.
    """

    def get(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if _is_key(x):
            data = get(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        if x.is_fully_replicated:
            return jnp.asarray(x.addressable_shards[0].data)
        from jax.experimental import multihost_utils

        return jnp.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)


def all_ok(ok: bool, what: str):
    """Every process says whether `what` went well on it; a process where it
    did raises when another one failed (that one raises its own error), so that
    no process waits for a failed one. All processes must call this."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.asarray(int(bool(ok)), np.int32)))
    if ok and not np.all(flags):
        bad = np.flatnonzero(flags == 0).tolist()
        raise RuntimeError(f"{what} failed on process(es) {bad}: see the error there")


def check_same(value, what: str):
    """Raise on every process when processes disagree on an integer `value`."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    values = np.asarray(multihost_utils.process_allgather(np.asarray(value, np.int64)))
    if np.any(values != values.flat[0]):
        raise RuntimeError(
            f"the processes disagree on {what}: {values.tolist()} (process 0 first); "
            "every process must see the same `checkpoint_dir` (a shared file system) "
            "and pass the same arguments"
        )
