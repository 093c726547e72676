"""Kernel objects and causal masking: every kernel gives the same numbers, the
causal model matches autodiff, and the discrete model is Euler on the limit's
vector field (float64)."""

import warnings

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from conftest import rel_err, tree_rel_err
from helpers import random_loss, random_measure, random_params, tree_allclose

import mfattn

KERNELS = {
    "dense": mfattn.DenseKernel(),
    "chunked": mfattn.ChunkedKernel(3),
    "dense-causal": mfattn.DenseKernel(causal=True),
    "chunked-causal": mfattn.ChunkedKernel(3, causal=True),
}


def _problem(key, n=7, d=3, k=2, L=3, H=2, kind="mmd"):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    measure = random_measure(k1, n, d, scale=0.8)  # non-uniform weights
    params = jax.tree.map(lambda a: 2.0 * a, random_params(k2, L, H, d, k))
    z = 0.6 * jax.random.normal(k4, (2, d))
    return params, measure, random_loss(k3, kind, measure), z


@pytest.mark.parametrize("causal", [False, True])
def test_dense_and_chunked_agree(getkey, causal):
    params, measure, loss, z = _problem(getkey())
    sols = [
        mfattn.solve_discrete(params, measure, loss, 3.0, z, kernel=kernel)
        for kernel in (mfattn.DenseKernel(causal=causal), mfattn.ChunkedKernel(3, causal=causal))
    ]
    for a in ("xs", "ps", "test_xs", "test_ps", "grads"):
        assert tree_rel_err(getattr(sols[1], a), getattr(sols[0], a)) < 1e-10, a
    # and the chunk_size= shortcut is the chunked kernel
    short = mfattn.solve_discrete(params, measure, loss, 3.0, z, chunk_size=3)
    if not causal:
        assert tree_rel_err(short.grads, sols[1].grads) < 1e-13


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("n", [1, 6])
def test_adjoint_and_gradient_map_match_autodiff(getkey, name, n):
    kernel = KERNELS[name]
    params, measure, loss, _ = _problem(getkey(), n=n, kind="denoise" if n == 1 else "mmd")
    sol = mfattn.solve_discrete(params, measure, loss, 2.0, kernel=kernel)
    L, H = params.depth, params.heads

    def f(th, x):
        return mfattn.discrete_loss(th, measure.with_points(x), loss, 2.0, kernel=kernel)

    value, (g_params, g_points) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(
        params, measure.points
    )
    assert rel_err(sol.loss, value) < 1e-12
    assert rel_err(sol.ps[0], g_points / measure.weights[:, None]) < 1e-9
    assert tree_rel_err(sol.grads, jax.tree.map(lambda g: L * H * g, g_params)) < 1e-9


def test_causal_tokens_ignore_later_tokens(getkey):
    """Token i's path depends only on tokens j <= i (the weights of a prefix are
    renormalised: the softmax does not see the scale)."""
    params, measure, loss, _ = _problem(getkey(), n=7)
    kernel = mfattn.DenseKernel(causal=True)
    full = mfattn.solve_discrete(params, measure, loss, 2.0, kernel=kernel)
    w = measure.weights[:4]
    prefix = mfattn.EmpiricalMeasure(measure.points[:4], w / w.sum())
    part = mfattn.solve_discrete(
        params, prefix, random_loss(getkey(), "mmd", prefix), 2.0, kernel=kernel
    )
    assert rel_err(part.xs, full.xs[:, :4]) < 1e-13
    # and without the mask they do not
    dense = mfattn.solve_discrete(params, prefix, loss, 2.0)
    assert rel_err(dense.xs, full.xs[:, :4]) > 1e-3


def test_causal_test_particles_are_zero_weight_atoms_at_the_end(getkey):
    """A test particle sits after the last token: it moves like an appended atom
    of weight 0, and its adjoint is the eps -> 0 limit of such an atom's."""
    params, measure, _, z = _problem(getkey(), n=6)
    # unit-scale heads: an atom of weight eps attending to itself stays an O(eps) effect
    params, z = jax.tree.map(lambda a: 0.5 * a, params), 0.5 * z
    zlab = jax.random.normal(getkey(), z.shape)
    targets = jax.random.normal(getkey(), measure.points.shape)
    loss = mfattn.DenoisingLoss(targets)
    kernel = mfattn.DenseKernel(causal=True)
    sol = mfattn.solve_discrete(params, measure, loss, 1.0, z, test_labels=zlab, kernel=kernel)

    def augmented(eps):
        w = jnp.concatenate([(1 - 2 * eps) * measure.weights, jnp.array([eps, eps])])
        m = mfattn.EmpiricalMeasure(jnp.concatenate([measure.points, z]), w)
        return m, mfattn.DenoisingLoss(jnp.concatenate([targets, zlab]))

    sol0 = mfattn.solve_discrete(params, *augmented(0.0), 1.0, kernel=kernel)
    assert rel_err(sol.test_xs, sol0.xs[:, 6:]) < 1e-12
    sole = mfattn.solve_discrete(params, *augmented(1e-12), 1.0, kernel=kernel)
    assert rel_err(sol.test_ps, sole.ps[:, 6:]) < 1e-5
    # a test particle placed at position 2 sees tokens 0..2 only
    early = mfattn.solve_discrete(
        params,
        measure,
        loss,
        1.0,
        z,
        test_labels=zlab,
        kernel=kernel,
        test_positions=jnp.array([2, 2]),
    )
    w = measure.weights[:3]
    m3 = mfattn.EmpiricalMeasure(measure.points[:3], w / w.sum())
    ref = mfattn.solve_discrete(
        params, m3, mfattn.DenoisingLoss(targets[:3]), 1.0, z, test_labels=zlab, kernel=kernel
    )
    assert rel_err(early.test_xs, ref.test_xs) < 1e-12


