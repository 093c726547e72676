"""Every public entry point that takes arrays checks their values where they
enter (at once when concrete, by `eqx.error_if` under `jit`/`vmap`), naming the
argument and saying NaN or inf; zero sizes, non-positive steps and a state that
becomes non-finite raise naming what is wrong, not the solver's step count.
Tiny sizes: these tests check errors, not numbers."""

import re

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mfattn
from mfattn._discrete import check_model_inputs

# a concrete value raises a ValueError at once; inside jit an EquinoxRuntimeError
RAISES = (ValueError, RuntimeError)
N, D, K, L, H = 4, 3, 2, 2, 2
KEY = jax.random.key(0)


def _x():
    return np.array(jax.random.normal(jax.random.key(1), (N, D)))


def _params(L=L, H=H):
    return mfattn.AttentionParams.xavier_uniform(jax.random.key(2), L, H, D, K)


def _layer(H=H):
    return jax.tree.map(lambda a: a[0], _params(1, H))


def _set(tree, value, field="Q"):
    return eqx.tree_at(lambda q: getattr(q, field), tree, getattr(tree, field).at[0].set(value))


def _problem():
    x = _x()
    return mfattn.EmpiricalMeasure(x), mfattn.DenoisingLoss(0.5 * x)


def _raises(match, kinds=RAISES):
    return pytest.raises(kinds, match=match)


# ------------------------------------------------------------- the helper
def test_nan_under_vmap_is_reported_as_nan():
    """The index of `eqx.branched_error_if` is the batch maximum under vmap:
    a finite batch element must not turn another one's NaN into "inf"."""
    f = eqx.filter_jit(jax.vmap(lambda y: mfattn.check_finite(y, "y")))
    for bad in (0, 1):
        x = jnp.ones((2, 3)).at[bad, 1].set(jnp.nan)
        with _raises("`y` contains NaN", RuntimeError):
            f(x)
        with _raises("`y` contains inf", RuntimeError):
            f(jnp.ones((2, 3)).at[bad, 1].set(jnp.inf))
    # two leaves, NaN in one batch element and inf in the other: a true statement
    g = eqx.filter_jit(jax.vmap(lambda a, b: mfattn.check_finite((a, b), "t")))
    a = jnp.ones((2, 3)).at[0, 0].set(jnp.nan)
    b = jnp.ones((2, 3)).at[1, 0].set(jnp.inf)
    with _raises(r"`t\[0\]` contains NaN|`t\[1\]` contains inf", RuntimeError):
        g(a, b)
    np.testing.assert_array_equal(f(jnp.ones((2, 3))), jnp.ones((2, 3)))


# ------------------------------------------------------------------ solve_sde
@pytest.mark.parametrize(
    "value", [np.nan, pytest.param(np.inf, marks=pytest.mark.slow)], ids=["nan", "inf"]
)
def test_solve_sde_checks_features_drift_test_points_tangent(value):
    measure, _ = _problem()
    f = _layer()
    kind = "NaN" if np.isnan(value) else "inf"
    with _raises(f"`features.Q` contains {kind}"):
        mfattn.solve_sde(_set(f, value), measure, 1.0, KEY)
    drift = _set(_params(), value, "V")
    with _raises(rf"`drift.params.V` contains {kind}"):
        mfattn.solve_sde(f, measure, 1.0, KEY, drift=drift)
    z = np.zeros((2, D))
    z[1, 2] = value
    with _raises(f"`test_points` contains {kind}"):
        mfattn.solve_sde(f, measure, 1.0, KEY, test_points=z)
    with _raises(f"`tangent` contains {kind}"):
        mfattn.solve_sde(f, measure, 1.0, KEY, tangent=np.full((N, D), value))


def test_solve_sde_rejects_zero_tangent_brownian_tol_and_steps():
    measure, _ = _problem()
    f = _layer()
    with _raises("`tangent` is zero"):
        mfattn.solve_sde(f, measure, 1.0, KEY, tangent=np.zeros((N, D)), ts=jnp.array([0.0, 0.5]))
    for tol in (0.0, -1e-3, np.nan):
        with _raises("`brownian_tol` must be a positive finite number", ValueError):
            mfattn.solve_sde(f, measure, 1.0, KEY, brownian_tol=tol)
    with _raises("`dt0` must be a positive finite step", ValueError):
        mfattn.solve_sde(f, measure, 1.0, KEY, dt0=0.0)
    with _raises("`max_steps` must be a positive int", ValueError):
        mfattn.solve_sde(f, measure, 1.0, KEY, max_steps=0)
    # (the suite's jaxtyping checks name the parameter first; without them, mfattn does)
    with _raises("`solver` must be a diffrax solver|parameter 'solver'", TypeError):
        mfattn.solve_sde(f, measure, 1.0, KEY, solver=None)
    with _raises("`features` has M features = 0", ValueError):
        mfattn.solve_sde(jax.tree.map(lambda a: a[:0], f), measure, 1.0, KEY)
    # a good tangent still gives finite exponents
    sol = mfattn.solve_sde(f, measure, 1.0, KEY, tangent=np.ones((N, D)), dt0=0.25)
    assert np.all(np.isfinite(sol.log_tangent))


