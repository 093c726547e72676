"""The composable API: models that own their configuration (`beta` an array
leaf, callable forward passes), typed strategies, Diffrax's options on the
limit, one integrator behind the discrete model and the limit's Euler steps."""

import warnings

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import rel_err, tree_rel_err
from helpers import random_loss, random_measure, random_params, tree_allclose

import mfattn


def _case(getkey, L=4, H=3, n=5, d=3, k=2):
    params = random_params(getkey(), L, H, d, k)
    measure = random_measure(getkey(), n, d)
    loss = random_loss(getkey(), "mmd", measure)
    return params, measure, loss


# ---------------------------------------------------------------- beta is a leaf
def test_beta_is_an_array_leaf_vmap_grad_no_recompile(getkey):
    params, measure, loss = _case(getkey)
    model = mfattn.DiscreteTransformer(params, 1.0)
    assert isinstance(model.beta, jax.Array)
    assert any(leaf is model.beta for leaf in jax.tree.leaves(model))

    # vmap over beta: no "static" warning, and the values of separate calls
    betas = jnp.array([0.5, 1.0, 2.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xs = jax.vmap(lambda b: mfattn.DiscreteTransformer(params, b)(measure).xs)(betas)
    for b, x in zip(betas, xs):
        ref = mfattn.solve_discrete(params, measure, None, float(b)).xs
        assert rel_err(x, ref) < 1e-12

    # one trace for every value of beta
    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def loss_of(m):
        return m.solve(measure, loss).loss

    values = [loss_of(mfattn.DiscreteTransformer(params, b)) for b in (0.5, 1.0, 2.0)]
    assert len({float(v) for v in values}) == 3

    # the gradient tree holds d loss / d beta, checked by a central difference
    g = eqx.filter_grad(lambda m: m.solve(measure, loss).loss)(model)
    eps = 1e-6
    fd = (
        mfattn.solve_discrete(params, measure, loss, 1.0 + eps).loss
        - mfattn.solve_discrete(params, measure, loss, 1.0 - eps).loss
    ) / (2 * eps)
    assert abs(float(g.beta) - float(fd)) < 1e-7 * max(1.0, abs(float(fd)))


def test_bad_beta_names_the_argument(getkey):
    params, _, _ = _case(getkey)
    with pytest.raises(ValueError, match="beta"):
        mfattn.DiscreteTransformer(params, -1.0)
    with pytest.raises(ValueError, match="beta"):
        mfattn.MeanFieldTransformer(params, float("nan"))


# ------------------------------------------------------------ forward-only passes
def test_models_are_callable_forward_only(getkey):
    params, measure, loss = _case(getkey)
    z = jax.random.normal(getkey(), (2, 3))
    model = mfattn.DiscreteTransformer(params, 1.3)
    fwd = model(measure, test_points=z)
    full = model.solve(measure, loss, test_points=z)
    assert fwd.ps is None and fwd.grads is None and fwd.loss is None
    assert rel_err(fwd.xs, full.xs) < 1e-13 and rel_err(fwd.test_xs, full.test_xs) < 1e-13

    limit = mfattn.MeanFieldTransformer(params, 1.3, rtol=1e-9, atol=1e-11)
    lfwd = limit(measure)
    lfull = limit.solve(measure, loss)
    assert lfwd.ps is None and lfwd.test_xs is None
    assert lfwd.xs.shape == lfull.xs.shape
    assert rel_err(lfwd.xs, lfull.xs) < 1e-7


def test_forward_only_kernel_in_forward_paths(getkey):
    """A kernel with a forward pass only runs every forward-only path."""
    params, measure, loss = _case(getkey, L=1)  # unnormalised attention grows: one layer

    class Unnormalised(mfattn.DenseKernel):
        """Attention divided by n instead of the partition function (forward only)."""

        def forward(self, q, k, v, w, beta, qpos=None, kpos=None):
            e = jnp.exp(beta * jnp.einsum("hmk,hnk->hmn", q, k)) * w[None, None, :]
            return jnp.einsum("hmn,hnk->hmk", e, v), jnp.zeros(q.shape[:-1], q.dtype)

        def backward(self, *args, **kwargs):
            raise NotImplementedError("forward only")

    model = mfattn.DiscreteTransformer(params, 0.7, kernel=Unnormalised())
    xs = model(measure).xs
    # one Euler step by hand
    layer = params.layer(0)
    x = measure.points
    s = 0.7 * jnp.einsum("md,hdk,hek,ne->hmn", x, layer.Q, layer.K, x)
    o = jnp.einsum("hmn,n,nd,hdk->hmk", jnp.exp(s), measure.weights, x, layer.V)
    v = jnp.einsum("hdk,hmk->md", layer.O, o) / params.heads
    assert rel_err(xs[1], x + v / params.depth) < 1e-12
    flow = mfattn.attention_flow(
        layer,
        measure,
        0.7,
        jnp.array([0.0, 0.25]),
        kernel=Unnormalised(),
        solver=diffrax.Euler(),
        dt0=0.25,
    )
    assert rel_err(flow[1], x + 0.25 * v) < 1e-12


# -------------------------------------------------------------- typed strategies
def test_geometry_and_scaling_objects_and_their_old_spellings(getkey):
    params, measure, loss = _case(getkey)
    new = mfattn.solve_discrete(params, measure, loss, 1.0, geometry=mfattn.Sphere())
    with pytest.warns(DeprecationWarning, match="Sphere"):
        old = mfattn.DiscreteTransformer(params, 1.0, normalization="sphere").solve(measure, loss)
    assert tree_allclose(new.grads, old.grads, rtol=1e-12, atol=1e-14)
    assert np.allclose(np.linalg.norm(new.xs[-1], axis=-1), 1.0)
    with pytest.warns(DeprecationWarning, match="InverseSqrtDepth"):
        mfattn.DiscreteTransformer(params, 1.0, residual_scaling="1/sqrt(L)")
    with pytest.raises(ValueError, match="geometry"):
        mfattn.DiscreteTransformer(params, 1.0, geometry="ball")
    with pytest.raises(TypeError, match="geometry"):
        mfattn.solve_discrete(params, measure, loss, 1.0, geometry=mfattn.InverseDepth())
    assert isinstance(mfattn.ClosedFormAdjoint(), mfattn.AbstractLimitAdjoint)
    with pytest.warns(DeprecationWarning, match="PiecewiseConstant"):
        old_path = mfattn.ParamPath(params, interpolation="constant")
    path = mfattn.ParamPath(params, interpolation=mfattn.PiecewiseConstant())
    assert old_path.interpolation == path.interpolation and path.interpolation.name == "constant"
    assert tree_allclose(path(0.3), params.layer(1))  # t in [1/4, 2/4): the second layer
    assert np.allclose(path.basis_integrals(), 0.25)
    hat = mfattn.ParamPath(params)  # piecewise linear on t_j = j / 3
    assert isinstance(hat.interpolation, mfattn.PiecewiseLinear)
    mid = jax.tree.map(lambda a: 0.5 * (a[1] + a[2]), params)
    assert tree_allclose(hat(0.5), mid)
    assert np.allclose(hat.basis(0.5), [0.0, 0.5, 0.5, 0.0])


def test_sphere_with_mlp_and_sqrt_scaling_matches_autodiff(getkey):
    """The one Euler scan composes the geometry with MLP blocks and the
    `1/sqrt(L)` residual (each tested alone elsewhere) exactly."""
    params, measure, loss = _case(getkey)
    mlp = mfattn.MLPParams.init(getkey(), 4, 3, 5, dtype=jnp.float64)
    kw = dict(mlp=mlp, geometry=mfattn.Sphere(), residual_scaling=mfattn.InverseSqrtDepth())
    sol = mfattn.solve_discrete(params, measure, loss, 1.0, **kw)
    f = lambda p, ph, x: mfattn.discrete_loss(
        p, measure.with_points(x), loss, 1.0, **{**kw, "mlp": ph}
    )
    gp, gm, gx = jax.grad(f, argnums=(0, 1, 2))(params, mlp, measure.points)
    h, H = 4**-0.5, params.heads
    assert tree_rel_err(jax.tree.map(lambda g: g * h / H, sol.grads), gp) < 1e-10
    assert tree_rel_err(jax.tree.map(lambda g: g * h, sol.mlp_grads), gm) < 1e-10
    # ps[0] is the tangent part of (1/w) dLoss/dx at unit inputs: compare on the sphere
    x0 = measure.points / jnp.linalg.norm(measure.points, axis=-1, keepdims=True)
    gx0 = jax.grad(lambda x: f(params, mlp, x))(x0)
    ref = mfattn.project_tangent(x0, gx0 / measure.weights[:, None])
    assert rel_err(sol.ps[0], ref) < 1e-10
    del gx


# ---------------------------------------------------- the limit's Diffrax options
@pytest.mark.parametrize("L", [pytest.param(8, marks=pytest.mark.slow), 5])
def test_limit_euler_is_the_discrete_model(getkey, L):
    """`solve_limit` with Euler steps of `1/L` on the piecewise-constant path of
    the `L` layers is `solve_discrete`, forward, adjoint and gradient map."""
    params, measure, loss = _case(getkey, L=L)
    z = jax.random.normal(getkey(), (2, 3))
    disc = mfattn.solve_discrete(params, measure, loss, 1.0, z)
    path = mfattn.ParamPath(params, interpolation=mfattn.PiecewiseConstant())
    if L == 8:  # node times l/8 are exact in floating point
        steps = dict(stepsize_controller=diffrax.ConstantStepSize(), dt0=1 / L)
    else:
        steps = dict(stepsize_controller=diffrax.StepTo(ts=jnp.arange(L + 1) / L), dt0=None)
    lim = mfattn.solve_limit(path, measure, loss, 1.0, z, solver=diffrax.Euler(), **steps)
    assert rel_err(lim.xs, disc.xs) < 1e-13
    assert rel_err(lim.test_xs, disc.test_xs) < 1e-13
    assert abs(float(lim.loss - disc.loss)) < 1e-13
    # the adjoint ODE by Euler is a different scheme (explicit backwards in time):
    # first order in 1/L away from the exact recursion, not to rounding
    assert rel_err(lim.ps, disc.ps) < 5.0 / L


def test_fixed_step_solver_needs_dt0(getkey):
    params, measure, loss = _case(getkey)
    with pytest.raises(ValueError, match="dt0"):
        mfattn.solve_limit(params, measure, loss, 1.0, solver=diffrax.Euler())
    with pytest.raises(ValueError, match="dt0"):
        mfattn.solve_limit(
            params, measure, loss, 1.0, stepsize_controller=diffrax.ConstantStepSize()
        )
    with pytest.raises(ValueError, match="not both"):
        mfattn.solve_limit(
            params,
            measure,
            loss,
            1.0,
            rtol=1e-3,
            stepsize_controller=diffrax.PIDController(1e-3, 1e-3),
        )


@pytest.mark.parametrize(
    "adjoint",
    [
        # slow too: tests/test_limit.py checks jax.grad with this adjoint
        # against the closed-form gradient in the default selection
        pytest.param(diffrax.RecursiveCheckpointAdjoint(), marks=pytest.mark.slow),
        pytest.param(diffrax.DirectAdjoint(), marks=pytest.mark.slow),
        pytest.param(diffrax.BacksolveAdjoint(), marks=pytest.mark.slow),
    ],
    ids=["recursive", "direct", "backsolve"],
)
def test_grad_through_solve_limit_with_every_diffrax_adjoint(getkey, adjoint):
    grid = random_params(getkey(), 3, 4, 3, 2)
    measure = random_measure(getkey(), 5, 3)
    loss = random_loss(getkey(), "denoise", measure)
    tol = dict(rtol=1e-10, atol=1e-12)

    def f(p):
        return mfattn.solve_limit(p, measure, loss, 1.0, adjoint=adjoint, **tol).loss

    g = jax.grad(f)(grid)
    _, lg = mfattn.limit_gradient(grid, measure, loss, 1.0, **tol)
    c = mfattn.ParamPath(grid).basis_integrals()[:, None, None, None]
    ref = jax.tree.map(lambda a: a * c / grid.heads, lg)
    assert tree_rel_err(g, ref) < 1e-6


def test_saveat_and_throw(getkey):
    params, measure, loss = _case(getkey)
    ts = jnp.array([0.0, 0.3, 1.0])
    sol = mfattn.solve_limit(params, measure, loss, 1.0, saveat=diffrax.SaveAt(ts=ts))
    assert sol.xs.shape == (3, 5, 3) and np.allclose(sol.ts, ts)
    failed = mfattn.solve_limit(params, measure, loss, 1.0, max_steps=2, throw=False)
    assert not bool(diffrax.is_okay(failed.result))
    with pytest.raises(Exception, match="maximum number of solver steps"):
        mfattn.solve_limit(params, measure, loss, 1.0, max_steps=2)


@pytest.mark.slow
def test_old_ts_and_progress_meter(getkey):
    params, measure, loss = _case(getkey)
    ts = jnp.array([0.0, 0.3, 1.0])
    sol = mfattn.solve_limit(params, measure, loss, 1.0, saveat=diffrax.SaveAt(ts=ts))
    with pytest.warns(DeprecationWarning, match="saveat"):
        old = mfattn.solve_limit(params, measure, loss, 1.0, ts=ts)
    assert rel_err(old.xs, sol.xs) < 1e-14
    quiet = mfattn.solve_limit(params, measure, loss, 1.0, progress_meter=diffrax.NoProgressMeter())
    assert rel_err(quiet.xs, mfattn.solve_limit(params, measure, loss, 1.0).xs) < 1e-14


@pytest.mark.slow
def test_limit_gradient_strategies_agree(getkey):
    grid = random_params(getkey(), 3, 4, 3, 2)
    measure = random_measure(getkey(), 5, 3)
    loss = random_loss(getkey(), "mmd", measure)
    tol = dict(rtol=1e-10, atol=1e-12)
    v1, g1 = mfattn.limit_gradient(grid, measure, loss, 1.0, **tol)
    v2, g2 = mfattn.limit_gradient(
        grid, measure, loss, 1.0, adjoint=mfattn.DiffraxAdjoint(diffrax.DirectAdjoint()), **tol
    )
    assert abs(float(v1 - v2)) < 1e-10
    assert tree_rel_err(g1, g2) < 1e-6


def test_attention_flow_test_particles_do_not_act(getkey):
    params, measure, _ = _case(getkey)
    layer = params.layer(0)
    ts = jnp.linspace(0.0, 2.0, 4)
    z = jax.random.normal(getkey(), (3, 3))
    alone = mfattn.attention_flow(layer, measure, 1.0, ts)
    sol = mfattn.attention_flow(layer, measure, 1.0, ts, test_points=z)
    assert rel_err(sol.xs, alone) < 1e-7
    assert sol.test_xs.shape == (4, 3, 3)
    # a test particle placed on a token follows it
    on = mfattn.attention_flow(layer, measure, 1.0, ts, test_points=measure.points[:1])
    assert rel_err(on.test_xs[:, 0], on.xs[:, 0]) < 1e-7
    same = mfattn.attention_flow(layer, measure, 1.0, saveat=diffrax.SaveAt(ts=ts))
    assert rel_err(same, alone) == 0.0
    euler = mfattn.attention_flow(layer, measure, 1.0, ts, solver=diffrax.Euler(), dt0=1e-3)
    assert rel_err(euler, alone) < 1e-2


# ------------------------------------------------------------------ custom losses
def test_check_loss(getkey):
    measure = random_measure(getkey(), 6, 3)
    for kind in ("denoise", "mmd"):
        assert mfattn.check_loss(random_loss(getkey(), kind, measure), measure) < 1e-8

    class Wrong(mfattn.AbstractLoss):
        """Forgets the 1/w of the contract."""

        target: jax.Array

        def __call__(self, measure):
            return 0.5 * jnp.sum(measure.weights[:, None] * (measure.points - self.target) ** 2)

        def lions_derivative(self, measure, x=None, labels=None):
            x = measure.points if x is None else x
            return measure.weights[:, None] * (x - self.target)

    with pytest.raises(ValueError, match="Wrong"):
        mfattn.check_loss(Wrong(jnp.zeros((6, 3))), measure)


def test_train_with_a_custom_loss_with_a_scalar_field(getkey):
    """A loss with a shared float field trains; a field that is neither
    per-sample nor scalar fails at once naming it."""

    class Scaled(mfattn.AbstractLoss):
        targets: jax.Array
        scale: float = 0.5

        def __call__(self, measure):
            r = measure.points - self.targets
            return self.scale * jnp.sum(measure.weights[:, None] * r**2)

        def lions_derivative(self, measure, x=None, labels=None):
            return 2 * self.scale * (measure.points - self.targets)

    def sampler(key, batch):
        x = jax.random.normal(key, (batch, 4, 2))
        return jax.vmap(mfattn.EmpiricalMeasure)(x), Scaled(0.5 * x)

    m, lo = sampler(getkey(), 1)
    one = mfattn.EmpiricalMeasure(m.points[0], m.weights[0])
    assert mfattn.check_loss(Scaled(lo.targets[0]), one) < 1e-8
    model = mfattn.DiscreteTransformer(random_params(getkey(), 2, 2, 2, 2), 1.0)
    opt = optax.adam(1e-2)
    res = mfattn.train(model, sampler, opt, 2, getkey(), batch_size=3, progress=False)
    assert np.all(np.isfinite(res.history["loss"]))

    def bad_sampler(key, batch):
        meas, loss = sampler(key, batch)
        return meas, Scaled(loss.targets, jnp.ones(7))

    with pytest.raises(ValueError, match=r"Scaled\.scale"):
        mfattn.train(model, bad_sampler, opt, 2, getkey(), batch_size=3, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "solver, tol",
    [
        (diffrax.Dopri5(), 1e-7),
        pytest.param(diffrax.Heun(), 1e-4, marks=pytest.mark.slow),
        pytest.param(diffrax.Ralston(), 1e-4, marks=pytest.mark.slow),
    ],
    ids=["dopri5", "heun", "ralston"],
)
def test_limit_with_other_adaptive_solvers(getkey, solver, tol):
    """Any adaptive Diffrax solver integrates the limit and its closed-form
    adjoint: at tight tolerances they agree with Tsit5 (the default)."""
    grid = random_params(getkey(), 3, 4, 3, 2)
    measure = random_measure(getkey(), 5, 3)
    loss = random_loss(getkey(), "mmd", measure)
    ref = mfattn.solve_limit(grid, measure, loss, 1.0, rtol=1e-10, atol=1e-12)
    tol_kw = dict(rtol=1e-8, atol=1e-10) if tol < 1e-5 else dict(rtol=1e-6, atol=1e-8)
    sol = mfattn.solve_limit(grid, measure, loss, 1.0, solver=solver, max_steps=65536, **tol_kw)
    assert rel_err(sol.xs, ref.xs) < tol
    assert rel_err(sol.ps, ref.ps) < tol
    assert tree_rel_err(sol.grads, ref.grads) < tol
