"""The Pallas kernel in Pallas' interpreter (the CPU): the same numbers as the
dense kernel, forward and closed-form backward, float64 and float32, with
non-uniform weights, zero-weight probe keys, test queries, several blocks of
queries and keys, every mask option; its forward pass differentiable; and the
solvers through it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err, tree_rel_err
from helpers import attention_reference as _reference
from helpers import head_problem as _head_problem
from helpers import random_loss, random_measure, random_params

import mfattn

OPTIONS = {
    "plain": dict(),
    "causal": dict(causal=True),
    "strict": dict(causal=True, strict=True),
    "alibi": dict(alibi_slope=1.3),
    "alibi-strict": dict(causal=True, strict=True, alibi_slope=0.7),
}


def _pallas(**options):
    return mfattn.PallasKernel(interpret=True, block_q=16, block_k=16, **options)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_forward_and_backward_match_dense_float64(getkey, name):
    q, k, v, w, c, u, qpos, kpos = _head_problem(getkey())
    pallas, dense = _pallas(**OPTIONS[name]), mfattn.DenseKernel(**OPTIONS[name])
    beta = 2.5
    o, lse = pallas.forward(q, k, v, w, beta, qpos, kpos)
    o_ref, lse_ref = dense.forward(q, k, v, w, beta, qpos, kpos)
    assert rel_err(o, o_ref) < 1e-12
    assert np.array_equal(np.isfinite(lse), np.isfinite(lse_ref))
    finite = np.isfinite(lse_ref)
    assert rel_err(np.asarray(lse)[finite], np.asarray(lse_ref)[finite]) < 1e-12
    grads = pallas.backward(q, k, v, w, o, lse, c, u, beta, qpos, kpos)
    grads_ref = dense.backward(q, k, v, w, o_ref, lse_ref, c, u, beta, qpos, kpos)
    for g, g_ref, what in zip(grads, grads_ref, ("dq", "dk", "dv")):
        assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, what
        assert rel_err(g, g_ref) < 1e-12, what
    if name == "strict":  # the first token sees no key: output and derivatives 0
        assert not np.isfinite(lse[0, 0]) and np.all(o[:, 0] == 0) and np.all(grads[0][:, 0] == 0)
    assert (
        rel_err(pallas.weights(q, k, w, beta, qpos, kpos), dense.weights(q, k, w, beta, qpos, kpos))
        < 1e-14
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain", "causal"])
def test_forward_and_backward_match_dense_float32(getkey, name):
    q, k, v, w, c, u, qpos, kpos = _head_problem(getkey(), kdim=8, dtype=jnp.float32)
    pallas, dense = _pallas(**OPTIONS[name]), mfattn.DenseKernel(**OPTIONS[name])
    o, lse = pallas.forward(q, k, v, w, 2.0, qpos, kpos)
    o_ref, lse_ref = dense.forward(q, k, v, w, 2.0, qpos, kpos)
    assert o.dtype == lse.dtype == jnp.float32
    assert rel_err(o, o_ref) < 1e-5
    grads = pallas.backward(q, k, v, w, o, lse, c, u, 2.0, qpos, kpos)
    grads_ref = dense.backward(q, k, v, w, o_ref, lse_ref, c, u, 2.0, qpos, kpos)
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == jnp.float32 and rel_err(g, g_ref) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain", "alibi-strict"])
def test_forward_is_differentiable(getkey, name):
    """`jax.grad` through the forward pass (output and log-normaliser) in
    `q, k, v, w, beta` against the formulas."""
    q, k, v, w, c, _, qpos, kpos = _head_problem(getkey(), n_tok=20, probes=2, tests=2)
    opts = OPTIONS[name]
    cl = jax.random.normal(getkey(), q.shape[:2])
    keep = np.asarray(qpos > 0) if opts.get("strict") else np.ones(q.shape[1], bool)

    def f(kernel_forward):
        def scalar(q, k, v, w, beta):
            o, lse = kernel_forward(q, k, v, w, beta)
            return jnp.sum(c * jnp.sin(o)) + jnp.sum(jnp.where(keep, cl * lse, 0.0))

        return jax.grad(scalar, argnums=(0, 1, 2, 3, 4))(q, k, v, w, 1.7)

    got = f(lambda *a: _pallas(**opts).forward(*a, qpos, kpos))
    ref = f(
        lambda *a: _reference(
            *a,
            qpos,
            kpos,
            opts.get("causal", False),
            opts.get("strict", False),
            opts.get("alibi_slope"),
        )
    )
    for g, g_ref, what in zip(got, ref, ("q", "k", "v", "w", "beta")):
        assert rel_err(g, g_ref) < 1e-12, what


def _model(key, n=7, d=3, k=2, L=3, H=2):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    measure = random_measure(k1, n, d, scale=0.8)  # non-uniform weights
    params = jax.tree.map(lambda a: 2.0 * a, random_params(k2, L, H, d, k))
    z = 0.6 * jax.random.normal(k4, (2, d))
    return params, measure, random_loss(k3, "mmd", measure), z


@pytest.mark.parametrize("causal", [False, True])
def test_solve_discrete_matches_dense(getkey, causal):
    """The discrete model with test particles: paths, adjoints, gradient map;
    and `jax.grad` of the loss through the kernel's forward pass."""
    params, measure, loss, z = _model(getkey())
    sols = [
        mfattn.solve_discrete(params, measure, loss, 3.0, z, kernel=kernel)
        for kernel in (mfattn.DenseKernel(causal=causal), _pallas(causal=causal))
    ]
    for a in ("xs", "ps", "test_xs", "test_ps", "grads"):
        assert tree_rel_err(getattr(sols[1], a), getattr(sols[0], a)) < 1e-12, a
    if causal:
        return

    def grad(kernel):
        f = lambda th: mfattn.discrete_loss(th, measure, loss, 3.0, kernel=kernel)
        return jax.grad(f)(params)

    assert tree_rel_err(grad(_pallas()), grad(mfattn.DenseKernel())) < 1e-12


