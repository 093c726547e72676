"""A training run owns its checkpoints, and fails before any work: the run's
fingerprint, clean-up of its own checkpoints only, the directory lock,
malformed manifests, argument checks, interrupted writes and a full disk."""

import json
import os
import pathlib
import re
import resource
import signal
import socket
import subprocess
import sys
import time
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mfattn
from mfattn import _checkpoint, _lock, _train

TASK = mfattn.DenoisingTask(dim=2, num_tokens=4, num_clusters=2)
NAME = re.compile(r"^ckpt-(\d{8,})-([0-9a-f]{12})\.json$")


class _Quadratic(mfattn.AbstractModel):
    """A tiny model whose loss is |theta|^2 / 2 on any data: the gradient map
    is `theta`, and SGD with rate `lr` gives `theta_k = (1 - lr)^k theta_0`."""

    params: mfattn.AttentionParams
    beta: jax.Array = eqx.field(converter=jnp.asarray, default=1.0)  # an array leaf
    kernel: None = None
    chunk_size: None = eqx.field(static=True, default=None)
    mesh: None = eqx.field(static=True, default=None)
    geometry: object = None

    def solve(self, measure, loss, *, test_points=None, test_labels=None):
        del loss, test_points, test_labels
        x = measure.points
        value = 0.5 * sum(jnp.sum(a**2) for a in jax.tree.leaves(self.params))
        return mfattn.Solution(
            ts=jnp.zeros(1), xs=x[None], ps=x[None], grads=self.params, loss=value
        )

    def __call__(self, measure, *, test_points=None):
        del test_points
        x = measure.points
        return mfattn.Solution(ts=jnp.zeros(1), xs=x[None])


def _params(L=2, seed=0):
    return mfattn.AttentionParams.xavier_uniform(jax.random.key(seed), L, 2, 2, 2)


def _train_q(directory=None, num_steps=6, lr=0.1, seed=1, model=None, **kw):
    kw = dict(batch_size=2, steps_per_call=2, progress=False) | kw
    if directory is not None:
        kw.setdefault("checkpoint_every", 2)
    return mfattn.train(
        model or _Quadratic(_params()),
        kw.pop("sampler", TASK),
        optax.sgd(lr),
        num_steps,
        jax.random.key(seed),
        checkpoint_dir=directory,
        **kw,
    )


def _closed_form(steps, lr=0.1):
    return jax.tree.map(lambda a: (1 - lr) ** steps * a, _params())


def _steps(directory, run=None):
    return [int(NAME.match(p.name)[1]) for p in mfattn.list_checkpoints(directory, run)]


def _runs(directory):
    return sorted({NAME.match(p.name)[2] for p in mfattn.list_checkpoints(directory)})


def _contents(directory):
    return {p.name: p.read_bytes() for p in pathlib.Path(directory).iterdir()}


def _no_training(monkeypatch):
    """Make any compiled chunk an error: what runs after this ran no step."""

    def refuse(*args, **kwargs):
        raise AssertionError("a chunk was built: training started")

    monkeypatch.setattr(_train, "_make_chunk", refuse)


def _assert_params(result, expected, rtol=1e-13):
    assert eqx.tree_equal(result.model.params, expected, rtol=rtol, atol=0)


# ------------------------------------------------------ owning checkpoints
def test_clean_up_spares_other_runs_and_newer_checkpoints(tmp_path):
    """Another run's higher-numbered checkpoints are neither removed nor
    overwritten; a shorter rerun of the same run starts below its newer
    checkpoints, keeps them, and keeps its own final one."""
    _train_q(tmp_path, num_steps=8)  # run A: keep=2 leaves 6 and 8
    (run_a,) = _runs(tmp_path)
    before = _contents(tmp_path)
    # run B (another key) into the same directory, afresh: 2 and 4 are its own
    b = _train_q(tmp_path, num_steps=4, seed=2, resume=False, keep=1)
    run_b = (set(_runs(tmp_path)) - {run_a}).pop()
    assert _steps(tmp_path, run_a) == [6, 8] and _steps(tmp_path, run_b) == [4]
    for name, data in before.items():
        if name.startswith("ckpt-"):
            assert (tmp_path / name).read_bytes() == data, name
    _assert_params(b, _closed_form(4))
    # run A again with fewer steps: it cannot use 6 or 8 (past num_steps), so
    # it trains from step 0 to 4, and its own newer 6 and 8 stay
    a4 = _train_q(tmp_path, num_steps=4)
    _assert_params(a4, _closed_form(4))
    assert a4.history["loss"].shape == (4,) and int(a4.state.step) == 4
    assert _steps(tmp_path, run_a) == [2, 4, 6, 8] and _steps(tmp_path, run_b) == [4]
    # rerunning either short command returns its own 4-step state
    again = _train_q(tmp_path, num_steps=4, seed=2)
    _assert_params(again, _closed_form(4))
    assert int(again.state.step) == 4


