"""Kernel options for causal attention (strict mask, ALiBi bias), unnormalised
attention, forward-only kernels and the attention matrix (float64): every
kernel against a plain-JAX reference written from the formulas, its backward
against `jax.vjp` of that reference, and the solvers' closed-form adjoint and
gradient map against `jax.grad` of `discrete_loss`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err, tree_rel_err
from helpers import random_loss, random_measure, random_params

import mfattn

# ------------------------------------------------------------- the reference


def reference(q, k, v, w, beta, qpos, kpos, *, causal, strict, slope, normalized=True):
    """The head-space attention output from the formulas, in plain JAX:
    `s_ij = beta <q_i, k_j> - slope |i - j| / n` (`n` the positive-weight
    keys), key `j` visible to query `i` when `j <= i` (`j < i` if strict),
    `o_i = sum_j w_j e^{s_ij} v_j` divided by `sum_j w_j e^{s_ij}` when
    normalised (0 for a query that sees no key). Zero-weight keys enter through
    their weight only, so that derivatives in `w_j` at `w_j = 0` exist."""
    s = beta * jnp.einsum("hmk,hnk->hmn", q, k)
    if slope is not None:
        n = jnp.sum(w > 0)
        s = s - (slope * jnp.abs(qpos[:, None] - kpos[None, :]) / n)[None]
    vis = jnp.ones(s.shape[-2:], bool)
    if causal:
        vis = kpos[None, :] < qpos[:, None] if strict else kpos[None, :] <= qpos[:, None]
    e = jnp.where(vis, jnp.exp(s), 0.0) * w[None, None, :]
    num = jnp.einsum("hmn,hnk->hmk", e, v)
    if not normalized:
        return num
    D = jnp.sum(e, -1)
    return num / jnp.where(D > 0, D, 1.0)[..., None]


def kernel_options(kernel):
    return dict(
        causal=kernel.causal,
        strict=kernel.strict,
        slope=kernel.alibi_slope,
        normalized=not isinstance(kernel, mfattn.UnnormalizedKernel),
    )


KERNELS = {
    "strict": mfattn.DenseKernel(causal=True, strict=True),
    "strict-chunked": mfattn.ChunkedKernel(3, causal=True, strict=True),
    "alibi-causal": mfattn.DenseKernel(causal=True, alibi_slope=1.3),
    "alibi-causal-chunked": mfattn.ChunkedKernel(3, causal=True, alibi_slope=1.3),
    "alibi-strict-chunked": mfattn.ChunkedKernel(2, causal=True, strict=True, alibi_slope=0.7),
    "alibi": mfattn.DenseKernel(alibi_slope=2.0),
    "alibi-chunked": mfattn.ChunkedKernel(4, alibi_slope=2.0),
    "alibi-auto-chunked": mfattn.AutoKernel(
        causal=True, strict=True, alibi_slope=0.7, max_dense_keys=2, chunk_size=3
    ),
    "unnormalized": mfattn.UnnormalizedKernel(),
    "unnormalized-causal": mfattn.UnnormalizedKernel(causal=True),
    "unnormalized-strict-alibi": mfattn.UnnormalizedKernel(
        causal=True, strict=True, alibi_slope=1.1
    ),
}


def _head_problem(key, H=2, m=7, n=7, kdim=3):
    """Queries: 5 tokens (positions 0..4, weights w), a zero-weight test query
    (position 5) and a weight-1 probe query (position 6, it sees every key).
    Keys: 5 tokens, a zero-weight probe at position 5 and one at position 2."""
    kq, kk, kv, kw, kc = jax.random.split(key, 5)
    q = 0.8 * jax.random.normal(kq, (H, m, kdim))
    k = 0.8 * jax.random.normal(kk, (H, n, kdim))
    v = jax.random.normal(kv, (H, n, kdim))
    w = jax.random.uniform(kw, (5,), minval=0.2, maxval=1.0)
    w = jnp.concatenate([w / w.sum(), jnp.zeros(2)])
    u = jnp.concatenate([w[:5], jnp.array([0.0, 1.0])])
    c = jax.random.normal(kc, (H, m, kdim))
    qpos = jnp.array([0, 1, 2, 3, 4, 5, 6])
    kpos = jnp.array([0, 1, 2, 3, 4, 5, 2])
    return q, k, v, w, u, c, qpos, kpos


@pytest.mark.parametrize("name", list(KERNELS))
def test_forward_matches_reference(getkey, name):
    kernel = KERNELS[name]
    q, k, v, w, _, _, qpos, kpos = _head_problem(getkey())
    o, _ = kernel.forward(q, k, v, w, 1.7, qpos, kpos)
    ref = reference(q, k, v, w, 1.7, qpos, kpos, **kernel_options(kernel))
    assert rel_err(o, ref) < 1e-13
    assert bool(jnp.all(jnp.isfinite(o)))
    if kernel.strict:  # the first token sees no key: its output is 0
        assert float(jnp.max(jnp.abs(o[:, 0]))) == 0.0


@pytest.mark.parametrize("name", list(KERNELS))
def test_backward_matches_vjp_of_reference(getkey, name):
    """dq against the vjp of the outputs with cotangents c (per query, whatever
    its weight), dk and dv against the vjp with cotangents u_i c_i divided by
    the key weight; at the zero-weight probe keys, the mixed derivative
    d/dw_j of that vjp at w_j = 0."""
    kernel = KERNELS[name]
    beta = 1.7
    q, k, v, w, u, c, qpos, kpos = _head_problem(getkey())
    o, aux = kernel.forward(q, k, v, w, beta, qpos, kpos)
    dq, dk, dv = kernel.backward(q, k, v, w, o, aux, c, u, beta, qpos, kpos)
    for a in (dq, dk, dv):
        assert bool(jnp.all(jnp.isfinite(a)))

    def ref(q, k, v, w):
        return reference(q, k, v, w, beta, qpos, kpos, **kernel_options(kernel))

    _, pull = jax.vjp(lambda q: ref(q, k, v, w), q)
    assert rel_err(dq, pull(c)[0]) < 1e-12

    def key_side(w):
        _, pull = jax.vjp(lambda k, v: ref(q, k, v, w), k, v)
        return pull(c * u[None, :, None])

    gk, gv = key_side(w)
    atoms = w > 0
    assert rel_err(dk[:, atoms], gk[:, atoms] / w[atoms][None, :, None]) < 1e-11
    assert rel_err(dv[:, atoms], gv[:, atoms] / w[atoms][None, :, None]) < 1e-11
    for j in np.flatnonzero(~np.asarray(atoms)):
        ej = jnp.zeros_like(w).at[j].set(1.0)
        _, (tk, tv) = jax.jvp(key_side, (w,), (ej,))
        assert rel_err(dk[:, j], tk[:, j], floor=1e-3) < 1e-11
        assert rel_err(dv[:, j], tv[:, j], floor=1e-3) < 1e-11
        assert float(jnp.max(jnp.abs(dv[:, j]))) > 0  # the probe is seen by someone


@pytest.mark.parametrize("chunk", [None, 2])
def test_strict_first_token_has_no_derivatives(getkey, chunk):
    """The first token sees no key: it has no query-side derivative, and as the
    only query acting on the keys it leaves every key-side derivative 0."""
    kw = dict(causal=True, strict=True, alibi_slope=0.5)
    kernel = mfattn.DenseKernel(**kw) if chunk is None else mfattn.ChunkedKernel(chunk, **kw)
    q, k, v, w, _, c, qpos, kpos = _head_problem(getkey())
    u = jnp.zeros(q.shape[1]).at[0].set(1.0)
    o, aux = kernel.forward(q, k, v, w, 2.0, qpos, kpos)
    dq, dk, dv = kernel.backward(q, k, v, w, o, aux, c, u, 2.0, qpos, kpos)
    for a in (o[:, 0], dq[:, 0], dk, dv):
        assert float(jnp.max(jnp.abs(a))) == 0.0
    # the others see keys (the second token only the first: its o is v_0, dq = 0)
    assert float(jnp.min(jnp.max(jnp.abs(dq[:, 2:]), axis=-1))) > 0


def test_alibi_length_counts_positive_weight_keys(getkey):
    """Appending zero-weight keys (probes, padding) does not change `n`, so the
    outputs do not move; with the bias `n` is the token count."""
    kernel = mfattn.DenseKernel(causal=True, alibi_slope=3.0)
    q, k, v, w, _, _, qpos, kpos = _head_problem(getkey())
    o5, _ = kernel.forward(q, k[:, :5], v[:, :5], w[:5], 1.0, qpos, kpos[:5])
    o7, _ = kernel.forward(q, k, v, w, 1.0, qpos, kpos)
    assert rel_err(o7, o5) < 1e-14
    # and the slope acts: without it, the outputs differ
    o0, _ = mfattn.DenseKernel(causal=True).forward(q, k, v, w, 1.0, qpos, kpos)
    assert rel_err(o0, o7) > 1e-2


# ----------------------------------------------- end to end, solver and grad


def _problem(key, n=6, d=3, k=2, L=3, H=2, scale=2.0):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    measure = random_measure(k1, n, d, scale=0.8)
    params = jax.tree.map(lambda a: scale * a, random_params(k2, L, H, d, k))
    z = 0.6 * jax.random.normal(k4, (2, d))
    return params, measure, random_loss(k3, "mmd", measure), z


E2E = {  # kernel, beta, scale of the heads
    "strict": (mfattn.DenseKernel(causal=True, strict=True), 2.0, 2.0),
    "alibi-causal": (mfattn.DenseKernel(causal=True, alibi_slope=1.5), 2.0, 2.0),
    "alibi-strict-chunked": (
        mfattn.ChunkedKernel(4, causal=True, strict=True, alibi_slope=1.5),
        2.0,
        2.0,
    ),
    "alibi": (mfattn.DenseKernel(alibi_slope=1.5), 2.0, 2.0),
    # without the normaliser the field grows like exp(s) and feeds back into
    # the scores: moderate heads and beta keep the tokens O(1) over 3 layers
    # (they move by about 0.4)
    "unnormalized-causal": (mfattn.UnnormalizedKernel(causal=True), 0.5, 1.0),
    "unnormalized": (mfattn.UnnormalizedKernel(), 0.5, 1.0),
}
E2E_SLOW = ("alibi-causal", "alibi", "unnormalized")  # covered by the others by default


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in E2E_SLOW else n for n in E2E]
)
def test_adjoint_and_gradient_map_match_autodiff(getkey, name):
    kernel, beta, scale = E2E[name]
    params, measure, loss, _ = _problem(getkey(), scale=scale)
    sol = mfattn.solve_discrete(params, measure, loss, beta, kernel=kernel)
    L, H = params.depth, params.heads

    def f(th, x):
        return mfattn.discrete_loss(th, measure.with_points(x), loss, beta, kernel=kernel)

    value, (g_params, g_points) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(
        params, measure.points
    )
    assert bool(jnp.isfinite(value))
    assert rel_err(sol.loss, value) < 1e-12
    assert rel_err(sol.ps[0], g_points / measure.weights[:, None]) < 1e-9
    assert tree_rel_err(sol.grads, jax.tree.map(lambda g: L * H * g, g_params)) < 1e-9


@pytest.mark.parametrize(
    "options",
    [
        dict(causal=True, strict=True, alibi_slope=1.5),
        pytest.param(dict(causal=True, strict=True), marks=pytest.mark.slow),
        pytest.param(dict(alibi_slope=0.8), marks=pytest.mark.slow),
    ],
)
def test_dense_and_chunked_agree(getkey, options):
    params, measure, loss, z = _problem(getkey(), n=7)
    sols = [
        mfattn.solve_discrete(params, measure, loss, 3.0, z, kernel=kernel)
        for kernel in (mfattn.DenseKernel(**options), mfattn.ChunkedKernel(3, **options))
    ]
    for a in ("xs", "ps", "test_xs", "test_ps", "grads"):
        assert tree_rel_err(getattr(sols[1], a), getattr(sols[0], a)) < 1e-10, a


def test_sharded_kernel_delegates(getkey):
    """The sharded kernel reads positions when its kernel does (here a bias
    without a mask), so the field passes them: one device's numbers."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("tokens",))
    inner = mfattn.DenseKernel(alibi_slope=1.0)
    sharded = mfattn.ShardedKernel(inner, mesh)
    assert sharded.uses_positions and not sharded.causal and sharded.has_backward
    params, measure, _, z = _problem(getkey(), n=7)
    layer, p = params.layer(0), jax.random.normal(getkey(), measure.points.shape)
    pz = jax.random.normal(getkey(), z.shape)
    pullback = eqx.filter_jit(
        lambda kernel: mfattn.AttentionField(2.0, kernel).backward(measure, layer, p, z, pz)
    )
    one, many = pullback(inner), pullback(sharded)
    assert tree_rel_err(many, one) < 1e-12
    assert tree_rel_err(pullback(mfattn.DenseKernel()), one) > 1e-3