@pytest.mark.slow
def test_solve_discrete_float32_and_batched(getkey):
    """float32 agrees to float32 rounding; a vmapped batch of measures."""
    params, measure, loss, z = _model(getkey(), n=6)
    f32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)
    p32, m32 = f32(params), f32(measure)
    l32 = random_loss(getkey(), "mmd", m32)
    sols = [
        mfattn.solve_discrete(p32, m32, l32, 3.0, z.astype(jnp.float32), kernel=kernel)
        for kernel in (mfattn.DenseKernel(), _pallas())
    ]
    assert sols[1].xs.dtype == jnp.float32
    for a in ("xs", "ps", "test_xs", "test_ps", "grads"):
        assert tree_rel_err(getattr(sols[1], a), getattr(sols[0], a)) < 1e-4, a

    batch = jax.vmap(lambda key: random_measure(key, 6, 3, scale=0.8))(
        jax.random.split(getkey(), 3)
    )

    def run(kernel):
        solve = lambda m: mfattn.solve_discrete(
            params, m, mfattn.DenoisingLoss(0.5 * m.points), 2.0, kernel=kernel
        )
        return jax.vmap(solve)(batch)

    got, ref = run(_pallas()), run(mfattn.DenseKernel())
    assert tree_rel_err((got.xs, got.ps, got.grads), (ref.xs, ref.ps, ref.grads)) < 1e-12


def test_bad_options():
    with pytest.raises(ValueError, match="block_q"):
        mfattn.PallasKernel(block_q=24)
    with pytest.raises(ValueError, match="block_k"):
        mfattn.PallasKernel(block_k=8)
    with pytest.raises(TypeError, match="interpret"):
        mfattn.PallasKernel(interpret="yes")
    with pytest.raises(ValueError, match="num_warps"):
        mfattn.PallasKernel(num_warps=0)
    with pytest.raises(ValueError, match="strict"):
        mfattn.PallasKernel(strict=True)
    with pytest.raises(ValueError, match="qpos"):
        _pallas(causal=True).forward(*([jnp.zeros((1, 2, 2))] * 3), jnp.ones(2), 1.0)
    assert mfattn.PallasKernel().uses_positions is False
    assert mfattn.PallasKernel(alibi_slope=1).uses_positions is True


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """`python -m benchmarks.pallas_check OUT --dry-run` (tiny sizes, the CPU):
    every item runs and agrees."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    cmd = [sys.executable, "-m", "benchmarks.pallas_check", str(tmp_path), "--dry-run"]
    subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, timeout=600)
    data = json.loads((tmp_path / "pallas_check.json").read_text())
    assert data["errors"] == [] and data["all_agree"], data
    assert {"step-pallas", "step-dense", "step-auto", "solve-float64-causal"} <= set(data["items"])
