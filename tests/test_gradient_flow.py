"""Gradient flow in training time (docs/theory.md, section 12)."""

import diffrax
import equinox as eqx
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
# one model and one data shape for the whole file (L, H, d, k; N measures of n
# tokens), so that every compiled solve is shared between the tests
L, H, D, KH = 2, 4, 2, 2
N, NTOK = 3, 5


@eqx.filter_jit
def SAMPLER(key, batch_size):
    """Denoising data (clean labels `y`, tokens `x = y + noise / 2`) from one
    fixed-size draw: compiled once per batch size (every eager `jax.random`
    call compiles anew per shape)."""
    size = batch_size * NTOK * D
    pool = jax.random.normal(key, (2, 256))
    y = pool[0, :size].reshape(batch_size, NTOK, D)
    x = y + 0.5 * pool[1, :size].reshape(batch_size, NTOK, D)
    return jax.vmap(mfattn.EmpiricalMeasure)(x), jax.vmap(mfattn.DenoisingLoss)(y)


class _RiskBelow(eqx.Module):
    """Event condition: the risk is below `threshold` (an array, so that every
    threshold shares one compiled solve)."""

    model: mfattn.DiscreteTransformer
    risk: mfattn.AbstractRisk
    threshold: jax.Array

    def __call__(self, s, params, args, **kwargs):
        return self.risk(self.model.with_params(params)) < self.threshold


def _event(model, risk, threshold=-jnp.inf):
    return diffrax.Event(_RiskBelow(model, risk, jnp.asarray(threshold)))


def _model(key, scale=1.0):
    params = mfattn.AttentionParams.xavier_uniform(key, L, H, D, KH)
    return mfattn.DiscreteTransformer(jax.tree.map(lambda a: scale * a, params), 1.0)


def _data(key):
    return SAMPLER(key, N)


def _norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(a**2) for a in jax.tree.leaves(tree))))


def _sgd(model, risk, eta, steps):
    """`steps` of `optax.sgd(eta)` fed with the risk's gradient map: the
    iterates (`steps + 1`) and the risk at the first `steps` of them."""
    opt = optax.sgd(eta)

    @eqx.filter_jit
    def step(params, state):
        value, g = risk.value_and_gradient_map(model.with_params(params))
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, value

    params, state = model.params, opt.init(model.params)
    iterates, values = [params], []
    for _ in range(steps):
        params, state, value = step(params, state)
        iterates.append(params)
        values.append(value)
    return iterates, values


def test_euler_steps_are_sgd(getkey):
    """Explicit Euler with step `eta` on `d theta/ds = -g` is `optax.sgd(eta)` fed
    with the batch-mean gradient map (what `mfattn.train` does on a fixed
    batch): equal to rounding after `K` steps, at `s = K eta`. An event on the
    risk stops the flow at the first step below its threshold; later saves
    hold the stopped state."""
    risk = mfattn.EmpiricalRisk(*_data(getkey()))
    model = _model(getkey(), scale=2.0)
    eta, K = 0.1, 5
    s1 = jnp.asarray(eta * K)
    ss = jnp.stack([0.0, s1])
    sol = mfattn.gradient_flow(
        model, risk, s1, ss=ss, dt0=jnp.asarray(eta), event=_event(model, risk), **EULER
    )
    assert int(sol.stats["num_steps"]) in (K, K + 1)  # + a rounding-sized last step
    assert rel_err(sol.s_end, s1) < 1e-14
    gd, values = _sgd(model, risk, eta, K + 1)  # values[i]: the risk after i steps
    assert tree_rel_err(sol.model.params, gd[K]) < 1e-13
    assert rel_err(sol.risk[0], values[0]) < 1e-14
    # the model moved: the comparison is not between two copies of the initial point
    assert tree_rel_err(sol.model.params, model.params) > 1e-3

    # stop after 3 steps: the risk falls below a threshold between its values there
    assert values[3] < values[2]
    stop = mfattn.gradient_flow(
        model,
        risk,
        s1,
        ss=ss,
        dt0=jnp.asarray(eta),
        event=_event(model, risk, (values[2] + values[3]) / 2),
        **EULER,
    )
    assert rel_err(stop.s_end, 3 * eta) < 1e-12
    assert tree_rel_err(stop.model.params, gd[3]) < 1e-13
    assert rel_err(stop.risk[-1], values[3]) < 1e-13  # the save at s1 holds the stopped state


