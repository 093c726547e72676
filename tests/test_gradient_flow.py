"""Gradient flow in training time (docs/theory.md, section 12)."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from conftest import rel_err, tree_rel_err

import mfattn
from mfattn._gradient_flow import _as_risk

EULER = dict(solver=diffrax.Euler(), stepsize_controller=diffrax.ConstantStepSize(), max_steps=128)
# one model shape for the whole file (L, H, d, k), so that compiled solves are shared
L, H, D, KH = 2, 4, 2, 2


def _model(key, scale=1.0):
    params = mfattn.AttentionParams.xavier_uniform(key, L, H, D, KH)
    return mfattn.DiscreteTransformer(jax.tree.map(lambda a: scale * a, params), 1.0)


def _data(key, N=3, n=5, d=2):
    return mfattn.DenoisingTask(dim=d, num_tokens=n, num_clusters=2)(key, N)


def _norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(a**2) for a in jax.tree.leaves(tree))))


def _gd_as_train(model, data, eta, steps, key):
    """`steps` of `optax.sgd(eta)` on the gradient map, through `mfattn.train`
    with a sampler that always returns the fixed training set."""
    N = data[0].points.shape[0]
    res = mfattn.train(
        model,
        lambda key, batch_size: data,
        optax.sgd(eta),
        steps,
        key,
        batch_size=N,
        steps_per_call=steps,
        progress=False,
    )
    return res


@pytest.mark.parametrize(
    "kind",
    ["discrete", pytest.param("limit", marks=pytest.mark.slow)],  # limit: 25 s to compile
)
def test_euler_steps_are_sgd(getkey, kind):
    """Explicit Euler with step `eta` on `d theta/ds = -g` is `optax.sgd(eta)` fed
    with the batch-mean gradient map, i.e. what `mfattn.train` does: equal to
    rounding after `K` steps, at `s = K eta`."""
    data = _data(getkey())
    if kind == "discrete":
        model = _model(getkey(), scale=2.0)
    else:
        grid = mfattn.AttentionParams.mean_field(getkey(), 2, 3, 2, 2)
        model = mfattn.MeanFieldTransformer(grid, 1.0, rtol=1e-8, atol=1e-10)
    eta, K = 0.1, 5
    s1 = jnp.asarray(eta * K)
    sol = mfattn.gradient_flow(
        model, data, s1, ss=jnp.stack([0.0, s1]), dt0=jnp.asarray(eta), **EULER
    )
    res = _gd_as_train(model, data, eta, K, getkey())
    assert int(sol.stats["num_steps"]) in (K, K + 1)  # + a rounding-sized last step
    assert tree_rel_err(sol.model.params, res.model.params) < 1e-13
    assert abs(float(sol.risk[0]) - res.history["loss"][0]) < 1e-14
    # the model moved: the comparison is not between two copies of the initial point
    assert tree_rel_err(sol.model.params, model.params) > 1e-3


def test_gradient_descent_converges_to_the_flow_at_order_one(getkey):
    """`theta_GD(K steps of s1/K)` against the adaptive flow at `s1`: the error
    falls like the step size (fitted slope in `[0.9, 1.1]`); along the flow
    `dR/ds = -|g|^2` in the mean-field normalisation (the trapezoid rule on the
    saved dissipation reproduces the risk's decrease at order 2)."""
    data = _data(getkey())
    model = _model(getkey())
    s1 = jnp.asarray(2.0)
    ss = jnp.linspace(0.0, 2.0, 33)
    ref = mfattn.gradient_flow(
        model,
        data,
        s1,
        ss=ss,
        stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-12),
    )
    assert float(ref.risk[-1]) < 0.9 * float(ref.risk[0])  # the flow goes somewhere
    Ks = [8, 16, 32, 64]
    errs = []
    for K in Ks:
        gd = mfattn.gradient_flow(model, data, s1, ss=jnp.stack([0.0, s1]), dt0=s1 / K, **EULER)
        errs.append(_norm(jax.tree.map(jnp.subtract, gd.model.params, ref.model.params)))
    slope = scipy.stats.linregress(np.log(2.0 / np.array(Ks)), np.log(errs)).slope
    assert 0.9 <= slope <= 1.1, (slope, errs)

    R, D, s = np.asarray(ref.risk), np.asarray(ref.dissipation), np.asarray(ref.ss)
    drop = R[-1] - R[0]
    e_fine = abs(drop + np.trapezoid(D, s))
    e_coarse = abs(drop + np.trapezoid(D[::2], s[::2]))
    assert e_fine < e_coarse / 3, (e_fine, e_coarse)  # order 2: ratio 4
    assert e_fine < 1e-3 * abs(drop)


def test_risk_gradient_maps_against_grad(getkey):
    """`value_and_gradient_map` is `L H dR/dtheta` for the discrete model, for the
    mean token loss and for the probe risk."""
    d = D
    model = _model(getkey(), scale=2.0)
    measures, losses = _data(getkey(), N=3, d=d)
    probes = jax.random.normal(getkey(), (2, d))
    targets = jax.random.normal(getkey(), (3, 2, d))
    token = mfattn.EmpiricalRisk(measures, losses)
    probe = mfattn.ProbeRisk(measures, probes, targets)

    def token_risk(p):
        f = lambda m, lo: mfattn.discrete_loss(p, m, lo, 1.0)
        return jnp.mean(jax.vmap(f)(measures, losses))

    def probe_risk(p):
        out = jax.vmap(lambda m: mfattn.probe_outputs(model.with_params(p), m, probes))(measures)
        return 0.5 * jnp.sum((out - targets) ** 2) / 3

    for risk, f in [(token, token_risk), (probe, probe_risk)]:
        value, g = risk.value_and_gradient_map(model)
        assert rel_err(value, f(params := model.params)) < 1e-14
        assert rel_err(risk(model), value) < 1e-14
        expected = jax.tree.map(lambda a: L * H * a, jax.grad(f)(params))
        assert tree_rel_err(g, expected) < 1e-12


def test_data_forms(getkey):
    """A `(measures, losses)` tuple and a sampler drawn once with `key` are the
    same empirical risk; anything else is refused."""
    task = mfattn.DenoisingTask(dim=2, num_tokens=4)
    key = getkey()
    from_sampler = _as_risk(task, key, 3)
    from_tuple = _as_risk(task(key, 3), None, None)
    assert isinstance(from_sampler, mfattn.EmpiricalRisk)
    assert tree_rel_err(from_sampler.measures.points, from_tuple.measures.points) == 0.0
    with pytest.raises(ValueError, match="key"):
        _as_risk(task, None, 3)
    with pytest.raises(TypeError, match="data"):
        _as_risk(3.0, None, None)
    with pytest.raises(TypeError, match="model"):
        mfattn.gradient_flow(_model(getkey()).params, task(key, 3), 1.0)
    with pytest.raises(ValueError, match="targets"):
        mfattn.ProbeRisk(task(key, 3)[0], jnp.zeros((1, 2)), jnp.zeros((2, 1, 2)))
