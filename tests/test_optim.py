"""Blockwise AdamW against optax.adamw and a direct transcription of docs/theory.md, section 5."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tree_rel_err

import mfattn


def _problem(key, shape=(3, 2, 4, 3)):
    kp, kg = jax.random.split(key)
    params = mfattn.AttentionParams.xavier_uniform(kp, *shape)
    grads = [jax.tree.map(lambda a, i=i: jnp.sin(a * (i + 1)) + 0.1 * i, params) for i in range(20)]
    return params, grads


def _run(opt, params, grads):
    state = opt.init(params)
    update = jax.jit(opt.update)
    for g in grads:
        upd, state = update(g, state, params)
        params = optax.apply_updates(params, upd)
    return params, state


def test_elementwise_reproduces_optax_adamw(getkey):
    params, grads = _problem(getkey())
    ours, _ = _run(mfattn.blockwise_adamw(1e-2, weight_decay=0.1, block_axes=()), params, grads)
    ref, _ = _run(optax.adamw(1e-2, weight_decay=0.1), params, grads)
    assert tree_rel_err(ours, ref) < 1e-15


def _transcription(params, grads, lr, b1, b2, eps, wd, reduction):
    """docs/theory.md, section 5, written out per block with numpy."""
    out = {}
    for name in "QKVO":
        theta = np.array(getattr(params, name))
        m = np.zeros_like(theta)
        v = np.zeros(theta.shape[:-2])
        for k, g in enumerate(grads, start=1):
            g = np.asarray(getattr(g, name))
            phi = (g**2).sum(axis=(-2, -1))
            if reduction == "mean":
                phi = phi / (g.shape[-2] * g.shape[-1])
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * phi
            mhat = m / (1 - b1**k)
            vhat = v / (1 - b2**k)
            theta = theta - lr * (mhat / (np.sqrt(vhat)[..., None, None] + eps) + wd * theta)
        out[name] = theta
    return mfattn.AttentionParams(**out)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_blockwise_matches_spec_transcription(getkey, reduction):
    params, grads = _problem(getkey())
    opt = mfattn.blockwise_adamw(
        3e-2, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.05, reduction=reduction
    )
    ours, state = _run(opt, params, grads[:8])
    ref = _transcription(params, grads[:8], 3e-2, 0.8, 0.95, 1e-6, 0.05, reduction)
    assert tree_rel_err(ours, ref) < 1e-12
    nu = state[0].nu
    # exactly one second-moment scalar per block
    assert nu.Q.shape == (3, 2) and nu.O.shape == (3, 2)
    assert state[0].mu.Q.shape == params.Q.shape


def test_sum_and_mean_differ_and_block_axes(getkey):
    params, grads = _problem(getkey())
    a, _ = _run(mfattn.blockwise_adamw(1e-2, reduction="sum"), params, grads[:3])
    b, _ = _run(mfattn.blockwise_adamw(1e-2, reduction="mean"), params, grads[:3])
    assert tree_rel_err(a, b) > 1e-6
    # other block axes for other pytrees: one block per row of a matrix
    opt = mfattn.scale_by_blockwise_adam(block_axes=(-1,))
    state = opt.init({"w": jnp.ones((5, 7)), "b": jnp.ones(())})
    assert state.nu["w"].shape == (5,) and state.nu["b"].shape == ()
    with pytest.raises(ValueError, match="reduction"):
        mfattn.scale_by_blockwise_adam(reduction="max")


def test_chain_schedule_inject_hyperparams_jit(getkey):
    params, grads = _problem(getkey())
    sched = optax.linear_schedule(1e-2, 1e-3, 10)
    plain, _ = _run(mfattn.blockwise_adamw(sched, weight_decay=0.01), params, grads[:5])
    injected, st = _run(
        optax.inject_hyperparams(mfattn.blockwise_adamw)(learning_rate=sched, weight_decay=0.01),
        params,
        grads[:5],
    )
    assert tree_rel_err(plain, injected) < 1e-12
    assert "learning_rate" in st.hyperparams
    chained, _ = _run(
        optax.chain(
            optax.clip_by_global_norm(1e9), mfattn.blockwise_adamw(sched, weight_decay=0.01)
        ),
        params,
        grads[:5],
    )
    assert tree_rel_err(plain, chained) < 1e-12


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_dtype_preserved_and_no_retrace(getkey, dtype):
    params, grads = _problem(getkey())
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    opt = mfattn.blockwise_adamw(1e-2)
    state = opt.init(params)

    @jax.jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(params, state, g):
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state

    for g in grads[:3]:
        g = jax.tree.map(lambda a: a.astype(dtype), g)
        params, state = step(params, state, g)
    assert params.Q.dtype == dtype and state[0].nu.Q.dtype == dtype
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


def test_converges_on_quadratic():
    target = mfattn.AttentionParams(*(jnp.full((2, 2, 3, 2), v) for v in (1.0, -1.0, 0.5, 2.0)))
    params = jax.tree.map(jnp.zeros_like, target)
    opt = mfattn.blockwise_adamw(5e-2, weight_decay=0.0)
    state = opt.init(params)
    loss = lambda p: sum(
        jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target))
    )

    @jax.jit
    def step(params, state):
        upd, state = opt.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, upd), state

    for _ in range(400):
        params, state = step(params, state)
    assert float(loss(params)) < 1e-3