def test_options_are_checked():
    with pytest.raises(ValueError, match="`strict=True`.*causal=True"):
        mfattn.DenseKernel(strict=True)
    with pytest.raises(ValueError, match="`alibi_slope` must be finite"):
        mfattn.ChunkedKernel(2, alibi_slope=float("inf"))
    with pytest.raises(TypeError, match="`alibi_slope`"):
        mfattn.AutoKernel(alibi_slope=(0.5, 1.0))
    with pytest.raises(TypeError, match="`alibi_slope`"):
        mfattn.UnnormalizedKernel(alibi_slope=True)
    with pytest.raises(TypeError, match="strict"):
        mfattn.DenseKernel(causal=True, strict="yes")
    assert mfattn.DenseKernel(alibi_slope=1).alibi_slope == 1.0
    assert mfattn.DenseKernel(alibi_slope=0.5).uses_positions
    assert not mfattn.DenseKernel().uses_positions
    with pytest.raises(ValueError, match="positions"):
        mfattn.DenseKernel(alibi_slope=0.5).forward(
            jnp.ones((1, 2, 2)), jnp.ones((1, 2, 2)), jnp.ones((1, 2, 2)), jnp.ones(2), 1.0
        )


def test_unnormalized_is_the_exponential_kernel(getkey):
    """With one head and identity projections, a token moves by
    `sum_j w_j exp(beta <x_i, x_j>) x_j`: the softmax field times `D(x_i)`."""
    d, n = 3, 5
    measure = random_measure(getkey(), n, d, scale=0.5)
    eye = jnp.eye(d)[None]
    layer = mfattn.AttentionParams(eye, eye, eye, eye)
    x, w = measure.points, measure.weights
    E = jnp.exp(1.5 * x @ x.T)
    field = mfattn.AttentionField(1.5, mfattn.UnnormalizedKernel())
    assert rel_err(field.velocity(x, measure, layer), (E * w[None, :]) @ x) < 1e-13
    softmax = mfattn.AttentionField(1.5, mfattn.DenseKernel()).velocity(x, measure, layer)
    assert rel_err(field.velocity(x, measure, layer), softmax * (E @ w)[:, None]) < 1e-13


