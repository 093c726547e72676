"""The fused C++ kernel for the CPU: built here, the same numbers as the dense
kernel (float64 to 1e-12, float32 to its rounding), forward and closed-form
backward, with non-uniform weights, zero-weight probe keys, test queries, key
counts that are not a whole number of vectors, head dimensions with and
without a specialised loop, every mask option, batched (vmapped) calls, queries
split over several blocks; its forward pass differentiable in both modes; the
solvers through it; and the default kernel's choice of it."""

import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err, tree_rel_err
from helpers import attention_reference as _reference
from helpers import head_problem, random_loss, random_measure, random_params

import mfattn
from mfattn._kernels import _fused

OPTIONS = {
    "plain": dict(),
    "causal": dict(causal=True),
    "strict": dict(causal=True, strict=True),
    "alibi": dict(alibi_slope=1.3),
    "alibi-strict": dict(causal=True, strict=True, alibi_slope=0.7),
}

# k = 4 by default: the kernel's specialised loop (33 keys: two vectors of 16
# floats and a remainder)
_head_problem = functools.partial(head_problem, kdim=4)

needs_fused = pytest.mark.skipif(
    not mfattn.fused_cpu_available(), reason=f"fused kernel unavailable: {_fused.fused_cpu_error()}"
)


def test_builds_where_there_is_a_compiler():
    # where a C++ compiler exists (CI's machines), the kernel must build: a
    # silent fallback would skip every test below
    if shutil.which("c++") or shutil.which("g++"):
        assert mfattn.fused_cpu_available(), _fused.fused_cpu_error()
        assert _fused.fused_cpu_threads() >= 1


def _compare(fused, dense, problem, beta, tol):
    q, k, v, w, c, u, qpos, kpos = problem
    o, lse = fused.forward(q, k, v, w, beta, qpos, kpos)
    o_ref, lse_ref = dense.forward(q, k, v, w, beta, qpos, kpos)
    assert o.dtype == lse.dtype == q.dtype
    assert rel_err(o, o_ref) < tol
    assert np.array_equal(np.isfinite(lse), np.isfinite(lse_ref))
    finite = np.isfinite(lse_ref)
    assert rel_err(np.asarray(lse)[finite], np.asarray(lse_ref)[finite]) < tol
    grads = fused.backward(q, k, v, w, o, lse, c, u, beta, qpos, kpos)
    grads_ref = dense.backward(q, k, v, w, o_ref, lse_ref, c, u, beta, qpos, kpos)
    for g, g_ref, what in zip(grads, grads_ref, ("dq", "dk", "dv")):
        assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, what
        assert rel_err(g, g_ref) < tol, what
    return o, lse, grads


@needs_fused
@pytest.mark.parametrize("name", list(OPTIONS))
def test_forward_and_backward_match_dense_float64(getkey, name):
    problem = _head_problem(getkey())
    fused, dense = mfattn.FusedCPUKernel(**OPTIONS[name]), mfattn.DenseKernel(**OPTIONS[name])
    o, lse, grads = _compare(fused, dense, problem, 2.5, 1e-12)
    if name == "strict":  # the first token sees no key: output and derivatives 0
        assert not np.isfinite(lse[0, 0]) and np.all(o[:, 0] == 0) and np.all(grads[0][:, 0] == 0)
    q, k, _, w, _, _, qpos, kpos = problem
    assert (
        rel_err(fused.weights(q, k, w, 2.5, qpos, kpos), dense.weights(q, k, w, 2.5, qpos, kpos))
        < 1e-14
    )


@needs_fused
@pytest.mark.parametrize(
    "kdim, vdim",
    [
        (8, 8),
        (5, 5),
        pytest.param(16, 16, marks=pytest.mark.slow),
        pytest.param(3, 6, marks=pytest.mark.slow),
    ],
)
def test_head_dimensions(getkey, kdim, vdim):
    # 8 and 16 have their own loops, 5 and (3, 6) the general one
    problem = _head_problem(getkey(), kdim=kdim, vdim=vdim, n_tok=21, probes=2, tests=3)
    _compare(
        mfattn.FusedCPUKernel(causal=True), mfattn.DenseKernel(causal=True), problem, 1.1, 1e-12
    )


@needs_fused
def test_queries_split_over_blocks(getkey):
    # one head and 300 queries: the queries run in several blocks whose key-side
    # sums are reduced in a fixed order
    problem = _head_problem(getkey(), H=1, n_tok=290, probes=3, tests=4)
    _compare(mfattn.FusedCPUKernel(), mfattn.DenseKernel(), problem, 0.7, 1e-12)


@needs_fused
def test_float32(getkey):
    problem = _head_problem(getkey(), dtype=jnp.float32)
    _compare(
        mfattn.FusedCPUKernel(causal=True), mfattn.DenseKernel(causal=True), problem, 2.0, 1e-5
    )


