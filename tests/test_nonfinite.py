"""Non-finite values: every input is checked where it enters (at once when
concrete, by `eqx.error_if` when traced), a diverging training run stops
without writing a non-finite checkpoint and resumes from the last finite one,
and the switch turns the value checks off."""

import os
import re
import subprocess
import sys

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mfattn
from mfattn._checks import check_finite_args, check_solve

BAD = [pytest.param(np.nan, id="nan"), pytest.param(np.inf, id="inf")]
# a check that fires at trace time is a ValueError; inside jit it is an
# EquinoxRuntimeError (a RuntimeError) with the same name in its message
RAISES = (ValueError, RuntimeError)
N, D, K, L, H = 5, 3, 2, 2, 2


def _kind(value):
    return "NaN" if np.isnan(value) else "inf"


def _points(value=None, at=(2, 1)):
    x = np.array(jax.random.normal(jax.random.key(0), (N, D)))
    if value is not None:
        x[at] = value
    return x


def _params(value=None, field="K"):
    p = mfattn.AttentionParams.xavier_uniform(jax.random.key(1), L, H, D, K)
    if value is None:
        return p
    return eqx.tree_at(lambda q: getattr(q, field), p, getattr(p, field).at[1, 0, 2, 1].set(value))


def _problem():
    x = _points()
    return mfattn.EmpiricalMeasure(x), mfattn.DenoisingLoss(0.5 * x)


# ------------------------------------------------------------ check_finite
@pytest.mark.parametrize("value", BAD)
def test_check_finite_concrete_names_leaf_counts_and_locates(value):
    params = _params(value, "K")
    msg = f"`params.K` has non-finite values: 1 {_kind(value)} (first at index (1, 0, 2, 1))"
    with pytest.raises(ValueError, match=re.escape(msg)):
        mfattn.check_finite(params, "params")
    with pytest.raises(ValueError, match=re.escape("`tree['b'][1]` has non-finite")):
        mfattn.check_finite({"a": jnp.ones(2), "b": [1.0, value]}, "tree")


def test_check_finite_passes_finite_values_through():
    tree = {"a": jnp.ones((2, 3)), "i": jnp.arange(3), "b": jnp.array([True]), "s": "x"}
    assert mfattn.check_finite(tree, "tree") is tree
    p = _params()
    out = eqx.filter_jit(lambda q: mfattn.check_finite(q, "params"))(p)
    assert eqx.tree_equal(out, p)


@pytest.mark.parametrize("value", BAD)
def test_check_finite_traced_names_leaf(value):
    f = eqx.filter_jit(lambda q: mfattn.check_finite(q, "params"))
    with pytest.raises(RuntimeError, match=f"`params.O` contains {_kind(value)}"):
        f(_params(value, "O"))
    # the first bad leaf is named; a NaN is reported before an inf in that leaf
    both = eqx.tree_at(lambda q: q.V, _params(np.inf, "O"), _params(np.nan, "V").V)
    with pytest.raises(RuntimeError, match="`params.V` contains NaN"):
        f(both)


def test_check_finite_under_vmap_and_grad():
    x = jnp.stack([jnp.ones(3), jnp.array([1.0, np.inf, 2.0])])
    f = eqx.filter_jit(jax.vmap(lambda y: mfattn.check_finite(y, "y")))
    with pytest.raises(RuntimeError, match="`y` contains inf"):
        f(x)
    # transparent to differentiation: d/dy sum(check(y)^2) = 2 y
    y = jnp.array([0.5, -2.0, 3.0])
    g = jax.grad(lambda y: jnp.sum(mfattn.check_finite(y, "y") ** 2))(y)
    np.testing.assert_array_equal(g, 2 * y)
    gj = jax.jit(jax.grad(lambda y: jnp.sum(mfattn.check_finite(y, "y") ** 2)))(y)
    np.testing.assert_array_equal(gj, 2 * y)