# ------------------------------------------------------- forward-only kernels


class TinyForwardKernel(mfattn.AbstractForwardOnlyKernel):
    """Softmax attention in plain JAX, forward pass only."""

    causal: bool = eqx.field(static=True, default=False)

    def forward(self, q, k, v, w, beta, qpos=None, kpos=None):
        s = beta * jnp.einsum("hmk,hnk->hmn", q, k)
        a = jax.nn.softmax(s + jnp.log(w)[None, None, :], axis=-1)
        return jnp.einsum("hmn,hnk->hmk", a, v), jnp.zeros(s.shape[:-1])


def test_forward_only_kernel(getkey):
    kernel = TinyForwardKernel()
    assert not kernel.has_backward and mfattn.DenseKernel().has_backward
    params, measure, loss, z = _problem(getkey())
    # forward-only solves accept it
    ref = mfattn.solve_discrete(params, measure, None, 2.0, z, kernel=mfattn.DenseKernel())
    model = mfattn.DiscreteTransformer(params, beta=2.0, kernel=kernel)
    # probe_outputs is model(measure, test_points=z): solve_discrete with loss=None
    assert rel_err(mfattn.probe_outputs(model, measure, z), ref.test_xs[-1]) < 1e-12
    # automatic differentiation of its forward pass works
    layer = params.layer(0)

    def grad(kernel):
        field = mfattn.AttentionField(2.0, kernel)
        total = lambda x: field.forward(measure.with_points(x), layer)[0].sum()
        return jax.grad(total)(measure.points)

    assert rel_err(grad(kernel), grad(mfattn.DenseKernel())) < 1e-12
    # every closed-form adjoint names the kernel
    message = "TinyForwardKernel implements only the forward pass"
    with pytest.raises(TypeError, match=message):
        mfattn.solve_discrete(params, measure, loss, 2.0, kernel=kernel)
    with pytest.raises(TypeError, match=message):
        field = mfattn.AttentionField(2.0, kernel)
        field.grad_x(z, measure, params.layer(0))
    with pytest.raises(TypeError, match=message):
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("tokens",))
        field = mfattn.AttentionField(2.0, mfattn.ShardedKernel(kernel, mesh))
        field.backward(measure, layer, measure.points)
    # and its attention matrix is the generic one (the forward pass on e_j)
    P = mfattn.attention_weights(params.layer(1), measure, 2.0, kernel=kernel)
    P_ref = mfattn.attention_weights(params.layer(1), measure, 2.0, kernel=mfattn.DenseKernel())
    assert rel_err(P, P_ref) < 1e-13


