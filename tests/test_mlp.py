"""MLP blocks and the residual scaling of the discrete model (docs/theory.md,
section 9): closed forms against autodiff in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err, tree_rel_err
from helpers import random_loss, random_measure, random_params

import mfattn

# tanh: test_discrete_with_mlp_matches_autodiff; gelu, linear: tests/test_sde.py
ACTIVATIONS = ["relu", jnp.sin]


FORMULAS = {
    "tanh": jnp.tanh,
    "relu": lambda a: jnp.maximum(a, 0.0),
    "gelu": lambda a: 0.5 * a * (1 + jax.scipy.special.erf(a / np.sqrt(2))),
    "linear": lambda a: a,
}


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_backward_matches_autodiff(getkey, activation):
    n, d, m = 7, 3, 5
    sigma = FORMULAS[activation] if isinstance(activation, str) else activation

    @jax.jit  # one compile per activation
    def check(key):
        kphi, kx, kp, ku = jax.random.split(key, 4)
        phi = mfattn.MLPParams.init(kphi, 1, d, m).layer(0)
        x = jax.random.normal(kx, (n, d))
        p = jax.random.normal(kp, (n, d))
        u = jax.random.uniform(ku, (n,))
        f = lambda phi, x: mfattn.mlp_forward(phi, x, activation)
        formula = sigma(x @ phi.W1 + phi.b1[None, :]) @ phi.W2
        dx, grads = mfattn.mlp_backward(phi, x, p, u, activation)
        # grad_x F(x_i)^T p_i, one point at a time
        jac = jax.vmap(jax.jacfwd(lambda xi: f(phi, xi)))(x)  # (n, d, d)
        # g(phi) = grad_phi sum_i u_i <F(x_i; phi), p_i>
        expect = jax.grad(lambda phi: jnp.sum(u[:, None] * p * f(phi, x)))(phi)
        return f(phi, x), formula, dx, jnp.einsum("nad,na->nd", jac, p), grads, expect

    out, formula, dx, dx_ref, grads, grads_ref = check(getkey())
    assert rel_err(out, formula) < 1e-14
    assert rel_err(dx, dx_ref) < 1e-13
    assert tree_rel_err(grads, grads_ref) < 1e-13


def test_mlp_init_mean_zero(getkey):
    """E[F(x; phi)] = 0 and E[F F^T] is a multiple of the identity, to within
    4.5 Monte-Carlo standard errors over 4000 i.i.d. blocks."""
    B, d, m = 4000, 3, 8
    x = jnp.array([0.3, -1.2, 0.8])

    @jax.jit
    def outputs(key):
        blocks = mfattn.MLPParams.init(key, B, d, m, scale=1.7, bias=0.5)
        return blocks, jax.vmap(lambda phi: mfattn.mlp_forward(phi, x, "relu"))(blocks)

    blocks, F = outputs(getkey())
    assert blocks.W1.shape == (B, d, m) and blocks.b1.shape == (B, m)
    assert blocks.W2.shape == (B, m, d)
    F = np.asarray(F)  # (B, d)
    mean, se = F.mean(0), F.std(0) / np.sqrt(B)
    assert np.all(np.abs(mean) < 4.5 * se)
    # off-diagonal second moments vanish, diagonal ones agree
    FF = F[:, :, None] * F[:, None, :]
    mean2, se2 = FF.mean(0), FF.std(0) / np.sqrt(B)
    off = ~np.eye(d, dtype=bool)
    assert np.all(np.abs(mean2[off]) < 4.5 * se2[off])
    diag = np.diag(mean2)
    diag_se = np.diag(se2)
    assert abs(diag[0] - diag[1]) < 4.5 * np.hypot(diag_se[0], diag_se[1])


def test_mlp_errors(getkey):
    with pytest.raises(ValueError, match="b1"):
        mfattn.MLPParams(jnp.zeros((2, 3, 4)), jnp.zeros((2, 5)), jnp.zeros((2, 4, 3)))
    with pytest.raises(ValueError, match="W2"):
        mfattn.MLPParams(jnp.zeros((3, 4)), jnp.zeros(4), jnp.zeros((4, 2)))
    with pytest.raises(TypeError, match="W1"):
        mfattn.MLPParams(jnp.zeros((3, 4), int), jnp.zeros(4), jnp.zeros((4, 3)))
    phi = mfattn.MLPParams(jnp.zeros((3, 4)), jnp.zeros(4), jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="activation"):
        mfattn.mlp_forward(phi, jnp.zeros(3), "softplus?")
    with pytest.raises(ValueError, match="`x`"):
        mfattn.mlp_forward(phi, jnp.zeros(2), "tanh")
    P = mfattn.AttentionParams(*[jnp.zeros((2, 2, 3, 2))] * 4)
    mu = mfattn.EmpiricalMeasure(jnp.zeros((4, 3)))
    loss = mfattn.DenoisingLoss(jnp.zeros((4, 3)))
    mlp = mfattn.MLPParams(jnp.zeros((3, 3, 4)), jnp.zeros((3, 4)), jnp.zeros((3, 4, 3)))
    with pytest.raises(ValueError, match="blocks"):
        mfattn.solve_discrete(P, mu, loss, 1.0, mlp=mlp)
    with pytest.raises(ValueError, match="residual_scaling"):
        mfattn.solve_discrete(P, mu, loss, 1.0, residual_scaling="1/L^2")
    with pytest.raises(TypeError, match="mlp"):
        mfattn.solve_discrete(P, mu, loss, 1.0, mlp=P)


def _reference_loss(params, mlp, points, weights, loss, beta, h, activation):
    """An independent forward: the public field's velocity plus the MLP
    written out, stepped by a Python loop."""
    field = mfattn.AttentionField(beta)
    x = points
    sigma = {"tanh": jnp.tanh, "relu": jax.nn.relu}[activation]
    for l in range(params.depth):
        mu = mfattn.EmpiricalMeasure(x, weights)
        v = field.velocity(x, mu, params.layer(l))
        v = v + sigma(x @ mlp.W1[l] + mlp.b1[l][None, :]) @ mlp.W2[l]
        x = x + h * v
    return loss(mfattn.EmpiricalMeasure(x, weights))


@pytest.mark.parametrize(
    "scaling,kind,activation",
    [
        pytest.param(mfattn.InverseSqrtDepth(), "denoise", "tanh", id="1/sqrt(L)-denoise-tanh"),
        pytest.param(
            mfattn.InverseDepth(), "mmd", "relu", marks=pytest.mark.slow, id="1/L-mmd-relu"
        ),
    ],
)
def test_discrete_with_mlp_matches_autodiff(getkey, scaling, kind, activation):
    """Loss, rescaled adjoints (tokens and test particles) and both gradient
    maps of the model with MLP blocks against `jax.grad` of an independent
    forward, non-uniform weights."""
    L, H, n, d, k, m, beta = 2, 2, 5, 3, 2, 4, 1.3
    P = random_params(getkey(), L, H, d, k)
    mlp = mfattn.MLPParams.init(getkey(), L, d, m)
    mu = random_measure(getkey(), n, d)
    loss = random_loss(getkey(), kind, mu)
    h = 1 / L if isinstance(scaling, mfattn.InverseDepth) else L**-0.5
    # two free test particles, and two sitting on tokens 0 and 1 (with their labels)
    z = jnp.concatenate([jax.random.normal(getkey(), (2, d)), mu.points[:2]])
    labels = None
    if kind == "denoise":
        labels = jnp.concatenate([jax.random.normal(getkey(), (2, d)), loss.targets[:2]])
    sol = mfattn.solve_discrete(
        P,
        mu,
        loss,
        beta,
        z,
        test_labels=labels,
        mlp=mlp,
        activation=activation,
        residual_scaling=scaling,
    )
    ref = lambda P, mlp, x: _reference_loss(P, mlp, x, mu.weights, loss, beta, h, activation)
    value, (gP, gM, gx) = jax.jit(jax.value_and_grad(ref, argnums=(0, 1, 2)))(P, mlp, mu.points)
    assert rel_err(sol.loss, value) < 1e-13
    assert sol.xs.shape == (L + 1, n, d) and sol.ps.shape == (L + 1, n, d)
    assert rel_err(sol.ps[0], gx / mu.weights[:, None]) < 1e-11
    assert tree_rel_err(jax.tree.map(lambda g: g * h / H, sol.grads), gP) < 1e-11
    assert tree_rel_err(jax.tree.map(lambda g: g * h, sol.mlp_grads), gM) < 1e-11

    # test particles: carried by the field (attention + MLP) without acting on it
    def z_final(z):
        for l in range(L):
            m_l = mfattn.EmpiricalMeasure(sol.xs[l], mu.weights)
            v = mfattn.AttentionField(beta).velocity(z, m_l, P.layer(l))
            v = v + mfattn.mlp_forward(mlp.layer(l), z, activation)
            z = z + h * v
        return z

    assert rel_err(sol.test_xs[-1], jax.jit(z_final)(z)) < 1e-13
    if kind == "mmd":  # the terminal adjoint of a test particle is d_mu Loss at z^L
        pz = loss.lions_derivative(mu.with_points(sol.xs[-1]), sol.test_xs[-1])
        assert rel_err(sol.test_ps[-1], pz) < 1e-13
    # the adjoint of a test particle on a token (same label) is the token's
    assert rel_err(sol.test_ps[:, 2:], sol.ps[:, :2]) < 1e-12


@pytest.mark.slow
def test_default_scaling_without_mlp_is_solve_discrete(getkey):
    """`residual_scaling=mfattn.InverseDepth()` and `mlp=None` is the
    attention-only model; the route with zero MLP blocks gives the same
    solution."""
    L, H, n, d, k = 4, 3, 6, 2, 2
    P = random_params(getkey(), L, H, d, k)
    mu = random_measure(getkey(), n, d)
    loss = random_loss(getkey(), "mmd", mu)
    base = mfattn.solve_discrete(P, mu, loss, 0.7)
    zero = mfattn.MLPParams(jnp.zeros((L, d, 3)), jnp.zeros((L, 3)), jnp.zeros((L, 3, d)))
    routed = mfattn.solve_discrete(
        P, mu, loss, 0.7, mlp=zero, residual_scaling=mfattn.InverseDepth()
    )
    assert rel_err(routed.xs, base.xs) < 1e-14
    assert rel_err(routed.ps, base.ps) < 1e-13
    assert tree_rel_err(routed.grads, base.grads) < 1e-13
    assert np.all(np.asarray(routed.mlp_grads.W1) == 0) and base.mlp_grads is None