def test_check_finite_args_one_check_for_several_arguments():
    """What the solvers call: several named arguments, one runtime check."""
    p, z = _params(), jnp.asarray(_points()[:2])
    out = check_finite_args(params=p, test_points=z, test_labels=None)
    assert out[0] is p and out[1] is z and out[2] is None
    f = eqx.filter_jit(lambda p, z: check_finite_args(params=p, test_points=z))
    with pytest.raises(RuntimeError, match="`test_points` contains inf"):
        f(p, z.at[1, 1].set(np.inf))
    with pytest.raises(RuntimeError, match="`params.Q` contains NaN"):
        f(_params(np.nan, "Q"), z.at[1, 1].set(np.inf))
    jaxpr = jax.make_jaxpr(lambda p, z: check_finite_args(params=p, test_points=z))(p, z)
    assert str(jaxpr).count("cond[") == 1


# ---------------------------------------------------------------- measures
@pytest.mark.parametrize("value", BAD)
def test_points_nonfinite(value):
    with pytest.raises(ValueError, match=rf"`points` has non-finite values: 1 {_kind(value)}"):
        mfattn.EmpiricalMeasure(_points(value))
    f = eqx.filter_jit(lambda x: mfattn.EmpiricalMeasure(x).points)
    with pytest.raises(RuntimeError, match=f"`points` contains {_kind(value)}"):
        f(_points(value))
    # a batch of measures built under vmap
    batch = np.stack([_points(), _points(value)])
    with pytest.raises(RuntimeError, match="`points` contains"):
        eqx.filter_jit(jax.vmap(lambda x: mfattn.EmpiricalMeasure(x).points))(batch)


@pytest.mark.parametrize("value", BAD)
def test_weights_nonfinite(value):
    w = np.full(N, 1.0 / N)
    w[3] = value
    with pytest.raises(ValueError, match="`weights` has non-finite values"):
        mfattn.EmpiricalMeasure(_points(), w)
    f = eqx.filter_jit(lambda x, w: mfattn.EmpiricalMeasure(x, w).weights)
    with pytest.raises(RuntimeError, match=f"`weights` contains {_kind(value)}"):
        f(_points(), w)


# ------------------------------------------------------------------ losses
@pytest.mark.parametrize("value", BAD)
def test_targets_and_labels_nonfinite(value):
    with pytest.raises(ValueError, match="`targets` has non-finite values"):
        mfattn.DenoisingLoss(_points(value))
    f = eqx.filter_jit(lambda y: mfattn.DenoisingLoss(y).targets)
    with pytest.raises(RuntimeError, match=f"`targets` contains {_kind(value)}"):
        f(_points(value))
    measure, loss = _problem()
    labels = _points(value, at=(1, 0))[:2]
    with pytest.raises(ValueError, match="`labels` has non-finite values"):
        loss.lions_derivative(measure, _points()[:2], labels)


@pytest.mark.parametrize("value", BAD)
def test_test_labels_nonfinite_in_solve_discrete(value):
    """Labels reach the loss inside the jitted solve: the check there fires."""
    measure, loss = _problem()
    z = _points()[:2]
    with pytest.raises(RAISES, match="labels` contains"):
        mfattn.solve_discrete(
            _params(), measure, loss, 1.0, test_points=z, test_labels=_points(value, at=(1, 0))[:2]
        )


@pytest.mark.parametrize("value", [*BAD, pytest.param(-1.0, id="negative")])
def test_mmd_bandwidth_and_target(value):
    target = mfattn.EmpiricalMeasure(_points())
    with pytest.raises(ValueError, match="`bandwidth` must be a positive finite number"):
        mfattn.MMDLoss(target, value)
    f = eqx.filter_jit(lambda b: mfattn.MMDLoss(target, b).bandwidth)
    expected = "must be positive" if value < 0 else "must be finite"
    with pytest.raises(RuntimeError, match=f"`bandwidth` {expected}"):
        f(jnp.asarray(value))
    if not np.isfinite(value):
        with pytest.raises(ValueError, match="`points` has non-finite values"):
            mfattn.MMDLoss(mfattn.EmpiricalMeasure(_points(value)), 1.0)


