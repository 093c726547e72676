"""The softmax field at beta = 1e4 in float64: finite, and accurate against
exact references (the hardmax limit for well-separated scores, closed forms for
two atoms with nearly tied scores, autodiff through the stable softmax)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err, tree_rel_err
from scipy.special import expit

import mfattn

BETA = 1e4
FIELDS = {
    "dense": lambda: mfattn.AttentionField(BETA),
    "chunked": lambda: mfattn.AttentionField(BETA, chunk_size=3),
}


def _layer(key, d, k, H):
    return mfattn.AttentionParams.xavier_uniform(key, 1, H, d, k).layer(0)


def _norm2(a):
    return float(np.linalg.norm(np.asarray(a), 2))


@pytest.mark.parametrize("kind", FIELDS)
def test_well_separated_scores_give_the_hardmax_limit(getkey, kind):
    """When every query's best score beats the second by more than 40 / beta,
    the softmax weights of all other atoms are below e^{-40}: the field is the
    hardmax field O V^T y*, and grad_x (beta O V^T Cov K Q^T) vanishes, up to
    beta e^{-40} relative to its natural scale."""
    d, k, H, n, m = 4, 3, 2, 11, 7
    layer = _layer(getkey(), d, k, H)
    y = jax.random.normal(getkey(), (n, d))
    w = jax.random.uniform(getkey(), (n,), minval=0.2, maxval=1.0)
    measure = mfattn.EmpiricalMeasure(y, w / w.sum())
    x = jax.random.normal(getkey(), (200, d))
    scores = np.einsum("md,hdk,hek,ne->hmn", x, layer.Q, layer.K, y)
    top2 = -np.sort(-scores, axis=-1)[..., :2]
    keep = np.all(BETA * (top2[..., 0] - top2[..., 1]) > 40, axis=0)
    x, scores = x[keep][:m], scores[:, keep][:, :m]
    assert x.shape[0] == m  # enough well-separated queries in the draw
    best = scores.argmax(-1)  # (H, m)
    OV = np.einsum("hdk,hek->hde", layer.O, layer.V)
    ref = np.einsum("hde,hme->md", OV, np.asarray(y)[best]) / H
    field = FIELDS[kind]()
    v = field(x, measure, layer)
    assert np.all(np.isfinite(np.asarray(v)))
    assert rel_err(v, ref) < 1e-12
    g = field.grad_x(x, measure, layer)
    KQ = np.einsum("hdk,hek->hde", layer.K, layer.Q)
    scale = (
        BETA
        * max(_norm2(a) for a in OV)
        * max(_norm2(a) for a in KQ)
        * float(np.max(np.sum(np.asarray(y) ** 2, -1)))
    )
    assert np.all(np.isfinite(np.asarray(g)))
    assert float(np.max(np.abs(np.asarray(g)))) < 1e-12 * scale


def _two_atoms(key, delta, d=3, k=2):
    """One head with random (Q, K, V, O), two atoms with random weights, and a
    query whose score gap is beta <Q^T x, K^T (y1 - y2)> = delta exactly (up to
    rounding), on unit-scale vectors."""
    kp, ky, kx, kw = jax.random.split(key, 4)
    layer = _layer(kp, d, k, 1)
    y = np.asarray(jax.random.normal(ky, (2, d)))
    w = np.asarray(jax.random.uniform(kw, (2,), minval=0.3, maxval=1.0))
    w = w / w.sum()
    B = np.asarray(layer.Q[0] @ layer.K[0].T)  # score matrix: s(x, y) = beta x^T B y
    u = B @ (y[0] - y[1])
    x0 = np.asarray(jax.random.normal(kx, (d,)))
    x = x0 + (delta / BETA - x0 @ u) / (u @ u) * u
    return layer, y, w, x, B


@pytest.mark.parametrize(
    "kind,delta",
    [("dense", d) for d in (-6.0, 0.0, 0.7, 9.0)]
    + [("chunked", 0.7)]
    + [pytest.param("chunked", d, marks=pytest.mark.slow) for d in (-6.0, 0.0, 9.0)],
)
def test_near_ties_two_atoms_closed_form(getkey, kind, delta):
    """Scores within O(1/beta) of each other at beta = 1e4: the attention is a
    logistic function of the gap, p_1 = expit(delta + log(w_1 / w_2)); mean,
    covariance, grad_x and the Lions derivative follow in closed form."""
    layer, y, w, x, B = _two_atoms(getkey(), delta)
    p1 = expit(delta + np.log(w[0] / w[1]))
    p = np.array([p1, 1 - p1])
    OV = np.asarray(layer.O[0] @ layer.V[0].T)
    mean = p @ y
    diff = y[0] - y[1]
    cov = p[0] * p[1] * np.outer(diff, diff)
    ref_v = OV @ mean
    ref_g = BETA * OV @ cov @ B.T  # K Q^T = B^T
    a = p / w  # the density a(x, y_j) = p_j / w_j
    ref_l = np.stack(
        [a[j] * OV @ (np.eye(3) + BETA * np.outer(y[j] - mean, B.T @ x)) for j in range(2)]
    )
    field = FIELDS[kind]()
    measure = mfattn.EmpiricalMeasure(jnp.asarray(y), jnp.asarray(w))
    v = field(jnp.asarray(x), measure, layer)
    g = field.grad_x(jnp.asarray(x), measure, layer)
    lions = field.lions_derivative(jnp.asarray(x), measure, layer, jnp.asarray(y))
    # the scores are ~1e4 and exact to ~1e-12 absolute: relative errors ~1e-11
    assert rel_err(v, ref_v) < 1e-9
    # natural scales: beta |OV| |B| |y|^2 / 4 for grad_x (its maximum over p),
    # beta |OV| |B| |x| |y| / min(w) for the Lions derivative
    ny = float(np.max(np.linalg.norm(y, axis=-1)))
    g_scale = BETA * _norm2(OV) * _norm2(B) * ny**2 / 4
    l_scale = BETA * _norm2(OV) * _norm2(B) * float(np.linalg.norm(x)) * ny / w.min()
    assert rel_err(g, ref_g, floor=g_scale) < 1e-9
    assert rel_err(lions, ref_l, floor=l_scale) < 1e-9


@pytest.mark.parametrize("kind", ["dense", pytest.param("chunked", marks=pytest.mark.slow)])
def test_adjoint_bracket_matches_autodiff_at_beta_1e4(getkey, kind):
    """Tokens in a cap of angular size 3e-4, so that beta-weighted score gaps are
    O(1): the closed-form adjoint bracket and gradient map equal jax.grad
    through the stable softmax, and are finite. Errors are relative to the
    largest entry of the object (its natural scale)."""
    d, k, H, n = 3, 2, 2, 9
    layer = _layer(getkey(), d, k, H)
    centre = jnp.array([1.0, 0.0, 0.0])
    X = centre[None, :] + 3e-4 * jax.random.normal(getkey(), (n, d))
    w = jax.random.uniform(getkey(), (n,), minval=0.2, maxval=1.0)
    w = w / w.sum()
    P = jax.random.normal(getkey(), (n, d))
    field = FIELDS[kind]()

    def objective(X, layer):
        measure = mfattn.EmpiricalMeasure(X, w)
        return jnp.sum(w[:, None] * P * field(X, measure, layer))

    gX, gth = jax.jit(jax.grad(objective, argnums=(0, 1)))(X, layer)
    backward = eqx.filter_jit(
        lambda X, layer: field.backward(mfattn.EmpiricalMeasure(X, w), layer, P)
    )
    bracket, _, grads = backward(X, layer)
    assert np.all(np.isfinite(np.asarray(bracket)))
    assert rel_err(bracket, gX / w[:, None]) < 1e-9
    # gradient map = H * d(objective)/d theta
    assert tree_rel_err(grads, jax.tree.map(lambda b: H * b, gth)) < 1e-9
    # the attention is far from hardmax here: the bracket's grad_x part is O(1)
    pi = jax.nn.softmax(BETA * jnp.einsum("md,hdk,hek,ne->hmn", X, layer.Q, layer.K, X), -1)
    assert float(jnp.max(pi)) < 0.99