# --------------------------------------------------------- attention matrix


def _softmax_matrix(layer, measure, beta, vis=None, bias=0.0):
    x, w = measure.points, measure.weights
    s = beta * jnp.einsum("hik,hjk->hij", x @ layer.Q, x @ layer.K)
    s = s + jnp.broadcast_to(bias, s.shape)
    e = w[None, None, :] * jnp.exp(s)
    if vis is not None:
        e = jnp.where(vis, e, 0.0)
    D = e.sum(-1, keepdims=True)
    return e / jnp.where(D > 0, D, 1.0)


def test_attention_weights_is_the_softmax_matrix(getkey):
    params, measure, _, _ = _problem(getkey(), n=7)
    layer = params.layer(1)
    n = measure.num_points
    i, j = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    cases = {
        mfattn.DenseKernel(): (None, 0.0),
        mfattn.ChunkedKernel(3): (None, 0.0),
        mfattn.AutoKernel(): (None, 0.0),
        mfattn.DenseKernel(causal=True): (j <= i, 0.0),
        mfattn.ChunkedKernel(2, causal=True, strict=True): (j < i, 0.0),
        mfattn.DenseKernel(causal=True, alibi_slope=1.2): (j <= i, -1.2 * (i - j) / n),
        mfattn.ChunkedKernel(4, alibi_slope=1.2): (None, -1.2 * jnp.abs(i - j) / n),
    }
    for kernel, (vis, bias) in cases.items():
        P = mfattn.attention_weights(layer, measure, 2.5, kernel=kernel)
        assert P.shape == (params.heads, n, n)
        assert rel_err(P, _softmax_matrix(layer, measure, 2.5, vis, bias)) < 1e-13, kernel
        rows = P.sum(-1)
        if kernel.strict:  # the first token sees nothing
            assert float(jnp.max(jnp.abs(P[:, 0]))) == 0.0
            rows = rows[:, 1:]
        assert float(jnp.max(jnp.abs(rows - 1))) < 1e-13
        if vis is not None:
            assert float(jnp.max(jnp.abs(jnp.where(vis, 0.0, P)))) == 0.0
    # a row of the matrix averages the tokens into the attention mean
    field = mfattn.AttentionField(2.5, mfattn.DenseKernel())
    P = mfattn.attention_weights(layer, measure, 2.5)
    mean = jnp.einsum("hij,jd->hid", P, measure.points)
    vel = jnp.einsum("hde,hke,hik->id", layer.O, layer.V, mean) / params.heads
    assert rel_err(field.velocity(measure.points, measure, layer), vel) < 1e-13