# -------------------------------------------------------------------- beta
@pytest.mark.parametrize("value", [*BAD, pytest.param(0.0, id="zero")])
def test_beta_concrete_and_traced(value):
    measure, loss = _problem()
    with pytest.raises(ValueError, match="`beta` must be a positive finite number"):
        mfattn.solve_discrete(_params(), measure, loss, value)
    # a beta that is an array is traced inside the jitted solver
    expected = "must be finite" if not np.isfinite(value) else "must be positive"
    with pytest.raises(RuntimeError, match=f"`beta` {expected}"):
        mfattn.solve_discrete(_params(), measure, loss, jnp.asarray(value))
    # and a good traced beta passes
    sol = mfattn.solve_discrete(_params(), measure, loss, jnp.asarray(0.7))
    assert np.isfinite(float(sol.loss))


# ----------------------------------------------------- the lead's solvers
@pytest.mark.parametrize("value", BAD)
def test_solve_discrete_params_nonfinite(value):
    measure, loss = _problem()
    with pytest.raises(RAISES, match=r"`params\.K` (has non-finite|contains)"):
        mfattn.solve_discrete(_params(value, "K"), measure, loss, 1.0)


@pytest.mark.parametrize("value", BAD)
def test_discrete_loss_params_nonfinite(value):
    measure, loss = _problem()
    with pytest.raises(RAISES, match=r"`params\.Q` (has non-finite|contains)"):
        mfattn.discrete_loss(_params(value, "Q"), measure, loss, 1.0)


@pytest.mark.parametrize("value", BAD)
def test_solve_discrete_test_points_nonfinite(value):
    measure, loss = _problem()
    z, labels = _points(value, at=(1, 0))[:2], _points()[:2]
    with pytest.raises(RAISES, match=r"`test_points` (has non-finite|contains)"):
        mfattn.solve_discrete(_params(), measure, loss, 1.0, test_points=z, test_labels=labels)


def test_solve_limit_max_steps_names_the_solve():
    measure, loss = _problem()
    with pytest.raises(RuntimeError, match=r"solve_limit[^\n]*maximum number of solver steps"):
        mfattn.solve_limit(_params(), measure, loss, 1.0, max_steps=2)


@pytest.mark.slow
def test_limit_gradient_max_steps_names_the_solve():
    measure, loss = _problem()
    with pytest.raises(RuntimeError, match=r"limit_gradient[^\n]*maximum number of solver steps"):
        mfattn.limit_gradient(_params(), measure, loss, 1.0, max_steps=2)


def test_check_solve_names_a_failed_diffrax_solve():
    """The helper the limit solvers use: Diffrax's result code, with the solve's name."""

    def solve(max_steps):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: -y),
            diffrax.Euler(),
            0.0,
            1.0,
            0.1,
            jnp.ones(2),
            max_steps=max_steps,
            throw=False,
        )
        return check_solve(sol, "the test solve").ys

    f = eqx.filter_jit(solve)
    np.testing.assert_allclose(f(16)[-1], 0.9**10 * np.ones(2), rtol=1e-12)
    with pytest.raises(RuntimeError, match=r"the test solve failed: The maximum number of solver"):
        f(3)


# --------------------------------------------------------------- training
TASK = mfattn.DenoisingTask(dim=D, num_tokens=6, num_clusters=2)