@pytest.mark.slow
def test_euler_steps_are_train_in_the_limit(getkey):
    """The same for the limit, through `mfattn.train` with `optax.sgd` and a
    sampler that always returns the training set (25 s to compile)."""
    data = _data(getkey())
    grid = mfattn.AttentionParams.mean_field(getkey(), 2, 3, D, KH)
    model = mfattn.MeanFieldTransformer(grid, 1.0, rtol=1e-8, atol=1e-10)
    eta, K = 0.1, 5
    s1 = jnp.asarray(eta * K)
    sol = mfattn.gradient_flow(
        model, data, s1, ss=jnp.stack([0.0, s1]), dt0=jnp.asarray(eta), **EULER
    )
    res = mfattn.train(
        model,
        lambda key, batch_size: data,
        optax.sgd(eta),
        K,
        getkey(),
        batch_size=N,
        steps_per_call=K,
        progress=False,
    )
    assert tree_rel_err(sol.model.params, res.model.params) < 1e-13
    assert abs(float(sol.risk[0]) - res.history["loss"][0]) < 1e-14
    assert tree_rel_err(sol.model.params, model.params) > 1e-3


def test_gradient_descent_converges_to_the_flow_at_order_one(getkey):
    """`theta_GD(K steps of s1/K)` against the adaptive flow at `s1`: the error
    falls like the step size (fitted slope in `[0.9, 1.1]`)."""
    data = mfattn.EmpiricalRisk(*_data(getkey()))
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
        gd = mfattn.gradient_flow(
            model,
            data,
            s1,
            ss=jnp.stack([0.0, s1]),
            dt0=s1 / K,
            event=_event(model, data),  # never fires; shares the compiled solve above
            **EULER,
        )
        errs.append(_norm(jax.tree.map(jnp.subtract, gd.model.params, ref.model.params)))
    slope = scipy.stats.linregress(np.log(2.0 / np.array(Ks)), np.log(errs)).slope
    assert 0.9 <= slope <= 1.1, (slope, errs)

    # the saved dissipation is |g|^2 in the mean-field normalisation at the saved parameters
    params1 = jax.tree.map(lambda a: a[-1], ref.params)
    _, g1 = data.value_and_gradient_map(model.with_params(params1))
    assert rel_err(ref.dissipation[-1], mfattn.mean_field_inner(model, g1, g1)) < 1e-12


def test_empirical_risk_gradient_map_against_grad(getkey):
    """`value_and_gradient_map` of the mean token loss is `L H dR/dtheta` (the
    probe risk's is tested with the tangent kernel, tests/test_ntk.py), and the
    dissipation `mean_field_inner(g, g)` is `-dR/ds` along `d theta/ds = -g`
    (by `jax.jvp` in the direction `-g`)."""
    model = _model(getkey(), scale=2.0)
    measures, losses = _data(getkey())
    risk = mfattn.EmpiricalRisk(measures, losses)

    def f(p):
        one = lambda m, lo: mfattn.discrete_loss(p, m, lo, 1.0)
        return jnp.mean(jax.vmap(one)(measures, losses))

    @jax.jit
    def expected(p, direction):
        return jax.value_and_grad(f)(p), jax.jvp(f, (p,), (direction,))[1]

    value, g = risk.value_and_gradient_map(model)
    (expected_value, expected_grad), slope = expected(model.params, jax.tree.map(jnp.negative, g))
    assert rel_err(value, expected_value) < 1e-14
    assert rel_err(risk(model), value) < 1e-14
    assert tree_rel_err(g, jax.tree.map(lambda a: L * H * a, expected_grad)) < 1e-12
    assert rel_err(-slope, mfattn.mean_field_inner(model, g, g)) < 1e-12


def test_data_forms(getkey):
    """A `(measures, losses)` tuple and a sampler drawn once with `key` are the
    same empirical risk; anything else is refused."""
    key = getkey()
    from_sampler = _as_risk(SAMPLER, key, N)
    from_tuple = _as_risk(SAMPLER(key, N), None, None)
    assert isinstance(from_sampler, mfattn.EmpiricalRisk)
    assert tree_rel_err(from_sampler.measures.points, from_tuple.measures.points) == 0.0
    with pytest.raises(ValueError, match="key"):
        _as_risk(SAMPLER, None, N)
    with pytest.raises(TypeError, match="data"):
        _as_risk(3.0, None, None)
    with pytest.raises(TypeError, match="model"):
        mfattn.gradient_flow(_model(getkey()).params, SAMPLER(key, N), 1.0)
    with pytest.raises(ValueError, match="targets"):
        mfattn.ProbeRisk(SAMPLER(key, N)[0], jnp.zeros((1, D)), jnp.zeros((2, 1, D)))