def test_resume_never_returns_a_state_past_num_steps(tmp_path):
    """A 6-step run, then the same command with `num_steps=3` and with
    `resume=False`: both return the 3-step state, and so does a rerun."""
    _train_q(tmp_path, num_steps=6, steps_per_call=1, checkpoint_every=3)
    short = _train_q(tmp_path, num_steps=3, steps_per_call=1, checkpoint_every=3)
    assert int(short.state.step) == 3
    _assert_params(short, _closed_form(3))
    fresh = _train_q(
        tmp_path, num_steps=3, steps_per_call=1, checkpoint_every=3, resume=False
    )
    _assert_params(fresh, _closed_form(3))
    rerun = _train_q(tmp_path, num_steps=3, steps_per_call=1, checkpoint_every=3)
    _assert_params(rerun, _closed_form(3))
    assert _steps(tmp_path) == [3, 6]


def test_another_run_is_a_clear_error_before_training(tmp_path, monkeypatch):
    """Each difference of the fingerprint is named, before any step, without
    reading the checkpoints as corrupted; the directory is left as it was."""
    _train_q(tmp_path, num_steps=4)
    before = _contents(tmp_path)
    _no_training(monkeypatch)
    other_task = mfattn.DenoisingTask(dim=2, num_tokens=4, num_clusters=2, noise=0.5)
    cases = {
        "the optimizer": dict(lr=0.05),
        "the sampler": dict(sampler=other_task),
        "the model (": dict(model=_Quadratic(_params(L=3))),
        "the model (its": dict(model=_Quadratic(_params(), beta=2.0)),
        "the model's initial parameter values": dict(model=_Quadratic(_params(seed=5))),
        "the key": dict(seed=3),
        "`batch_size` (4 here, 2 there)": dict(batch_size=4),
        "`steps_per_call` (1 here, 2 there)": dict(steps_per_call=1),
    }
    for what, kw in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # not "skipping bad checkpoint"
            with pytest.raises(ValueError, match="holds checkpoints of other runs") as info:
                _train_q(tmp_path, num_steps=6, **kw)
        message = str(info.value)
        assert what in message, (what, message)
        assert "resume=False" in message and "Nothing was trained" in message
        assert ("allow_optimizer_change" in message) == (what == "the optimizer")
        if what == "the model (":  # a deeper model: its optimizer is the same
            assert "optimizer" not in message and "parameter values" not in message
        assert _contents(tmp_path) == before


def test_fresh_run_beside_another_and_optimizer_change_on_request(tmp_path):
    p0 = _params()
    _train_q(tmp_path, num_steps=4)
    (first,) = _runs(tmp_path)
    # another learning rate, asked for: resumes from step 4, with a warning
    with pytest.warns(UserWarning, match="resuming from ckpt-00000004-.*another optimizer"):
        res = _train_q(tmp_path, num_steps=6, lr=0.05, allow_optimizer_change=True)
    expected = jax.tree.map(lambda a: 0.9**4 * 0.95**2 * a, p0)
    _assert_params(res, expected)
    assert res.history["loss"].shape == (6,)
    second = (set(_runs(tmp_path)) - {first}).pop()
    assert _steps(tmp_path, first) == [2, 4] and _steps(tmp_path, second) == [6]
    # resume=False beside both: a fresh run, the others untouched
    fresh = _train_q(tmp_path, num_steps=2, lr=0.2, resume=False)
    _assert_params(fresh, _closed_form(2, 0.2))
    assert len(_runs(tmp_path)) == 3 and _steps(tmp_path, first) == [2, 4]


def test_checkpoints_written_without_a_run_are_another_run(tmp_path, monkeypatch):
    """Checkpoints written by `save_checkpoint` alone (or an older mfattn)
    cannot be told to be this run's: an error naming why, and no clean-up of
    them by a fresh run."""
    like = {"params": _params(), "step": jnp.asarray(3)}
    mfattn.save_checkpoint(tmp_path, 3, like)
    with monkeypatch.context() as m:
        _no_training(m)
        with pytest.raises(ValueError, match="without a run fingerprint"):
            _train_q(tmp_path, num_steps=4)
    _train_q(tmp_path, num_steps=4, resume=False, keep=1)
    assert [p.name for p in mfattn.list_checkpoints(tmp_path)][0] == "ckpt-00000003.json"