class _Quadratic(mfattn.AbstractModel):
    """A model whose loss is |theta|^2 / 2 on any data, so the gradient map is
    `theta` and SGD with rate `lr` gives `theta_k = (1 - lr)^k theta_0`: every
    step of a run is known in closed form."""

    params: mfattn.AttentionParams
    beta: float = eqx.field(static=True, default=1.0)
    fail_below: float | None = eqx.field(static=True, default=None)
    # what every model now declares (the field's configuration), unused here
    kernel: None = None
    chunk_size: None = eqx.field(static=True, default=None)
    mesh: None = eqx.field(static=True, default=None)
    geometry: object = None

    def solve(self, measure, loss, *, test_points=None, test_labels=None):
        del loss, test_points, test_labels
        x = measure.points
        value = 0.5 * sum(jnp.sum(a**2) for a in jax.tree.leaves(self.params))
        if self.fail_below is not None:  # a solver's own runtime check
            value = eqx.error_if(value, value < self.fail_below, "the solve failed")
        return mfattn.Solution(
            ts=jnp.zeros(1), xs=x[None], ps=x[None], grads=self.params, loss=value
        )

    def __call__(self, measure, *, test_points=None):
        del test_points
        return mfattn.Solution(ts=jnp.zeros(1), xs=measure.points[None])


def _nan_update_at(count, field):
    """An optimiser stage that makes the update of `field` NaN at step `count + 1`."""

    def init(params):
        del params
        return jnp.zeros((), jnp.int32)

    def update(updates, state, params=None):
        del params
        bad = jnp.where(state == count, jnp.nan, getattr(updates, field))
        return eqx.tree_at(lambda u: getattr(u, field), updates, bad), state + 1

    return optax.GradientTransformation(init, update)


def test_diverging_run_exact_step_checkpoint_kept_and_resume(tmp_path):
    p0 = _params()
    model = _Quadratic(p0)
    kw = dict(batch_size=2, steps_per_call=5, checkpoint_dir=tmp_path, checkpoint_every=5)
    kw["progress"] = False
    diverging = optax.chain(optax.sgd(0.1), _nan_update_at(6, "O"))
    with pytest.raises(mfattn.DivergenceError) as info:
        mfattn.train(model, TASK, diverging, 20, jax.random.key(3), **kw)
    err = info.value
    assert err.step == 7 and err.what == ("params.O",)
    assert "step 7 of 20: non-finite params.O" in str(err) and "ckpt-00000005" in str(err)
    # the chunk holding step 7 was not written: the last finite checkpoint stays
    (kept,) = mfattn.list_checkpoints(tmp_path)
    assert kept.name.startswith("ckpt-00000005-") and err.checkpoint == kept
    # the error carries the last finite state (after step 6) and the history
    # up to the bad step, both as the closed form says
    assert int(err.state.step) == 6
    expected = jax.tree.map(lambda a: 0.9**6 * a, p0)
    assert eqx.tree_equal(err.state.model.params, expected, rtol=1e-13, atol=0)
    sq = sum(float(jnp.sum(a**2)) for a in jax.tree.leaves(p0))
    np.testing.assert_allclose(err.history["loss"], 0.5 * sq * 0.81 ** np.arange(7), rtol=1e-13)
    assert np.isnan(err.history["param_norm"][6]) and np.all(
        np.isfinite(err.history["param_norm"][:6])
    )
    # rerun with a smaller learning rate: it resumes from step 5, not from
    # scratch (0.95^20) nor from the error's state (0.9^6 0.95^14)
    resumed = optax.chain(optax.sgd(0.05), _nan_update_at(-1, "O"))
    kw["allow_optimizer_change"] = True  # another rate: on request only
    with pytest.warns(UserWarning, match="resuming from ckpt-00000005-"):
        res = mfattn.train(model, TASK, resumed, 20, jax.random.key(3), **kw)
    expected = jax.tree.map(lambda a: 0.9**5 * 0.95**15 * a, p0)
    assert eqx.tree_equal(res.model.params, expected, rtol=1e-12, atol=0)
    assert res.history["loss"].shape == (20,)