def test_noise_covariance_checks_points_and_features():
    measure, _ = _problem()
    f = _layer()
    with _raises("`x` contains NaN"):
        mfattn.noise_covariance(f, measure, 1.0, np.full((2, D), np.nan))
    with _raises("`y` contains inf"):
        mfattn.noise_covariance(f, measure, 1.0, np.zeros((2, D)), np.full((1, D), np.inf))
    with _raises("`features.K` contains NaN"):
        mfattn.noise_covariance(_set(f, np.nan, "K"), measure, 1.0, np.zeros((2, D)))


# ---------------------------------------------------- probes, tangent kernel
def test_probes_and_tangent_kernel_check_probes_and_params():
    measure, _ = _problem()
    model = mfattn.DiscreteTransformer(_params(), 1.0)
    z = np.zeros((2, D))
    bad = z.copy()
    bad[0, 1] = np.nan
    with _raises("`probes` contains NaN"):
        mfattn.probe_outputs(model, measure, bad)
    with _raises("`probes` contains inf"):
        mfattn.probe_gradient(model, measure, np.full((2, D), np.inf), np.ones((2, D)))
    nan_model = mfattn.DiscreteTransformer(_set(_params(), np.nan, "O"), 1.0)
    with _raises("`params.O` contains NaN"):
        mfattn.probe_outputs(nan_model, measure, z)
    batch = jax.vmap(mfattn.EmpiricalMeasure)(np.stack([_x(), _x()[::-1]]))
    with _raises("`probes` contains NaN"):
        mfattn.tangent_kernel(model, batch, jnp.asarray(bad))


# ------------------------------------------------------------------ clusters
def test_cluster_functions_check_points_and_weights():
    x = _x()
    bad = x.copy()
    bad[2, 0] = np.nan
    with _raises("`points` has non-finite values: 1 NaN"):
        mfattn.count_clusters(bad, tol=0.1)
    with _raises("`points` has non-finite values: 1 NaN"):
        mfattn.diameter(bad)
    with _raises("`points` has non-finite values: 1 NaN"):
        mfattn.cluster_labels(bad, tol=0.1)
    with _raises("`xs` has non-finite values: 1 NaN"):
        mfattn.time_to_one_cluster([0.0, 1.0], np.stack([x, bad]), tol=0.1)
    with _raises("`ts` has non-finite values: 1 inf"):
        mfattn.time_to_one_cluster([0.0, np.inf], np.stack([x, x]), tol=0.1)
    w = np.array([0.5, 0.5, 0.5, -0.5])
    with _raises("`weights` must be non-negative", ValueError):
        mfattn.count_clusters(x, tol=0.1, weights=w)
    with _raises("`weights` must be non-negative", RuntimeError):
        jax.jit(lambda w: mfattn.count_clusters(x, tol=0.1, weights=w))(w)
    with _raises("`points` contains NaN", RuntimeError):
        jax.jit(lambda p: mfattn.diameter(p))(bad)
    assert int(mfattn.count_clusters(x, tol=1e-9)) == N


# ------------------------------------------------------------------- times=
SLOW = pytest.mark.slow
BAD_GRIDS = [
    pytest.param([0.0, 0.7, 0.7, 1.0], "strictly increasing", id="repeated", marks=SLOW),
    # each grid compiles four solves: the other rules in the slow run
    pytest.param([0.0, 0.8, 0.5, 1.0], "strictly increasing", id="decreasing", marks=SLOW),
    pytest.param([0.1, 0.3, 0.6, 1.0], "start at 0", id="not-at-0", marks=SLOW),
    pytest.param([0.0, 0.3, 0.6, 0.9], "end at 1", id="not-at-1", marks=SLOW),
    pytest.param([0.0, np.nan, 0.6, 1.0], "NaN", id="nan"),
]