@needs_fused
def test_low_temperature_probes_are_capped_as_dense(getkey):
    # at large beta a probe far from the tokens has a density above the cap
    q, k, v, w, c, u, qpos, kpos = _head_problem(getkey())
    k = k.at[:, -1].set(8.0)
    _compare(
        mfattn.FusedCPUKernel(), mfattn.DenseKernel(), (q, k, v, w, c, u, qpos, kpos), 40.0, 1e-12
    )


@needs_fused
def test_vmapped_calls(getkey):
    """A batch of samples with their own weights and temperatures (the FFI call
    receives them broadcast), against the dense kernel sample by sample."""
    q, k, v, w, c, u, qpos, kpos = _head_problem(getkey())
    qs = jnp.stack([q, 0.5 * q, -q])
    ws = jnp.stack([w, w[::-1] * (w[::-1] > 0), w])
    betas = jnp.array([0.5, 2.0, 3.0])
    for name in ("plain", "causal"):
        fused, dense = mfattn.FusedCPUKernel(**OPTIONS[name]), mfattn.DenseKernel(**OPTIONS[name])

        def run(kernel):
            def one(q, w, beta):
                o, lse = kernel.forward(q, k, v, w, beta, qpos, kpos)
                return o, kernel.backward(q, k, v, w, o, lse, c, u, beta, qpos, kpos)

            return jax.jit(jax.vmap(one))(qs, ws, betas)

        assert tree_rel_err(run(fused), run(dense)) < 1e-12, name


@needs_fused
@pytest.mark.slow  # the default suite differentiates it in test_solve_discrete_matches_dense
@pytest.mark.parametrize("name", ["plain", "alibi-strict"])
def test_forward_is_differentiable(getkey, name):
    """`jax.grad` through the forward pass in `q, k, v, beta` (and `w` with
    the fused reverse mode) in both modes, and `jax.jvp` in the default one."""
    q, k, v, w, c, _, qpos, kpos = _head_problem(getkey(), n_tok=20, probes=2, tests=2)
    opts = OPTIONS[name]
    cl = jax.random.normal(getkey(), q.shape[:2])
    keep = np.asarray(qpos > 0) if opts.get("strict") else np.ones(q.shape[1], bool)

    def scalar_of(forward):
        def scalar(q, k, v, w, beta):
            o, lse = forward(q, k, v, w, beta)
            return jnp.sum(c * jnp.sin(o)) + jnp.sum(jnp.where(keep, cl * lse, 0.0))

        return scalar

    flags = (opts.get("causal", False), opts.get("strict", False), opts.get("alibi_slope"))
    ref = scalar_of(lambda *a: _reference(*a, qpos, kpos, *flags))
    args = (q, k, v, w, 1.7)
    g_ref = jax.grad(ref, argnums=(0, 1, 2, 3, 4))(*args)
    for autodiff in ("jvp", "vjp"):
        kernel = mfattn.FusedCPUKernel(autodiff=autodiff, **opts)
        got = jax.grad(
            scalar_of(lambda *a: kernel.forward(*a, qpos, kpos)), argnums=(0, 1, 2, 3, 4)
        )(*args)
        for g, gr, what in zip(got, g_ref, ("q", "k", "v", "w", "beta")):
            if what == "w" and autodiff == "jvp":
                # the dense kernel's derivative at a zero weight is 0
                gr = jnp.where(w > 0, gr, 0.0)
            assert rel_err(g, gr) < 1e-12, (autodiff, what)
    kernel = mfattn.FusedCPUKernel(**opts)
    tangents = tuple(jax.random.normal(getkey(), jnp.shape(a), q.dtype) for a in args)
    _, t = jax.jvp(scalar_of(lambda *a: kernel.forward(*a, qpos, kpos)), args, tangents)
    _, t_ref = jax.jvp(
        scalar_of(lambda *a: mfattn.DenseKernel(**opts).forward(*a, qpos, kpos)), args, tangents
    )
    assert rel_err(t, t_ref) < 1e-12


def _model(key, n=7, d=3, k=2, L=3, H=2):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    measure = random_measure(k1, n, d, scale=0.8)
    params = jax.tree.map(lambda a: 2.0 * a, random_params(k2, L, H, d, k))
    z = 0.6 * jax.random.normal(k4, (2, d))
    return params, measure, random_loss(k3, "mmd", measure), z