def test_runtime_check_inside_a_chunk_keeps_checkpoints(tmp_path):
    """A solve whose own runtime check fires at step 8 (its loss, 0.81^7 of the
    first, falls below a threshold): the error is raised as it is, with a note
    naming the chunk's steps, and the checkpoint of step 5 is the newest."""
    p0 = _params()
    first = 0.5 * sum(float(jnp.sum(a**2)) for a in jax.tree.leaves(p0))
    model = _Quadratic(p0, fail_below=first * 0.81**7.5)
    kw = dict(batch_size=2, steps_per_call=5, checkpoint_dir=tmp_path, checkpoint_every=5)
    with pytest.raises(RuntimeError, match="the solve failed") as info:
        mfattn.train(model, TASK, optax.sgd(0.1), 20, jax.random.key(3), progress=False, **kw)
    (kept,) = mfattn.list_checkpoints(tmp_path)
    assert kept.name.startswith("ckpt-00000005-")
    if sys.version_info >= (3, 11):
        (note,) = info.value.__notes__
        assert "raised while running steps 6-10" in note and kept.name in note


def test_overflow_names_loss_and_gradient_norm():
    """A huge rate: theta_k = (1 - lr)^k theta_0 overflows in the squared norm
    first; the step and what went non-finite match a float64 replay."""
    lr = 1e100
    p0 = _params()
    with pytest.raises(mfattn.DivergenceError) as info:
        mfattn.train(
            _Quadratic(p0),
            TASK,
            optax.sgd(lr),
            10,
            jax.random.key(0),
            batch_size=1,
            steps_per_call=10,
            progress=False,
        )
    leaves = [np.asarray(a) for a in jax.tree.leaves(p0)]
    found = None
    with np.errstate(over="ignore", invalid="ignore"):
        for step in range(1, 11):
            loss = 0.5 * sum(np.sum(a**2) for a in leaves)
            gnorm = np.sqrt(sum(np.sum(a**2) for a in leaves))
            leaves = [a - lr * a for a in leaves]
            what = [n for n, v in [("loss", loss), ("gradient norm", gnorm)] if not np.isfinite(v)]
            what += [f"params.{n}" for n, a in zip("QKVO", leaves) if not np.all(np.isfinite(a))]
            if what:
                found = (step, tuple(what))
                break
    assert (info.value.step, info.value.what) == found
    assert "loss" in found[1]  # the replay's case is the one this test is about


def test_nonfinite_initial_params_and_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="`model.params.Q` has non-finite"):
        mfattn.train(
            _Quadratic(_params(np.nan, "Q")),
            TASK,
            optax.sgd(0.1),
            5,
            jax.random.key(0),
            progress=False,
        )
    state = {"params": _params(np.inf, "V"), "step": jnp.asarray(3)}
    with pytest.raises(
        ValueError,
        match=r"refusing to write checkpoint 3: non-finite values in state\['params'\].V",
    ):
        mfattn.save_checkpoint(tmp_path, 3, state)
    assert mfattn.list_checkpoints(tmp_path) == []
    # an older file written anyway is skipped on resume, with a warning naming it
    good = {"params": _params(), "step": jnp.asarray(2)}
    mfattn.save_checkpoint(tmp_path, 2, good)
    mfattn.save_checkpoint(tmp_path, 3, state, allow_nonfinite=True)
    with pytest.raises(mfattn.CheckpointError, match="ckpt-00000003.eqx holds non-finite values"):
        mfattn.load_checkpoint(tmp_path / "ckpt-00000003.json", good)
    with pytest.warns(UserWarning, match="skipping bad checkpoint.*non-finite"):
        step, loaded, _ = mfattn.load_latest(tmp_path, good)
    assert step == 2 and eqx.tree_equal(loaded, good)


