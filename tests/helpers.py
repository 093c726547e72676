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


def head_problem(key, H=2, n_tok=30, probes=3, tests=4, kdim=3, vdim=None, dtype=jnp.float64):
    """A kernel's inputs in head space. Keys: `n_tok` tokens (non-uniform
    weights) then zero-weight probes; queries: the keys, then test queries
    (weight 0, positions among the tokens and after them). Returns
    `(q, k, v, w, c, u, qpos, kpos)`."""
    kq, kk, kv, kw, kc = jax.random.split(key, 5)
    vdim = kdim if vdim is None else vdim
    n, m = n_tok + probes, n_tok + probes + tests
    q = 0.8 * jax.random.normal(kq, (H, m, kdim), dtype)
    k = 0.8 * jax.random.normal(kk, (H, n, kdim), dtype)
    v = jax.random.normal(kv, (H, n, vdim), dtype)
    w = jax.random.uniform(kw, (n_tok,), dtype, minval=0.2, maxval=1.0)
    w = jnp.concatenate([w / w.sum(), jnp.zeros(probes, dtype)])
    u = jnp.concatenate([w, jnp.zeros(tests, dtype)])
    c = jax.random.normal(kc, (H, m, vdim), dtype)
    kpos = jnp.concatenate([jnp.arange(n_tok), jnp.array([n_tok, 2, 0][:probes])])
    qpos = jnp.concatenate([kpos, jnp.array([0, 5, n_tok, n_tok + 7][:tests])])
    return q, k, v, w, c, u, qpos, kpos


def attention_reference(q, k, v, w, beta, qpos, kpos, causal, strict, slope):
    """`(o, lse)` of the softmax attention from the formulas; zero-weight keys
    enter through their weight only (so that the derivative in `w_j` at
    `w_j = 0` is the one-sided one)."""
    s = beta * jnp.einsum("hmk,hnk->hmn", q, k)
    if slope is not None:
        s = s - (slope * jnp.abs(qpos[:, None] - kpos[None, :]) / jnp.sum(w > 0))[None]
    vis = jnp.ones(s.shape[-2:], bool)
    if causal:
        vis = kpos[None, :] < qpos[:, None] if strict else kpos[None, :] <= qpos[:, None]
    e = jnp.where(vis[None], jnp.exp(s), 0.0) * w[None, None, :]
    D = jnp.sum(e, -1)
    safe = jnp.where(D > 0, D, 1.0)  # a query that sees no key: o = 0, lse = inf
    o = jnp.einsum("hmn,hnk->hmk", e, v) / safe[..., None]
    return o, jnp.where(D > 0, jnp.log(safe), jnp.inf)