@pytest.mark.parametrize("times, words", BAD_GRIDS)
def test_times_validated_as_param_path_does(times, words):
    measure, loss = _problem()
    grid = _params(4, H)
    times = np.array(times)
    with _raises(words, ValueError):
        mfattn.ParamPath(grid, times)
    match = rf"`times`.*{words}|{words}.*`times`|`times` (has non-finite|contains) NaN"
    with _raises(match):
        mfattn.solve_limit(grid, measure, loss, 1.0, times=times)
    with _raises(match):
        mfattn.limit_gradient(grid, measure, loss, 1.0, times=jnp.asarray(times))
    model = mfattn.MeanFieldTransformer(grid, 1.0, times=times)
    with _raises(match):
        model.solve(measure, loss)
    with _raises(match):
        model(measure)


# ----------------------------------------------------------- solve_discrete
def test_solve_discrete_raises_when_states_become_nonfinite():
    measure, loss = _problem()
    big = mfattn.EmpiricalMeasure(_x() * 1e200)  # float64: 1e20 in float32
    with _raises("solve_discrete's forward pass produced (NaN|inf)", RuntimeError):
        mfattn.solve_discrete(_params(), big, loss, 1.0)
    with _raises("solve_discrete's forward pass produced (NaN|inf)", RuntimeError):
        mfattn.solve_discrete(_params(), big, None, 1.0)
    # float32 tokens times 1e20: the attention logits overflow
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), _params())
    m32 = mfattn.EmpiricalMeasure((_x() * 1e20).astype(np.float32))
    with _raises("solve_discrete's forward pass produced (NaN|inf)", RuntimeError):
        mfattn.solve_discrete(p32, m32, loss, 1.0)
    sol = mfattn.solve_discrete(_params(), measure, loss, 1.0)
    assert np.isfinite(float(sol.loss))


def test_solve_discrete_beta_overflow_and_denormal():
    measure, loss = _problem()
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), _params())
    m32 = mfattn.EmpiricalMeasure(_x().astype(np.float32))
    with _raises("`beta` = 1e\\+39 overflows float32", ValueError):
        mfattn.solve_discrete(p32, m32, loss, 1e39)
    with _raises("`beta` overflows float32", RuntimeError):
        mfattn.solve_discrete(p32, m32, loss, jnp.asarray(1e39))
    with _raises("`beta` = 5e-324 is below the smallest normal", ValueError):
        mfattn.solve_discrete(_params(), measure, loss, 5e-324)
    with _raises("`beta` = 1e-45 is below the smallest normal float32", ValueError):
        mfattn.solve_discrete(p32, m32, loss, 1e-45)
    with _raises("`beta` is below the smallest normal float64", RuntimeError):
        mfattn.solve_discrete(_params(), measure, loss, jnp.asarray(5e-324))
    with _raises("`beta` = 1e\\+39 overflows float32", ValueError):
        mfattn.solve_limit(p32, m32, loss, 1e39)


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["discrete", "limit"])
def test_zero_token_on_the_sphere(solver):
    x = _x()
    x[1] = 0.0
    measure, loss = mfattn.EmpiricalMeasure(x), mfattn.DenoisingLoss(_x())
    solve = mfattn.solve_discrete if solver == "discrete" else mfattn.solve_limit
    with _raises(r"`measure.points` has a zero row.*unit sphere"):
        solve(_params(), measure, loss, 1.0, geometry=mfattn.Sphere())
    z = np.zeros((1, D))
    with _raises(r"`test_points` has a zero row"):
        solve(_params(), _problem()[0], loss, 1.0, z, test_labels=z, geometry=mfattn.Sphere())
    with _raises(r"`measure.points` has a zero row.*unit sphere", ValueError):
        mfattn.attention_flow(_layer(), measure, 1.0, [0.0, 1.0], geometry=mfattn.Sphere())


@pytest.mark.parametrize("field, axis", [("L", 0), ("H", 1)])
def test_zero_sizes_rejected_naming_the_size(field, axis):
    measure, loss = _problem()
    empty = jax.tree.map(lambda a: jnp.take(a, jnp.arange(0), axis=axis), _params())
    match = rf"`params` has {field} .*= 0"
    with _raises(match, ValueError):
        mfattn.solve_discrete(empty, measure, loss, 1.0)
    with _raises(match, ValueError):
        mfattn.solve_limit(empty, measure, loss, 1.0)  # M = 0 particles
    if field == "H":
        with _raises(r"`params` has H \(heads\) = 0", ValueError):
            mfattn.attention_flow(jax.tree.map(lambda a: a[0], empty), measure, 1.0, [0.0, 1.0])


def test_zero_tokens_rejected():
    _, loss = _problem()
    measure = eqx.tree_at(
        lambda m: (m.points, m.weights), _problem()[0], (jnp.zeros((0, D)), jnp.zeros(0))
    )
    with _raises(r"`measure.points` has n tokens = 0", ValueError):
        mfattn.solve_discrete(_params(), measure, None, 1.0)