def test_fingerprint_parts():
    from mfattn._fingerprint import run_fingerprint

    def fp(model=None, opt=None, sampler=TASK, key=1, **kw):
        kw = dict(batch_size=2, steps_per_call=2) | kw
        model = model or _Quadratic(_params())
        opt = opt or optax.adamw(1e-2)
        return run_fingerprint(model, opt, sampler, jax.random.key(key), **kw)

    base = fp()
    assert base == fp()  # deterministic
    # a learning rate behind a closure, a schedule, weight decay
    for opt in (optax.adamw(2e-2), optax.adamw(1e-2, weight_decay=0.5), optax.sgd(1e-2)):
        assert fp(opt=opt)["optimizer"] != base["optimizer"]
    sched = [optax.sgd(optax.linear_schedule(1e-2, 0.0, n)) for n in (100, 200)]
    assert fp(opt=sched[0])["optimizer"] != fp(opt=sched[1])["optimizer"]
    # a function sampler: its closure and the module data it reads
    for noise in (0.1, 0.2):
        task = mfattn.DenoisingTask(dim=2, num_tokens=4, num_clusters=2, noise=noise)
        assert fp(sampler=lambda k, b, t=task: t(k, b))["sampler"] != base["sampler"]
    assert fp(sampler=lambda k, b: TASK(k, b)) == fp(sampler=lambda k, b: TASK(k, b))
    # num_steps is not part of it; a raw uint32 key differs from a typed one
    assert fp(key=2)["key"] != base["key"]
    assert fp(batch_size=3)["batch_size"] == 3


# -------------------------------------------------------------- arguments
def _bad(name):
    # our message names `name`; jaxtyping's (under the test suite's runtime
    # type checks) says "parameter 'name'"
    return rf"(`{name}`|parameter '{name}')"


@pytest.mark.parametrize(
    "name, value",
    [
        ("num_steps", True),
        ("num_steps", -1),
        ("num_steps", 2.5),
        ("steps_per_call", 2.5),
        ("steps_per_call", 0),
        ("batch_size", 0),
        ("batch_size", False),
        ("checkpoint_every", -1),
        ("checkpoint_every", 0),
        ("checkpoint_every", 1.5),
        ("keep", 0),
        ("keep", -2),
        ("keep", True),
        ("resume", "yes"),
    ],
)
def test_numeric_arguments_checked_before_work(tmp_path, monkeypatch, name, value):
    _no_training(monkeypatch)
    kw = {name: value}
    num_steps = kw.pop("num_steps", 4)
    with pytest.raises((TypeError, ValueError), match=_bad(name)):
        _train_q(tmp_path / "run", num_steps=num_steps, **kw)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_unusable_checkpoint_dir_fails_before_the_first_step(tmp_path, monkeypatch):
    _no_training(monkeypatch)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="`checkpoint_dir` .* is not a directory"):
        _train_q(a_file, checkpoint_every=None)
    with pytest.raises(ValueError, match="`checkpoint_dir` .* cannot be created"):
        _train_q(a_file / "sub", checkpoint_every=None)
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only directory")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="`checkpoint_dir` .* is not writable"):
            _train_q(ro, checkpoint_every=None)
    finally:
        ro.chmod(0o700)


# ------------------------------------------------------------------- lock
def test_directory_in_use_and_stale_lock(tmp_path, monkeypatch):
    lock = _lock.DirectoryLock(tmp_path).acquire()
    try:
        with monkeypatch.context() as m:
            _no_training(m)
            holder = rf"in use by another training run \(pid {os.getpid()} on host"
            with pytest.raises(RuntimeError, match=holder):
                _train_q(tmp_path)
    finally:
        lock.release()
    assert not (tmp_path / "mfattn.lock").exists()
    # a lock left by a killed process: its pid is dead, the flock is gone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = {"pid": dead.pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00"}
    (tmp_path / "mfattn.lock").write_text(json.dumps(owner))
    leftover = tmp_path / f"ckpt-00000002-0123456789ab.eqx.tmp-{dead.pid}-00ff00ff"
    leftover.write_bytes(b"partial")
    stale = f"taking over the lock .* pid {dead.pid} .* no longer running"
    with pytest.warns(UserWarning, match=stale):
        res = _train_q(tmp_path, num_steps=2)
    _assert_params(res, _closed_form(2))
    assert not leftover.exists() and not (tmp_path / "mfattn.lock").exists()


