"""Training workflow: loss goes down, checkpoints, resume, bounded norms."""

import json
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mfattn

TASK = mfattn.DenoisingTask(dim=3, num_tokens=12, num_clusters=2)


def _model(L=4, H=4):
    params = mfattn.AttentionParams.xavier_uniform(jax.random.key(0), L, H, 3, 2)
    return mfattn.DiscreteTransformer(params, 1.0)


def test_training_reduces_heldout_loss():
    model = _model()
    before = mfattn.evaluate(model, TASK, jax.random.key(123), 128)
    res = mfattn.train(
        model,
        TASK,
        optax.adamw(2e-2, weight_decay=1e-3),
        150,
        jax.random.key(1),
        batch_size=8,
        steps_per_call=50,
        progress=False,
    )
    after = mfattn.evaluate(res.model, TASK, jax.random.key(123), 128)
    assert float(after) < 0.85 * float(before)
    assert res.history["loss"].shape == (150,)
    assert res.history["block_norms"].shape == (3, 4, 4, 4)


def test_resume_reproduces_uninterrupted_run(tmp_path: pathlib.Path):
    opt = mfattn.blockwise_adamw(1e-2, weight_decay=1e-2)
    kw = dict(batch_size=4, steps_per_call=5, progress=False, record_params=True)
    full = mfattn.train(_model(), TASK, opt, 20, jax.random.key(7), **kw)
    # interrupted after 10 steps (a checkpoint every 5), then resumed to 20
    mfattn.train(
        _model(),
        TASK,
        opt,
        10,
        jax.random.key(7),
        checkpoint_dir=tmp_path,
        checkpoint_every=5,
        **kw,
    )
    names = [p.name for p in mfattn.list_checkpoints(tmp_path)]
    assert [n[:14] for n in names] == ["ckpt-00000005-", "ckpt-00000010-"]
    assert names[0][14:] == names[1][14:]  # one run, named by its fingerprint
    resumed = mfattn.train(
        _model(),
        TASK,
        opt,
        20,
        jax.random.key(7),
        checkpoint_dir=tmp_path,
        checkpoint_every=5,
        **kw,
    )
    # bitwise on CPU: the same compiled chunks run on the same state
    for a, b in zip(jax.tree.leaves(full.model.params), jax.tree.leaves(resumed.model.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(full.history["loss"], resumed.history["loss"])
    for a, b in zip(jax.tree.leaves(full.trajectory), jax.tree.leaves(resumed.trajectory)):
        np.testing.assert_array_equal(a, b)
    assert full.trajectory.Q.shape == (21, 4, 4, 3, 2)


def test_corrupted_checkpoint_clear_error_previous_kept(tmp_path):
    opt = optax.adamw(1e-2)
    mfattn.train(
        _model(),
        TASK,
        opt,
        10,
        jax.random.key(3),
        batch_size=4,
        steps_per_call=5,
        checkpoint_dir=tmp_path,
        checkpoint_every=5,
        progress=False,
    )
    previous, latest = mfattn.list_checkpoints(tmp_path)
    latest = latest.with_suffix(".eqx")
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])  # truncated
    like = mfattn.TrainState(
        _model(), opt.init(_model().params), jnp.asarray(0, jnp.int32), jax.random.key(0)
    )
    with pytest.raises(mfattn.CheckpointError, match=latest.name):
        mfattn.load_checkpoint(latest.with_suffix(".json"), like)
    # the previous checkpoint is still there and loads
    step, state, _ = mfattn.load_checkpoint(previous, like)
    assert step == 5 and int(state.step) == 5
    # a bit flip of the same length is caught by the checksum
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    latest.write_bytes(bytes(flipped))
    with pytest.raises(mfattn.CheckpointError, match="corrupted"):
        mfattn.load_checkpoint(latest.with_suffix(".json"), like)
    with pytest.warns(UserWarning, match="skipping bad checkpoint"):
        found = mfattn.load_latest(tmp_path, like)
    assert found[0] == 5


def test_parameter_norms_stay_bounded_with_weight_decay():
    """AdamW keeps parameters in a compact set: |theta_k| <= |theta_0| + lr k
    always, and with decay lambda the drift is bounded by ~ 1/lambda."""
    lr, wd = 5e-2, 0.5
    res = mfattn.train(
        _model(2, 2),
        TASK,
        mfattn.blockwise_adamw(lr, weight_decay=wd),
        400,
        jax.random.key(5),
        batch_size=4,
        steps_per_call=100,
        progress=False,
    )
    m = res.history["max_block_norm"]
    # per entry, |update| <= lr (1 + wd |theta|): a fixed point bound ~ 1/wd per entry
    entries = 3 * 2
    bound = np.sqrt(entries) * (1.0 / wd + 1.0)
    assert np.all(np.isfinite(m)) and m.max() < bound
    # and the second half does not keep growing
    assert m[200:].max() <= 1.1 * m[:200].max() + 0.5


def test_save_results(tmp_path, monkeypatch):
    """`history.json`, `params.eqx` and `loss.png`, without setting
    matplotlib's backend (a notebook's stays as it is)."""
    import matplotlib

    def refuse(*args, **kwargs):
        raise AssertionError("matplotlib.use was called")

    monkeypatch.setattr(matplotlib, "use", refuse)
    backend = matplotlib.rcParams._get_backend_or_none()
    res = mfattn.train(
        _model(2, 2),
        TASK,
        optax.adamw(1e-2),
        5,
        jax.random.key(0),
        batch_size=2,
        steps_per_call=5,
        progress=False,
    )
    out = mfattn.save_results(tmp_path / "run", res, {"note": "x"})
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((out / "history.json").read_text())
    assert history["note"] == "x" and len(history["loss"]) == 5
    params = eqx.tree_deserialise_leaves(out / "params.eqx", res.model.params)
    assert eqx.tree_equal(params, res.model.params)
    assert matplotlib.rcParams._get_backend_or_none() == backend


def test_training_compiles_once():
    """The sampler's Python code runs only while tracing: once for a whole run
    of equal chunks, so no step is retraced or recompiled."""
    calls = []

    def sampler(key, batch_size):
        calls.append(1)
        return TASK(key, batch_size)

    mfattn.train(
        _model(2, 2),
        sampler,
        optax.adamw(1e-2),
        20,
        jax.random.key(0),
        batch_size=2,
        steps_per_call=5,
        progress=False,
    )
    assert len(calls) == 1
