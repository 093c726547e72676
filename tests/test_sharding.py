"""Token- and batch-sharded runs on 8 host devices equal the single-device run.

conftest.py starts JAX with `--xla_force_host_platform_device_count=8`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import rel_err, tree_rel_err
from helpers import random_loss, random_measure, random_params
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import mfattn

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS, set in conftest.py)"
)


def mesh8(axis_type=AxisType.Auto):
    return jax.make_mesh((8,), ("tokens",), devices=jax.devices()[:8], axis_types=(axis_type,))


@pytest.mark.parametrize(("beta", "chunk"), [(2.0, None), (1e3, 4)])
def test_token_sharded_discrete_equals_single_device(getkey, beta, chunk):
    measure = random_measure(getkey(), 13, 3)  # 13 tokens: not a multiple of 8
    params = random_params(getkey(), 3, 4, 3, 2)
    loss = random_loss(getkey(), "mmd", measure)
    z = jax.random.normal(getkey(), (5, 3))
    one = mfattn.solve_discrete(params, measure, loss, beta, test_points=z)
    # jax.make_mesh's default (Explicit axes) is accepted too
    many = mfattn.solve_discrete(
        params, measure, loss, beta, test_points=z, chunk_size=chunk, mesh=mesh8(AxisType.Explicit)
    )
    for name in ("xs", "ps", "test_xs", "test_ps"):
        assert rel_err(getattr(many, name), getattr(one, name)) < 1e-10, name
    assert tree_rel_err(many.grads, one.grads) < 1e-10
    assert rel_err(many.loss, one.loss) < 1e-12


@pytest.mark.slow  # the kernel's token sharding is checked through solve_discrete by default
def test_token_sharded_limit_equals_single_device(getkey):
    measure = random_measure(getkey(), 10, 3)
    loss = random_loss(getkey(), "denoise", measure)
    grid = random_params(getkey(), 3, 2, 3, 2)
    kw = dict(rtol=1e-9, atol=1e-9)
    one = mfattn.solve_limit(grid, measure, loss, 1.0, **kw)
    many = mfattn.solve_limit(grid, measure, loss, 1.0, mesh=mesh8(), **kw)
    assert rel_err(many.xs, one.xs) < 1e-10
    assert rel_err(many.ps, one.ps) < 1e-10
    assert tree_rel_err(many.grads, one.grads) < 1e-10


def test_batch_sharded_training_equals_single_device(getkey):
    """Data parallelism: the batch of token sets sharded over 8 devices (inputs
    placed with a NamedSharding, the jitted training step partitioned by XLA)."""
    task = mfattn.DenoisingTask(dim=3, num_tokens=8)
    params = random_params(getkey(), 2, 3, 3, 2)
    model = mfattn.DiscreteTransformer(params, 1.0)
    mesh = jax.make_mesh((8,), ("batch",), devices=jax.devices()[:8], axis_types=(AxisType.Auto,))
    batch = NamedSharding(mesh, P("batch"))

    def sharded_task(key, size):
        return jax.lax.with_sharding_constraint(task(key, size), batch)

    kw = dict(batch_size=16, steps_per_call=3, progress=False)
    key = getkey()
    one = mfattn.train(model, task, optax.adamw(1e-2), 3, key, **kw)
    many = mfattn.train(model, sharded_task, optax.adamw(1e-2), 3, key, **kw)
    assert tree_rel_err(many.model.params, one.model.params) < 1e-10
    np.testing.assert_allclose(many.history["loss"], one.history["loss"], rtol=1e-10)
    measures, _ = sharded_task(getkey(), 16)
    assert len(measures.points.sharding.device_set) == 8


def test_mesh_is_checked():
    with pytest.raises(TypeError, match="mesh"):
        mfattn.AttentionField(1.0, mesh="devices")
    assert jnp.isfinite(jnp.array(1.0))


def test_fast_path_training_step_traces_once(getkey):
    """A training step on the chunked, token-sharded path is traced (and so
    compiled) once, however many steps run."""
    import equinox as eqx

    measure = random_measure(getkey(), 12, 3)
    loss = random_loss(getkey(), "denoise", measure)
    opt = mfattn.blockwise_adamw(1e-2)
    mesh = mesh8()

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(params, state):
        sol = mfattn.solve_discrete(params, measure, loss, 2.0, chunk_size=4, mesh=mesh)
        updates, state = opt.update(sol.grads, state, params)
        return eqx.apply_updates(params, updates), state, sol.loss

    # parameters (and so the optimiser state) replicated over the mesh, as the
    # step's outputs are: otherwise the second call sees new input shardings
    params = random_params(getkey(), 2, 3, 3, 2)
    params, state = jax.device_put((params, opt.init(params)), NamedSharding(mesh, P()))
    losses = []
    for _ in range(4):
        params, state, value = step(params, state)
        losses.append(float(value))
    assert losses[-1] < losses[0]