# -------------------------------------------- misleading errors of the solvers
def test_limit_failures_name_the_value_not_the_step_count():
    measure, loss = _problem()
    nan_layer = _set(_layer(), np.nan, "K")
    with _raises(r"`params.K` (has non-finite values|contains NaN)"):
        mfattn.attention_flow(nan_layer, measure, 1.0, [0.0, 1.0])
    with _raises(r"`params.K` contains NaN", RuntimeError):
        eqx.filter_jit(mfattn.attention_flow)(nan_layer, measure, 1.0, jnp.array([0.0, 1.0]))
    for name in ("rtol", "atol"):
        with _raises(rf"`{name}` must be a non-negative finite number", ValueError):
            mfattn.solve_limit(_params(), measure, loss, 1.0, **{name: np.nan})
        with _raises(rf"`{name}` must be a non-negative finite number", ValueError):
            mfattn.attention_flow(_layer(), measure, 1.0, [0.0, 1.0], **{name: np.nan})
    with _raises("`ts` has non-finite values: 1 NaN"):
        mfattn.attention_flow(_layer(), measure, 1.0, [0.0, np.nan])
    with _raises(r"`params.Q` contains NaN", RuntimeError):
        mfattn.solve_limit(_set(_params(), np.nan), measure, loss, 1.0)


def test_steps_and_sizes_of_the_options():
    measure, loss = _problem()
    euler = diffrax.Euler()
    with _raises("`dt0` must be a positive finite step", ValueError):
        mfattn.solve_limit(_params(), measure, loss, 1.0, solver=euler, dt0=0.0)
    with _raises("`max_steps` must be a positive int", ValueError):
        mfattn.solve_limit(_params(), measure, loss, 1.0, max_steps=0)
    with _raises("`max_steps` must be a positive int", ValueError):
        mfattn.attention_flow(_layer(), measure, 1.0, [0.0, 1.0], max_steps=0)
    with _raises("`dt0` must be a positive finite step", ValueError):
        mfattn.MeanFieldTransformer(_params(), 1.0, dt0=0.0)


def test_labels_of_the_wrong_shape_named():
    measure, loss = _problem()
    z = _x()[:2]
    # (the suite's jaxtyping checks of the public signature fire first: the
    # shared input check underneath is what users without them get)
    with _raises("`test_labels` has 3 rows but `test_points` has 2", ValueError):
        check_model_inputs(_params(), measure, loss, z, np.zeros((3, D)))
    with _raises("test_labels", (ValueError, TypeError)):
        mfattn.solve_discrete(_params(), measure, loss, 1.0, z, test_labels=np.zeros((3, D)))
    with _raises("`targets` has shape", ValueError):
        mfattn.solve_discrete(_params(), measure, mfattn.DenoisingLoss(np.zeros((3, D))), 1.0)


def test_train_names_an_optimizer_that_is_not_one():
    model = mfattn.DiscreteTransformer(_params(), 1.0)

    def sampler(key, b):  # never reached
        raise AssertionError

    # past the suite's jaxtyping check of the signature (which names it too)
    train = getattr(mfattn.train, "__wrapped__", mfattn.train)
    with _raises("`optimizer` must be an optax.GradientTransformation", TypeError):
        train(model, sampler, 0.1, num_steps=1, key=KEY)
    assert isinstance(optax.sgd(0.1), optax.GradientTransformation)


# ----------------------------------------------------------------- weights
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("n", [3, 7, 100])
def test_low_precision_weights_that_sum_to_one_in_their_dtype(dtype, n):
    x = jnp.ones((n, 2), dtype)
    mfattn.EmpiricalMeasure(x, jnp.full((n,), 1 / n, dtype))
    w = jax.random.uniform(jax.random.key(3), (n,)).astype(dtype)
    mfattn.EmpiricalMeasure(x, w / w.sum())  # the suggested fix works
    mfattn.EmpiricalMeasure(x.astype(jnp.float32), jnp.full((n,), 1 / n, dtype))
    with _raises("`weights` must sum to 1", ValueError):
        mfattn.EmpiricalMeasure(x, jnp.full((n,), 1.2 / n, dtype))
    with _raises("`weights` must sum to 1", RuntimeError):
        eqx.filter_jit(lambda w: mfattn.EmpiricalMeasure(x, w).weights)(
            jnp.full((n,), 1.2 / n, dtype)
        )


def test_float64_weights_keep_a_tight_tolerance():
    x = np.ones((4, 2))
    with _raises(re.escape("`weights` must sum to 1 (within 1e-06"), ValueError):
        mfattn.EmpiricalMeasure(x, np.full(4, 0.25 + 1e-6))
