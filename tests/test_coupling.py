"""mfattn.train_coupled: the coupling of Lemma 6 (test parameters pushed by the
limit's training) against known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tree_rel_err

import mfattn


def _setup(key, J=2, M=4, n=5, d=2, k=2):
    task = mfattn.DenoisingTask(dim=d, num_tokens=n, num_clusters=2)
    grid = mfattn.AttentionParams.xavier_uniform(key, J, M, d, k)
    limit = mfattn.MeanFieldTransformer(
        grid, 1.0, interpolation=mfattn.PiecewiseConstant(), rtol=1e-9, atol=1e-11
    )
    return task, limit


@pytest.mark.parametrize("opt", [pytest.param("adamw", marks=pytest.mark.slow), "blockwise"])
def test_limit_particles_as_test_parameters_follow_the_limit(getkey, opt):
    # test parameters placed exactly on the limit's particles (L = J layers at
    # the nodes t = l / J, all M particles, and the first 2 of them) are moved
    # by the same gradient map as the particles: the same trajectory
    task, limit = _setup(getkey())
    optimizer = (
        optax.adamw(1e-2, weight_decay=1e-3)
        if opt == "adamw"
        else mfattn.blockwise_adamw(1e-2, weight_decay=1e-3)
    )
    grid = limit.params
    first_two = jax.tree.map(lambda a: a[:, :2], grid)
    res = mfattn.train_coupled(limit, [grid, first_two], task, optimizer, 3, getkey(), batch_size=2)
    assert res.steps.tolist() == [0, 1, 2, 3]
    assert tree_rel_err(res.test[0], res.limit) < 1e-9
    assert tree_rel_err(res.test[1], jax.tree.map(lambda a: a[:, :, :2], res.limit)) < 1e-9
    # and the limit moved (the comparison is not between constants)
    moved = jax.tree.map(lambda a: np.abs(a[-1] - a[0]).max(), res.limit)
    assert min(jax.tree.leaves(moved)) > 1e-4


@pytest.mark.slow  # ~30 s on 2 idle cores: four compiled training loops
def test_same_trajectories_as_train(getkey):
    # the limit and a stack of two discrete models see the data stream of
    # mfattn.train: their trajectories are those train gives
    task, limit = _setup(getkey())
    opt = optax.adamw(1e-2, weight_decay=1e-3)
    key = getkey()
    disc = mfattn.AttentionParams.xavier_uniform(getkey(), 2, 3, 2, 2)
    stack = jax.tree.map(lambda a, b: jnp.stack([a, b]), disc, jax.tree.map(lambda a: -a, disc))
    res = mfattn.train_coupled(limit, [stack], task, opt, 2, key, batch_size=2, record_every=2)
    kw = dict(batch_size=2, steps_per_call=2, record_params=True, progress=False)
    ref = mfattn.train(limit, task, opt, 2, key, **kw).trajectory
    assert tree_rel_err(res.limit, jax.tree.map(lambda a: a[::2], ref)) < 1e-9
    for r, p in enumerate([disc, jax.tree.map(lambda a: -a, disc)]):
        model = mfattn.DiscreteTransformer(p, 1.0)
        ref = mfattn.train(model, task, opt, 2, key, **kw).trajectory
        got = jax.tree.map(lambda a: a[:, r], res.discrete[0])
        assert tree_rel_err(got, jax.tree.map(lambda a: a[::2], ref)) < 1e-10
    # the test parameters start at the discrete heads and then differ from them
    assert tree_rel_err(jax.tree.map(lambda a: a[0], res.test[0]), stack) == 0
    assert tree_rel_err(res.test[0], res.discrete[0]) > 1e-6
    assert res.discrete_loss[0].shape == (2, 2) and res.limit_loss.shape == (2,)


def test_bad_inputs(getkey):
    task, limit = _setup(getkey())
    opt = optax.adamw(1e-2)
    with pytest.raises(TypeError, match="MeanFieldTransformer"):
        mfattn.train_coupled(mfattn.DiscreteTransformer(limit.params, 1.0), [], task, opt, 1, None)
    with pytest.raises(ValueError, match="record_every"):
        mfattn.train_coupled(limit, [], task, opt, 3, getkey(), record_every=2)
    other = mfattn.AttentionParams.xavier_uniform(getkey(), 2, 2, 3, 2)
    with pytest.raises(ValueError, match="d, k"):
        mfattn.train_coupled(limit, [other], task, opt, 1, getkey())