def test_attention_weights_other_kernels(getkey):
    params, measure, _, _ = _problem(getkey(), n=6)
    layer = params.layer(0)
    x, w = measure.points, measure.weights
    s = jnp.einsum("hik,hjk->hij", x @ layer.Q, x @ layer.K)
    # hardmax: all the weight on the best key (distinct scores: no ties)
    P = mfattn.attention_weights(layer, measure, 1.0, kernel=mfattn.HardmaxKernel())
    assert rel_err(P, jax.nn.one_hot(jnp.argmax(s, -1), 6)) == 0.0
    # unnormalised: w_j exp(s_ij), rows not normalised
    P = mfattn.attention_weights(layer, measure, 1.5, kernel=mfattn.UnnormalizedKernel())
    assert rel_err(P, w[None, None, :] * jnp.exp(1.5 * s)) < 1e-13
    # sharded: the one-device matrix
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("tokens",))
    inner = mfattn.DenseKernel(causal=True, alibi_slope=0.5)
    P1 = mfattn.attention_weights(layer, measure, 1.5, kernel=inner)
    P4 = mfattn.attention_weights(layer, measure, 1.5, kernel=mfattn.ShardedKernel(inner, mesh))
    assert rel_err(P4, P1) < 1e-13


def test_attention_weights_positions_vmap_and_errors(getkey):
    params, measure, _, _ = _problem(getkey(), n=5)
    layer = params.layer(2)
    kernel = mfattn.DenseKernel(causal=True)
    # positions: reversing them reverses the mask
    P = mfattn.attention_weights(layer, measure, 2.0, kernel=kernel, positions=jnp.arange(5)[::-1])
    assert float(jnp.max(jnp.abs(jnp.tril(P, -1)))) == 0.0
    assert float(jnp.max(jnp.abs(P.sum(-1) - 1))) < 1e-13
    # vmap over measures is the loop over them
    pts = jax.random.normal(getkey(), (3, 5, 3))
    f = lambda x: mfattn.attention_weights(layer, mfattn.EmpiricalMeasure(x), 2.0, kernel=kernel)
    batched = jax.vmap(f)(pts)
    assert rel_err(batched, jnp.stack([f(x) for x in pts])) < 1e-14
    with pytest.raises(ValueError, match="`layer`"):
        mfattn.attention_weights(params, measure, 2.0)
    with pytest.raises(ValueError, match="`positions`"):
        mfattn.attention_weights(layer, measure, 2.0, kernel=kernel, positions=jnp.arange(4))
    with pytest.raises(TypeError, match="kernel"):
        mfattn.attention_weights(layer, measure, 2.0, kernel="dense")
