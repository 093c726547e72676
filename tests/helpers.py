"""Random test cases shared by the numerical tests."""

import jax
import jax.numpy as jnp

import mfattn


def random_measure(key, n, d, uniform=False, scale=1.0, dtype=jnp.float64):
    kx, kw = jax.random.split(key)
    x = scale * jax.random.normal(kx, (n, d), dtype=dtype)
    if uniform:
        return mfattn.EmpiricalMeasure(x)
    w = jax.random.uniform(kw, (n,), dtype=dtype, minval=0.2, maxval=1.0)
    return mfattn.EmpiricalMeasure(x, w / w.sum())


def random_params(key, L, H, d, k, dtype=jnp.float64):
    return mfattn.AttentionParams.xavier_uniform(key, L, H, d, k, dtype=dtype)


def random_loss(key, kind, measure):
    n, d = measure.points.shape
    k1, k2 = jax.random.split(key)
    if kind == "denoise":
        return mfattn.DenoisingLoss(jax.random.normal(k1, (n, d), dtype=measure.points.dtype))
    target = mfattn.EmpiricalMeasure(jax.random.normal(k2, (5, d), dtype=measure.points.dtype))
    return mfattn.MMDLoss(target, bandwidth=1.3)


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    """Same structure, and every pair of leaves `jnp.allclose` (as Diffrax's
    and Equinox's test helpers)."""
    import equinox as eqx

    return bool(eqx.tree_equal(x, y, typematch=True, rtol=rtol, atol=atol))
