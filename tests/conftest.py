import os

# 8 host (CPU) devices for the sharding tests; must be set before JAX starts.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)
# as Diffrax's and Equinox's tests: an implicit broadcast between arrays of
# different ranks is an error (write the unit axes: `w[None, :]`)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """A fresh, deterministic key on every call."""
    state = {"key": jax.random.key(0)}

    def _getkey():
        state["key"], sub = jax.random.split(state["key"])
        return sub

    return _getkey


def rel_err(a, b, floor=0.0):
    """max|a - b| / max(max|b|, floor): a relative error whose denominator is
    floored at a fraction of the object's natural scale, so that round-off
    against a true value of 1e-100 does not count as an error."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    denom = max(float(np.max(np.abs(b))) if b.size else 0.0, floor, 1e-300)
    return float(np.max(np.abs(a - b))) / denom


def tree_rel_err(a, b, floor=0.0):
    """rel_err over a pytree, with one denominator: the largest entry of `b`
    over all leaves (the object's scale), floored at `floor`."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    scale = max([float(np.max(np.abs(np.asarray(y)))) for y in lb] + [floor])
    return max(rel_err(x, y, scale) for x, y in zip(la, lb))