def test_causal_field_closed_forms_match_autodiff(getkey):
    params, measure, _, z = _problem(getkey(), n=5)
    layer = params.layer(0)
    field = mfattn.AttentionField(2.0, mfattn.ChunkedKernel(2, causal=True))
    pos = jnp.array([1, 4])
    jac = jax.vmap(jax.jacfwd(lambda x, p: field.velocity(x, measure, layer, p)))(z, pos)
    assert rel_err(field.grad_x(z, measure, layer, positions=pos), jac) < 1e-10

    def moved(pts, j):
        return field.velocity(z[j], measure.with_points(pts), layer, pos[j])

    for j in range(2):
        jac_atoms = jax.jacfwd(moved)(measure.points, j)  # (d, n, d)
        lions = field.lions_derivative(
            z[j], measure, layer, measure.points, positions=pos[j], y_positions=jnp.arange(5)
        )  # (n, d, d)
        expected = jnp.moveaxis(jac_atoms, 1, 0) / measure.weights[:, None, None]
        assert rel_err(lions, expected) < 1e-10


def test_causal_euler_order_one(getkey):
    d, k, M, n = 3, 2, 4, 6
    measure = random_measure(getkey(), n, d, scale=0.8)
    grid = mfattn.AttentionParams.mean_field(getkey(), 2, M, d, k)
    loss = mfattn.MMDLoss(mfattn.EmpiricalMeasure(jax.random.normal(getkey(), (5, d))), 1.0)
    kernel = mfattn.DenseKernel(causal=True)
    Ls = [4, 8, 16, 32]
    ref = mfattn.solve_limit(
        grid,
        measure,
        loss,
        1.0,
        saveat=diffrax.SaveAt(ts=jnp.arange(33) / 32),
        rtol=1e-11,
        atol=1e-12,
        kernel=kernel,
    )
    errs = []
    for L in Ls:
        disc = mfattn.solve_discrete(
            jax.tree.map(lambda a: jnp.repeat(a[:1], L, axis=0), grid),
            measure,
            loss,
            1.0,
            kernel=kernel,
        )
        every = 32 // L
        errs.append(
            float(jnp.max(jnp.abs(disc.xs - ref.xs[::every])))
            + float(jnp.max(jnp.abs(disc.ps - ref.ps[::every])))
        )
    slope = scipy.stats.linregress(np.log(Ls), np.log(errs)).slope
    assert -1.15 <= slope <= -0.85, (slope, errs)


def test_sharded_kernel_equals_one_device(getkey):
    devices = np.array(jax.devices()[:4])
    mesh = jax.sharding.Mesh(devices, ("tokens",))
    params, measure, loss, z = _problem(getkey(), n=7)
    for inner in (mfattn.DenseKernel(causal=True), mfattn.ChunkedKernel(3)):
        one = mfattn.solve_discrete(params, measure, loss, 2.0, z, kernel=inner)
        many = mfattn.solve_discrete(
            params, measure, loss, 2.0, z, kernel=mfattn.ShardedKernel(inner, mesh)
        )
        for a in ("xs", "ps", "test_ps", "grads"):
            assert tree_rel_err(getattr(many, a), getattr(one, a)) < 1e-12, a


def test_discrete_model_is_euler_on_the_vector_field(getkey):
    params, measure, loss, _ = _problem(getkey(), L=4)
    field = mfattn.AttentionField(2.0)
    vf = mfattn.AttentionVectorField(
        field, mfattn.ParamPath(params, interpolation=mfattn.PiecewiseConstant()), measure
    )
    x = measure.points
    for l in range(4):
        vx, _ = vf(l / 4, (x, jnp.zeros((0, 3))), None)
        x = x + vx / 4
    sol = mfattn.solve_discrete(params, measure, loss, 2.0)
    assert rel_err(sol.xs[-1], x) < 1e-13