@needs_fused
@pytest.mark.parametrize("causal", [False, True])
def test_solve_discrete_matches_dense(getkey, causal):
    """The discrete model with test particles: paths, adjoints, gradient map;
    and `jax.grad` of the loss through the kernel's forward pass."""
    params, measure, loss, z = _model(getkey())
    sols = [
        mfattn.solve_discrete(params, measure, loss, 3.0, z, kernel=kernel)
        for kernel in (mfattn.DenseKernel(causal=causal), mfattn.FusedCPUKernel(causal=causal))
    ]
    for a in ("xs", "ps", "test_xs", "test_ps", "grads"):
        assert tree_rel_err(getattr(sols[1], a), getattr(sols[0], a)) < 1e-12, a
    if causal:
        return

    def grad(kernel):
        f = lambda th: mfattn.discrete_loss(th, measure, loss, 3.0, kernel=kernel)
        return jax.grad(f)(params)

    ref = grad(mfattn.DenseKernel(causal=causal))
    for autodiff in ("jvp", "vjp"):
        got = grad(mfattn.FusedCPUKernel(causal=causal, autodiff=autodiff))
        assert tree_rel_err(got, ref) < 1e-12, autodiff


@needs_fused
def test_auto_kernel_chooses_it_on_the_cpu(getkey, monkeypatch):
    auto = mfattn.AutoKernel(causal=True, alibi_slope=0.5)
    fused = mfattn.FusedCPUKernel(causal=True, alibi_slope=0.5)
    assert auto.choose(1000, backend="cpu") == fused
    assert auto.choose(1000, 1000, 8, backend="cpu") == fused
    # not for other dtypes, wide heads, given thresholds, fused=False, or elsewhere
    assert auto.choose(1000, 1000, 2, backend="cpu", floating=False) != fused
    assert auto.choose(1000, backend="cpu", head_dim=65) != fused
    assert mfattn.AutoKernel(chunk_size=64).choose(1000, backend="cpu") == mfattn.ChunkedKernel(64)
    assert mfattn.AutoKernel(fused=False).choose(1000, backend="cpu") == mfattn.ChunkedKernel(128)
    assert mfattn.AutoKernel().choose(100, 100, 4, backend="gpu") == mfattn.DenseKernel()
    monkeypatch.setenv("MFATTN_FUSED_CPU", "0")
    assert not mfattn.fused_cpu_available()
    assert mfattn.AutoKernel().choose(1000, backend="cpu") == mfattn.ChunkedKernel(128)
    monkeypatch.delenv("MFATTN_FUSED_CPU")
    # through a model: bfloat16 inputs keep the pure-JAX kernels
    q = jax.random.normal(getkey(), (2, 5, 3), jnp.bfloat16)
    w = jnp.ones(5, jnp.bfloat16) / 5
    o, _ = mfattn.AutoKernel().forward(q, q, q, w, 1.0)
    assert o.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="fused"):
        mfattn.AutoKernel(fused=True)


@needs_fused
def test_bad_inputs(getkey):
    with pytest.raises(ValueError, match="autodiff"):
        mfattn.FusedCPUKernel(autodiff="both")
    with pytest.raises(ValueError, match="strict"):
        mfattn.FusedCPUKernel(strict=True)
    kernel = mfattn.FusedCPUKernel()
    q = jax.random.normal(getkey(), (2, 5, 65))
    with pytest.raises(ValueError, match="64"):
        kernel.forward(q, q, q, jnp.ones(5) / 5, 1.0)
    qi = jnp.ones((2, 5, 3), jnp.int32)
    with pytest.raises(TypeError, match="float32 or float64"):
        kernel.forward(qi, qi, qi, jnp.ones(5) / 5, 1.0)
    q = jax.random.normal(getkey(), (2, 5, 3))
    with pytest.raises(TypeError, match="`k`"):
        kernel.forward(q, q.astype(jnp.float32), q, jnp.ones(5) / 5, 1.0)


@needs_fused
@pytest.mark.slow  # also through the solvers: test_api, test_discrete (jax.grad in beta)
def test_backward_is_differentiable(getkey):
    """A solve differentiated in `beta` differentiates the closed-form
    backward pass: its derivative equals the dense kernel's."""
    q, k, v, w, c, u, qpos, kpos = _head_problem(getkey(), n_tok=12, probes=2, tests=2)

    def f(kernel):
        def scalar(q, k, beta):
            o, lse = kernel.forward(q, k, v, w, beta, qpos, kpos)
            dq, dk, dv = kernel.backward(q, k, v, w, o, lse, c, u, beta, qpos, kpos)
            return jnp.sum(jnp.sin(dq)) + jnp.sum(dk**2) + jnp.sum(dv * v)

        return jax.grad(scalar, argnums=(0, 1, 2))(q, k, 1.3)

    opts = OPTIONS["causal"]
    got, ref = f(mfattn.FusedCPUKernel(**opts)), f(mfattn.DenseKernel(**opts))
    assert tree_rel_err(got, ref) < 1e-12
