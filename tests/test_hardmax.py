"""The hardmax kernel (beta = infinity): ties averaged, the softmax limit, its
backward pass against autodiff and finite differences, the field and the flow
it generates against closed forms."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err, tree_rel_err

import mfattn
from mfattn._hardmax import hardmax_backward, hardmax_forward


def _reference(q, k, v, w, qpos=None, kpos=None, tol=1e-12):
    """A loop over heads and queries: the w-weighted mean of the values of the
    visible keys whose score is within `tol` of the best."""
    q, k, v, w = map(np.asarray, (q, k, v, w))
    H, m, _ = q.shape
    out = np.zeros((H, m, v.shape[-1]))
    for h in range(H):
        for i in range(m):
            vis = w > 0
            if qpos is not None:
                vis &= np.asarray(kpos) <= qpos[i]
            if not vis.any():
                continue
            s = k[h] @ q[h, i]
            best = s[vis].max()
            tie = vis & (s >= best - tol)
            out[h, i] = (w[tie] @ v[h, tie]) / w[tie].sum()
    return out


def _case(key, H=2, m=6, n=9, kd=3):
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
    q, k, v = (rng.standard_normal(shape) for shape in [(H, m, kd), (H, n, kd), (H, n, kd)])
    w = rng.uniform(0.2, 1.0, n)
    return tuple(map(jnp.asarray, (q, k, v, w / w.sum())))


_forward = jax.jit(hardmax_forward)
_backward = jax.jit(hardmax_backward)


def test_forward_against_loop_with_ties(getkey):
    q, k, v, w = map(np.array, _case(getkey()))
    # exact ties: key 4 repeats key 1 (another weight, another value), and
    # key 7 = key 2 up to rounding; a zero-weight probe with the largest score
    e = np.eye(3)
    k[:, 1], k[:, 2] = 10 * e[0], 10 * e[1]  # the best keys along e_0, e_1
    k[:, 4], k[:, 7] = k[:, 1], k[:, 2] * (1 + 1e-15)
    k[:, 8] = 10 * q[:, 0]
    w[8] = 0.0
    q[:, 1], q[:, 2] = e[0], 0.3 * e[1]  # queries that pick the ties
    q, k, v, w = map(jnp.asarray, (q, k, v, w / w.sum()))
    o, (best, mass) = _forward(q, k, v, w)
    assert rel_err(o, _reference(q, k, v, w)) < 1e-13
    # query 1 of each head averages keys 1 and 4, query 2 keys 2 and 7
    for i, (a, b) in [(1, (1, 4)), (2, (2, 7))]:
        expect = (w[a] * v[:, a] + w[b] * v[:, b]) / (w[a] + w[b])
        assert rel_err(o[:, i], expect) < 1e-13
        assert np.allclose(mass[:, i], w[a] + w[b], rtol=1e-14)
    assert best.shape == mass.shape == (2, 6)


def test_forward_causal_and_empty(getkey):
    q, k, v, w = _case(getkey())
    qpos = jnp.array([0, 3, 8, 5, 1, 2])
    kpos = jnp.arange(9)
    kernel = mfattn.HardmaxKernel(causal=True)
    forward = jax.jit(kernel.forward)
    o, _ = forward(q, k, v, w, 1.0, qpos, kpos)
    assert rel_err(o, _reference(q, k, v, w, qpos, kpos)) < 1e-13
    # a query that sees no key gets o = 0, and zero cotangents
    none = jnp.full((6,), -1)
    o, aux = forward(q, k, v, w, 1.0, none, kpos)
    assert np.all(np.asarray(o) == 0)
    c = jax.random.normal(getkey(), o.shape)
    grads = jax.jit(kernel.backward)(q, k, v, w, o, aux, c, jnp.ones(6) / 6, 1.0, none, kpos)
    assert all(np.all(np.asarray(g) == 0) for g in grads)
    with pytest.raises(ValueError, match="positions"):
        kernel.forward(q, k, v, w, 1.0)


def test_softmax_tends_to_hardmax(getkey):
    """The dense softmax kernel at inverse temperature beta differs from hardmax
    by at most 2 max|v| e^{-beta gap} / w_min (gap: between the best and the
    second best score, all well separated here)."""
    q, k, v, w = _case(getkey(), m=20)
    s = np.sort(np.asarray(jnp.einsum("hmk,hnk->hmn", q, k)), -1)
    gap = float((s[..., -1] - s[..., -2]).min())
    hard, _ = _forward(q, k, v, w)
    dense = jax.jit(lambda *a: mfattn.DenseKernel().forward(*a)[0])
    soft = lambda beta: dense(q, k, v, w, beta)
    errs = []
    for beta in (2 / gap, 8 / gap, 32 / gap):
        err = float(np.max(np.abs(soft(beta) - hard)))
        bound = 2 * np.max(np.abs(v)) * np.exp(-beta * gap) / w.min()
        assert err <= bound
        errs.append(err)
    assert errs[2] < 1e-10 < errs[0]


def test_backward_against_autodiff_and_finite_differences(getkey):
    q, k, v, w = _case(getkey())
    rng = np.random.default_rng(1)
    c = jnp.asarray(rng.standard_normal(q.shape))
    u = jnp.asarray(rng.uniform(0.1, 1.0, 6))
    # cotangent convention: d/dv_j sum_i u_i <c_i, o_i> = w_j dv_j (dk likewise)
    objective = jax.jit(
        lambda q, k, v: jnp.sum(u[None, :, None] * c * hardmax_forward(q, k, v, w)[0])
    )
    gq, gk, gv = jax.jit(jax.grad(objective, argnums=(0, 1, 2)))(q, k, v)
    o, aux = _forward(q, k, v, w)
    dq, dk, dv = _backward(q, k, v, w, aux, c, u)
    assert rel_err(dv * w[None, :, None], gv) < 1e-13
    assert np.all(np.asarray(dq) == 0) and np.all(np.asarray(dk) == 0)
    assert np.all(np.asarray(gq) == 0) and np.all(np.asarray(gk) == 0)
    # finite differences: moving queries and keys by 1e-6 changes no argmax here
    eps = 1e-6
    for arg in (0, 1):
        args = [q, k, v]
        e = rng.standard_normal(args[arg].shape)
        plus = list(args)
        plus[arg] = args[arg] + eps * e
        assert float(objective(*plus) - objective(*args)) == pytest.approx(0.0, abs=1e-15)
    e = rng.standard_normal(v.shape)
    fd = (objective(q, k, v + eps * e) - objective(q, k, v - eps * e)) / (2 * eps)
    assert float(fd) == pytest.approx(float(np.sum(w[None, :, None] * dv * e)), rel=1e-8)


def test_field_with_hardmax_kernel(getkey):
    """Through the field: the closed-form adjoint bracket and gradient map equal
    jax.grad of the hardmax velocities (whose grad_x part is 0), and the velocity is
    O V^T applied to the best atom's (mean) value."""
    d, k, H, n = 3, 2, 2, 8
    layer = mfattn.AttentionParams.xavier_uniform(getkey(), 1, H, d, k).layer(0)
    X = jax.random.normal(getkey(), (n, d))
    w = jax.random.uniform(getkey(), (n,), minval=0.2, maxval=1.0)
    w = w / w.sum()
    P = jax.random.normal(getkey(), (n, d))
    field = mfattn.AttentionField(1.0, kernel=mfattn.HardmaxKernel())

    def objective(X, layer):
        return jnp.sum(w[:, None] * P * field(X, mfattn.EmpiricalMeasure(X, w), layer))

    gX, gth = jax.jit(jax.grad(objective, argnums=(0, 1)))(X, layer)
    backward = eqx.filter_jit(
        lambda X, layer: field.backward(mfattn.EmpiricalMeasure(X, w), layer, P)
    )
    bracket, _, grads = backward(X, layer)
    assert rel_err(bracket, gX / w[:, None]) < 1e-12
    assert tree_rel_err(grads, jax.tree.map(lambda b: H * b, gth)) < 1e-12
    measure = mfattn.EmpiricalMeasure(X, w)
    z = jax.random.normal(getkey(), (5, d))
    scores = np.einsum("md,hdk,hek,ne->hmn", z, layer.Q, layer.K, X)
    best = scores.argmax(-1)
    OV = np.einsum("hdk,hek->hde", layer.O, layer.V)
    ref = np.einsum("hde,hme->md", OV, np.asarray(X)[best]) / H
    assert rel_err(field(z, measure, layer), ref) < 1e-13


def test_hardmax_flow_closed_form():
    """Q = K = V = O = I in R^2, x2 = 2 x1: token 2 attends to itself and token 1
    to token 2 for all t, so x2(t) = x2 e^t and x1(t) = x1 + x2 (e^t - 1)."""
    x1 = jnp.array([0.6, -0.3])
    X0 = jnp.stack([x1, 2 * x1])
    ts = jnp.linspace(0.0, 1.5, 7)
    xs = mfattn.attention_flow(
        mfattn.identity_layer(2),
        mfattn.EmpiricalMeasure(X0),
        1.0,
        ts,
        kernel=mfattn.HardmaxKernel(),
        rtol=1e-11,
        atol=1e-12,
    )
    e = np.exp(np.asarray(ts))[:, None]
    exact = np.stack([x1[None, :] + 2 * x1[None, :] * (e - 1), 2 * x1[None, :] * e], axis=1)
    assert rel_err(xs, exact) < 1e-9


def test_bad_tie_rtol():
    with pytest.raises(ValueError, match="tie_rtol"):
        mfattn.HardmaxKernel(tie_rtol=-1.0)