_CHILD = """
import sys, jax, optax, mfattn
jax.config.update("jax_enable_x64", True)
from mfattn._fingerprint import run_fingerprint
params = mfattn.AttentionParams.xavier_uniform(jax.random.key(0), 2, 2, 2, 2)
model = mfattn.DiscreteTransformer(params, 1.0)
task = mfattn.DenoisingTask(dim=2, num_tokens=4, num_clusters=2)
fp = run_fingerprint(model, optax.adamw(1e-2), task, jax.random.key(1), batch_size=2,
                     steps_per_call=2)
print(sorted(fp.items()))
try:
    mfattn.train(model, task, optax.adamw(1e-2), 4, jax.random.key(1), batch_size=2,
                 steps_per_call=2, checkpoint_dir=sys.argv[1], progress=False)
except RuntimeError as e:
    print("ERROR", e)
"""


def test_second_process_gets_a_clear_error(tmp_path):
    """One process holds the directory; another process's `train` into it
    fails at once naming the holder, and computes the same fingerprint for the
    same run (fingerprints do not depend on the process)."""
    from mfattn._fingerprint import run_fingerprint

    params = mfattn.AttentionParams.xavier_uniform(jax.random.key(0), 2, 2, 2, 2)
    model = mfattn.DiscreteTransformer(params, 1.0)
    fp = run_fingerprint(
        model, optax.adamw(1e-2), TASK, jax.random.key(1), batch_size=2, steps_per_call=2
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    with _lock.DirectoryLock(tmp_path):
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(tmp_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == str(sorted(fp.items()))
    assert lines[1].startswith(f"ERROR `checkpoint_dir` {tmp_path} is in use by another")
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in lines[1]
    assert mfattn.list_checkpoints(tmp_path) == []


def test_temporary_names_unique_per_process_and_write(tmp_path, monkeypatch):
    sources = []
    real = os.replace

    def spy(src, dst):
        sources.append(pathlib.Path(src).name)
        return real(src, dst)

    monkeypatch.setattr(_checkpoint.os, "replace", spy)
    state = {"params": _params()}
    mfattn.save_checkpoint(tmp_path, 1, state)
    mfattn.save_checkpoint(tmp_path, 1, state)
    assert len(sources) == 6 and len(set(sources)) == 6
    for name in sources:
        pattern = rf"ckpt-00000001\.(eqx|npz|json)\.tmp-{os.getpid()}-[0-9a-f]{{8}}"
        assert re.fullmatch(pattern, name)


# ------------------------------------------------------ malformed manifests
def _garbage_npz(m, path):
    bad = b"PK\x03\x04 not a zip archive"
    path.with_name(m["history"]).write_bytes(bad)
    m["history_sha256"] = _checkpoint._sha256(bad)


MALFORMED = {
    "missing key": lambda m, p: m.pop("state_sha256"),
    "step a string": lambda m, p: m.update(step="2"),
    "step a bool": lambda m, p: m.update(step=True),
    "step of another name": lambda m, p: m.update(step=7),
    "state not a string": lambda m, p: m.update(state=None),
    "state outside the directory": lambda m, p: m.update(state="../elsewhere.eqx"),
    "checksum not a string": lambda m, p: m.update(history_sha256=12),
    "checksum not hex": lambda m, p: m.update(state_sha256="z" * 64),
    "fingerprint a list": lambda m, p: m.update(fingerprint=[1], run="0123456789ab"),
    "run not the fingerprint's": lambda m, p: m.update(fingerprint={"key": "a"}, run="ab"),
    "metadata a string": lambda m, p: m.update(metadata="x"),
    "unreadable npz": _garbage_npz,
}


@pytest.mark.parametrize("how", list(MALFORMED) + ["not an object", "not JSON"])
def test_malformed_manifest_skipped_like_a_corrupted_file(tmp_path, how):
    good = {"params": _params(), "step": jnp.asarray(1)}
    mfattn.save_checkpoint(tmp_path, 1, good)
    newer = {"params": _params(seed=1), "step": jnp.asarray(2)}
    path = mfattn.save_checkpoint(tmp_path, 2, newer)
    if how == "not an object":
        path.write_text("[1, 2]")
    elif how == "not JSON":
        path.write_text('{"step": 2, "sta')
    else:
        manifest = json.loads(path.read_text())
        MALFORMED[how](manifest, path)
        path.write_text(json.dumps(manifest))
    with pytest.raises(mfattn.CheckpointError, match=r"ckpt-00000002\.(json|npz)"):
        mfattn.load_checkpoint(path, good)
    with pytest.warns(UserWarning, match="skipping bad checkpoint.*ckpt-00000002"):
        step, loaded, _ = mfattn.load_latest(tmp_path, good)
    assert step == 1 and eqx.tree_equal(loaded, good)


def test_train_skips_its_malformed_manifest_and_ignores_others(tmp_path):
    _train_q(tmp_path, num_steps=4)
    (run,) = _runs(tmp_path)
    newest = mfattn.list_checkpoints(tmp_path)[-1]
    manifest = json.loads(newest.read_text())
    del manifest["history"]
    newest.write_text(json.dumps(manifest))
    # another run's malformed manifest: skipped with a warning, never loaded
    foreign = tmp_path / "ckpt-00000009-0123456789ab.json"
    foreign.write_text("{}")
    with pytest.warns(UserWarning, match="skipping bad checkpoint") as record:
        res = _train_q(tmp_path, num_steps=6)
    text = " ".join(str(w.message) for w in record)
    assert newest.name in text and foreign.name in text
    _assert_params(res, _closed_form(6))
    assert foreign.exists()
    assert _steps(tmp_path, run) == [4, 6]


# ------------------------------------------------------------------ names
def test_steps_sort_as_numbers_past_eight_digits(tmp_path):
    state = {"params": _params()}
    for step in (100_000_000, 99_999_999, 7):
        mfattn.save_checkpoint(tmp_path, step, state, keep=5)
    names = [p.name for p in mfattn.list_checkpoints(tmp_path)]
    assert names == ["ckpt-00000007.json", "ckpt-99999999.json", "ckpt-100000000.json"]
    assert mfattn.load_latest(tmp_path, state)[0] == 100_000_000
    # keep=1 at step 100000001 removes the older ones, numbered by value
    mfattn.save_checkpoint(tmp_path, 100_000_001, state, keep=1)
    assert [p.name for p in mfattn.list_checkpoints(tmp_path)] == ["ckpt-100000001.json"]
    # the clean-up of an older step never removes a newer checkpoint
    mfattn.save_checkpoint(tmp_path, 5, state, keep=1)
    assert len(mfattn.list_checkpoints(tmp_path)) == 2
    with pytest.raises(ValueError, match="`keep` must be a positive int"):
        mfattn.save_checkpoint(tmp_path, 6, state, keep=0)
    with pytest.raises(TypeError, match=_bad("step")):
        mfattn.save_checkpoint(tmp_path, 6.0, state)


# ------------------------------------------------------------- divergence
def _nan_at(count):
    """An optimiser stage that makes the update of `O` NaN at step `count + 1`."""

    def init(params):
        del params
        return jnp.zeros((), jnp.int32)

    def update(updates, state, params=None):
        del params
        bad = jnp.where(state == count, jnp.nan, updates.O)
        return eqx.tree_at(lambda u: u.O, updates, bad), state + 1

    return optax.GradientTransformation(init, update)


def test_divergence_names_the_checkpoint_the_resume_uses(tmp_path):
    """Higher-numbered checkpoints of another run and of no run sit in the
    directory; the error names this run's own last finite checkpoint, and a
    rerun resumes from exactly that one."""
    _train_q(tmp_path, num_steps=10, seed=9)
    mfattn.save_checkpoint(tmp_path, 30, {"params": _params()})
    kw = dict(batch_size=2, steps_per_call=2, checkpoint_dir=tmp_path, checkpoint_every=2)
    model = _Quadratic(_params())
    diverging = optax.chain(optax.sgd(0.1), _nan_at(6))
    with pytest.raises(mfattn.DivergenceError) as info:  # afresh, beside the others
        mfattn.train(
            model, TASK, diverging, 10, jax.random.key(1), progress=False, resume=False, **kw
        )
    err = info.value
    assert err.step == 7 and NAME.match(err.checkpoint.name)
    assert _steps(tmp_path, NAME.match(err.checkpoint.name)[2]) == [4, 6]
    assert int(NAME.match(err.checkpoint.name)[1]) == 6
    assert err.checkpoint.name in str(err) and "allow_optimizer_change=True" in str(err)
    smaller = optax.chain(optax.sgd(0.05), _nan_at(-1))
    with pytest.warns(UserWarning, match=f"resuming from {err.checkpoint.name}"):
        res = mfattn.train(
            model,
            TASK,
            smaller,
            10,
            jax.random.key(1),
            progress=False,
            allow_optimizer_change=True,
            **kw,
        )
    _assert_params(res, jax.tree.map(lambda a: 0.9**6 * 0.95**4 * a, _params()), 1e-12)


# ------------------------------------------------------------------ crashes
def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A run interrupted while writing its manifest (Ctrl-C at the worst
    moment): nothing of that checkpoint is left, the previous one is intact,
    and the rerun finishes as the uninterrupted run."""
    real = os.replace

    def interrupted(src, dst):
        if str(dst).endswith(".json") and "ckpt-00000004" in str(dst):
            raise KeyboardInterrupt
        return real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(_checkpoint.os, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _train_q(tmp_path, num_steps=6)
    assert _steps(tmp_path) == [2]
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".eqx", ".json", ".npz"]
    res = _train_q(tmp_path, num_steps=6)
    _assert_params(res, _closed_form(6))
    assert res.history["loss"].shape == (6,)


def test_full_disk_keeps_the_previous_checkpoint(tmp_path):
    """A file-size limit (`RLIMIT_FSIZE`) stands in for a full disk: the
    write of step 4 fails with the error raised and a note, nothing of it is
    left, step 2 stays valid, and a rerun with room finishes the run."""
    _train_q(tmp_path, num_steps=2)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (300, old_limit[1]))
        with pytest.raises(OSError) as info:
            _train_q(tmp_path, num_steps=4)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "step 4" in notes and "ckpt-00000002" in notes
    assert _steps(tmp_path) == [2]
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".eqx", ".json", ".npz"]
    res = _train_q(tmp_path, num_steps=4)
    _assert_params(res, _closed_form(4))


_KILLED = """
import sys, jax, numpy as np, optax, mfattn
jax.config.update("jax_enable_x64", True)
directory, out, num_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
params = mfattn.AttentionParams.xavier_uniform(jax.random.key(0), 2, 2, 2, 2)
model = mfattn.DiscreteTransformer(params, 1.0)
task = mfattn.DenoisingTask(dim=2, num_tokens=4, num_clusters=2)
kw = dict(batch_size=2, steps_per_call=2, checkpoint_every=2, progress=False)
print("resuming" if mfattn.list_checkpoints(directory) else "fresh", flush=True)
res = mfattn.train(
    model, task, optax.adamw(1e-2), num_steps, jax.random.key(1), checkpoint_dir=directory, **kw
)
leaves = jax.tree.leaves(res.model.params) + [res.history["loss"]]
np.savez(out, *[np.asarray(a) for a in leaves])
"""


@pytest.mark.slow
def test_kill_9_at_random_moments_resumes_bitwise(tmp_path):
    """`kill -9` of a checkpointing run at random moments (a checkpoint every
    2 steps, so many land inside a write), again and again: each restart
    resumes, and the run that finishes equals the uninterrupted one bitwise.
    The moments are fractions 0.3-0.45 of the uninterrupted run's wall time,
    so that at least two kills land before the end whatever the machine's
    speed."""
    script = tmp_path / "run.py"
    script.write_text(_KILLED)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    num_steps = 4000
    cmd = [sys.executable, str(script)]
    start = time.perf_counter()
    ref_args = [str(tmp_path / "ref"), str(tmp_path / "ref.npz"), str(num_steps)]
    ref = subprocess.run(cmd + ref_args, env=env)
    wall = time.perf_counter() - start
    assert ref.returncode == 0
    fractions = jax.random.uniform(jax.random.key(0), (8,), minval=0.3, maxval=0.45)
    directory, out = tmp_path / "ckpt", tmp_path / "out.npz"
    kills, starts = 0, []
    for fraction in [*map(float, fractions), None]:
        proc = subprocess.Popen(
            cmd + [str(directory), str(out), str(num_steps)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            proc.wait(timeout=None if fraction is None else fraction * wall)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        starts.append(proc.stdout.read().strip())
        if proc.returncode == 0:
            break
    assert proc.returncode == 0 and out.exists()
    assert kills >= 2 and "resuming" in starts[1:], (kills, starts)
    with np.load(tmp_path / "ref.npz") as a, np.load(out) as b:
        assert a.files == b.files
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])