@pytest.mark.slow
def test_learning_rate_divergence_of_the_transformer_resumes(tmp_path):
    """The real model: a rate that jumps to 1e5 after 6 steps makes the run
    diverge; the checkpoint at step 5 survives, and a rerun with a smaller
    rate resumes from it and finishes finite."""
    params = mfattn.AttentionParams.xavier_uniform(jax.random.key(0), 2, 2, D, 2)
    model = mfattn.DiscreteTransformer(params, 1.0)
    kw = dict(batch_size=2, steps_per_call=5, checkpoint_dir=tmp_path, checkpoint_every=5)
    kw["progress"] = False
    jump = optax.sgd(lambda count: jnp.where(count < 6, 1e-2, 1e5))
    with pytest.raises(mfattn.DivergenceError) as info:
        mfattn.train(model, TASK, jump, 10, jax.random.key(1), **kw)
    err = info.value
    assert 7 <= err.step <= 10 and err.what
    (kept,) = mfattn.list_checkpoints(tmp_path)
    assert kept.name.startswith("ckpt-00000005-")
    h = err.history
    assert len(h["loss"]) == err.step
    for name in ("loss", "grad_norm", "param_norm"):
        assert np.all(np.isfinite(h[name][: err.step - 1]))
    # what is named is what the history shows at that step
    if "loss" in err.what:
        assert not np.isfinite(h["loss"][-1])
    if "gradient norm" in err.what:
        assert not np.isfinite(h["grad_norm"][-1])
    if any(w.startswith("params.") for w in err.what):
        assert not np.isfinite(h["param_norm"][-1])
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(err.state.model.params))
    smaller = optax.sgd(lambda count: 5e-3)
    with pytest.warns(UserWarning, match="resuming from ckpt-00000005-"):
        res = mfattn.train(
            model, TASK, smaller, 10, jax.random.key(1), allow_optimizer_change=True, **kw
        )
    # resumed: the first five losses are the diverged run's (a restart at the
    # smaller rate would differ from step 2 on), the rest finite
    np.testing.assert_array_equal(res.history["loss"][:5], h["loss"][:5])
    np.testing.assert_allclose(res.history["loss"][5], h["loss"][5], rtol=1e-12)
    assert np.all(np.isfinite(res.history["loss"])) and int(res.state.step) == 10


# ---------------------------------------------------------------- switch
def test_switch_turns_value_checks_off_and_back_on():
    assert mfattn.checks_enabled()
    f = eqx.filter_jit(lambda x: mfattn.EmpiricalMeasure(x).points)
    with pytest.raises(RuntimeError, match="`points` contains NaN"):
        f(_points(np.nan))
    with mfattn.set_checks(False):
        assert not mfattn.checks_enabled()
        assert np.isnan(mfattn.EmpiricalMeasure(_points(np.nan)).points[2, 1])
        assert np.isnan(mfattn.check_finite(jnp.array(np.nan), "x"))
        # the compiled function is traced again without the check
        assert np.isnan(f(_points(np.nan))[2, 1])
        w = np.full(N, 1.0)  # the weight checks are value checks too
        mfattn.EmpiricalMeasure(_points(), w)
        # Python-number checks cost nothing and stay on
        with pytest.raises(ValueError, match="`beta`"):
            mfattn.AttentionField(float("nan"))
    assert mfattn.checks_enabled()
    with pytest.raises(RuntimeError, match="`points` contains NaN"):
        f(_points(np.nan))
    # as a plain call
    mfattn.set_checks(False)
    try:
        assert not mfattn.checks_enabled()
    finally:
        mfattn.set_checks(True)
    with pytest.raises(TypeError, match="enabled"):
        mfattn.set_checks("no")


def test_environment_variable_sets_the_default():
    code = (
        "import numpy as np, mfattn; x = np.ones((2, 2)); x[0, 0] = np.nan; "
        "mfattn.EmpiricalMeasure(x); print(mfattn.checks_enabled())"
    )
    env = dict(os.environ, MFATTN_CHECKS="0", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