@pytest.mark.slow
def test_renamed_arguments_still_work(getkey):
    grid = mfattn.AttentionParams.mean_field(getkey(), 2, 4, 3, 2)
    measure = random_measure(getkey(), 4, 3)
    loss = random_loss(getkey(), "denoise", measure)
    new = mfattn.solve_limit(grid, measure, loss, 1.0)
    with pytest.warns(DeprecationWarning, match="params_grid"):
        old = mfattn.solve_limit(params_grid=grid, measure=measure, loss=loss, beta=1.0)
    assert tree_allclose(new.xs, old.xs)
    v1, g1 = mfattn.limit_gradient(grid, measure, loss, 1.0)
    with pytest.warns(DeprecationWarning, match="adjoint"):  # the old name of `adjoint=`
        v2, g2 = mfattn.limit_gradient(grid, measure, loss, 1.0, method="closed_form")
    v3, g3 = mfattn.limit_gradient(grid, measure, loss, 1.0, adjoint=mfattn.ClosedFormAdjoint())
    assert tree_allclose(g1, g2) and tree_allclose(g1, g3)
    with pytest.raises(TypeError, match="adjoint"):
        mfattn.limit_gradient(grid, measure, loss, 1.0, adjoint="closed_form")
    with pytest.raises(ValueError, match="not both"):
        mfattn.solve_limit(grid, measure, loss, 1.0, rtol=1e-3, stepsize_controller=mfattn_pid())
    field = mfattn.AttentionField(1.0, 4)
    assert field.kernel == mfattn.ChunkedKernel(4)
    with pytest.raises(ValueError, match="not both"):
        mfattn.AttentionField(1.0, mfattn.DenseKernel(), chunk_size=3)
    with pytest.raises(TypeError, match="kernel"):
        mfattn.AttentionField(1.0, kernel="dense")
    with pytest.raises(ValueError, match="chunk_size"):
        mfattn.ChunkedKernel(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mfattn.antithetic_mean_field(getkey(), 2, 4, 3, 2, sampling="sobol")


def mfattn_pid():
    return diffrax.PIDController(rtol=1e-6, atol=1e-8)


def test_causal_kernel_needs_positions(getkey):
    q = jax.random.normal(getkey(), (2, 3, 2))
    with pytest.raises(ValueError, match="positions"):
        mfattn.DenseKernel(causal=True).forward(q, q, q, jnp.ones(3) / 3, 1.0)


def test_auto_kernel_is_dense_then_chunked(getkey):
    # the pure-JAX rule (on the CPU the fused kernel comes first where it builds)
    auto = mfattn.AutoKernel(fused=False)
    assert auto.choose(128) == mfattn.DenseKernel()
    assert auto.choose(129) == mfattn.ChunkedKernel(128)
    assert mfattn.AutoKernel(causal=True, fused=False).choose(1000) == mfattn.ChunkedKernel(
        128, causal=True
    )
    assert mfattn.AttentionField(1.0).kernel == mfattn.AutoKernel()
    params, measure, loss, z = _problem(getkey(), n=150, L=2)
    a = mfattn.solve_discrete(params, measure, loss, 2.0, z)
    b = mfattn.solve_discrete(params, measure, loss, 2.0, z, kernel=mfattn.DenseKernel())
    for name in ("xs", "ps", "test_ps", "grads"):
        assert tree_rel_err(getattr(a, name), getattr(b, name)) < 1e-10, name


def test_auto_kernel_on_an_accelerator_fills_the_score_budget(monkeypatch):
    # the rule on an accelerator, with the device's memory replaced by a known
    # budget: dense while heads x queries x keys scores fit, else the largest
    # power-of-two chunk that fits, never below 128 keys
    from mfattn._kernels import _auto

    monkeypatch.setattr(_auto, "score_budget", lambda backend: 2**28)
    auto = mfattn.AutoKernel()
    # 64 heads x 256 queries x 256 keys x 4 bytes = 16 MiB: dense
    assert auto.choose(256, 64 * 256, 4, backend="gpu") == mfattn.DenseKernel()
    # 16 heads x 4096 queries: 2^28 / (65536 x 4) = 1024 keys per chunk
    assert auto.choose(4096, 16 * 4096, 4, backend="gpu") == mfattn.ChunkedKernel(1024)
    # float64 halves the chunk
    assert auto.choose(4096, 16 * 4096, 8, backend="gpu") == mfattn.ChunkedKernel(512)
    # a huge problem still gets chunks of at least 128 keys
    assert auto.choose(2**20, 2**24, 4, backend="gpu") == mfattn.ChunkedKernel(128)
    # the CPU rule does not look at the memory
    pure = mfattn.AutoKernel(fused=False)
    assert pure.choose(256, 64 * 256, 4, backend="cpu") == mfattn.ChunkedKernel(128)
    # given thresholds override the rule on every backend
    fixed = mfattn.AutoKernel(max_dense_keys=64, chunk_size=32, causal=True)
    for backend in ("cpu", "gpu"):
        assert fixed.choose(64, 64, 4, backend=backend) == mfattn.DenseKernel(causal=True)
        assert fixed.choose(65, 65, 4, backend=backend) == mfattn.ChunkedKernel(32, causal=True)
    with pytest.raises(ValueError, match="max_dense_keys"):
        mfattn.AutoKernel(max_dense_keys=0)
    with pytest.raises(ValueError, match="chunk_size"):
        mfattn.AutoKernel(chunk_size=-3)


def test_auto_kernel_score_budget_from_the_device():
    from mfattn._kernels import _auto

    # the CPU backend is always there; whatever it reports, the budget is positive
    assert _auto.score_budget("cpu") >= 2**20
