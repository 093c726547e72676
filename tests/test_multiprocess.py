"""Multi-controller JAX: two local processes (CPU devices, gloo collectives)
train and solve a batch split over the devices of both, with the results of
one process; process 0 alone writes the checkpoints and the results.

The workers are this file run as a script (`python test_multiprocess.py
--worker ...`), each in its own process, started by the test."""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve()
ROOT = HERE.parents[1]


def worker(process_id: int, num_processes: int, port: int, out: pathlib.Path, devices: int):
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_num_cpu_devices", devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if num_processes > 1:
        jax.distributed.initialize(
            f"localhost:{port}", num_processes, process_id, initialization_timeout=120
        )
    import mfattn

    task = mfattn.DenoisingTask(**TASK)
    params = mfattn.AttentionParams.xavier_uniform(jax.random.key(0), 2, 2, 3, 2)
    model = mfattn.DiscreteTransformer(params, 1.0)
    opt = mfattn.blockwise_adamw(1e-2)
    ckpt = out / "checkpoints"
    res = mfattn.train(
        model,
        task,
        opt,
        4,
        jax.random.key(1),
        batch_size=4,
        steps_per_call=2,
        checkpoint_dir=ckpt,
        checkpoint_every=2,
        progress=True,
    )
    # a resumed run: the checkpoint of step 4, read by every process
    more = mfattn.train(
        model,
        task,
        opt,
        6,
        jax.random.key(1),
        batch_size=4,
        steps_per_call=2,
        checkpoint_dir=ckpt,
        progress=False,
    )
    mfattn.save_results(out / "results", more)
    # a batch of solves split over every device of every process
    mesh = mfattn.batch_mesh()
    measures, losses = mfattn.shard_batch(task(jax.random.key(2), 4), mesh)
    split = mfattn.batch_solve(mfattn.replicate(more.model, mesh), measures, losses)
    sols = mfattn.gather(split)
    arrays = {
        "loss": res.history["loss"],
        "more_loss": more.history["loss"],
        "start_step": more.history["start_step"],
        "solve_loss": sols.loss,
        "solve_xs": sols.xs,
    }
    for i, leaf in enumerate(jax.tree.leaves(more.model.params)):
        arrays[f"params_{i}"] = np.asarray(leaf)
    for i, leaf in enumerate(jax.tree.leaves(sols.grads)):
        arrays[f"grads_{i}"] = np.asarray(leaf)
    np.savez(out / f"process{process_id}.npz", **arrays)
    info = {
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "processes": jax.process_count(),
        "loss_spec": str(split.loss.sharding.spec),
        "loss_devices": len(split.loss.sharding.device_set),
    }
    (out / f"process{process_id}.json").write_text(json.dumps(info))


TASK = dict(dim=3, num_tokens=6, num_clusters=2)


@pytest.mark.slow  # the batch-sharded training step is checked in test_sharding.py
def test_one_process_several_devices(getkey):
    """In one process: `train(mesh=...)` over 4 host devices and a sharded
    `batch_solve` give the numbers of one device; bad sizes fail naming them."""
    import jax

    import mfattn

    task = mfattn.DenoisingTask(**TASK)
    params = mfattn.AttentionParams.xavier_uniform(getkey(), 2, 2, 3, 2)
    model = mfattn.DiscreteTransformer(params, 1.0)
    opt = mfattn.blockwise_adamw(1e-2)
    mesh = mfattn.batch_mesh(jax.devices()[:4])
    kw = dict(batch_size=4, steps_per_call=2, progress=False)
    ref = mfattn.train(model, task, opt, 2, jax.random.key(1), **kw)
    got = mfattn.train(model, task, opt, 2, jax.random.key(1), mesh=mesh, **kw)
    assert got.model.params.Q.sharding.is_fully_addressable
    for a, b in zip(jax.tree.leaves(got.model.params), jax.tree.leaves(ref.model.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got.history["loss"], ref.history["loss"], rtol=1e-12)

    batch = task(getkey(), 4)
    split = mfattn.batch_solve(mfattn.replicate(model, mesh), *mfattn.shard_batch(batch, mesh))
    assert len(split.loss.sharding.device_set) == 4
    sols, ref_sols = mfattn.gather(split), mfattn.batch_solve(model, *batch)
    np.testing.assert_allclose(np.asarray(sols.loss), np.asarray(ref_sols.loss), rtol=1e-12)

    with pytest.raises(ValueError, match="batch_size"):
        mfattn.train(model, task, opt, 1, jax.random.key(1), mesh=mesh, batch_size=6)
    with pytest.raises(TypeError, match="mesh"):
        mfattn.train(model, task, opt, 1, jax.random.key(1), mesh="all")
    with pytest.raises(ValueError, match="multiple"):
        mfattn.shard_batch(task(getkey(), 3), mesh)
    with pytest.raises(ValueError, match="devices"):
        mfattn.batch_mesh([])


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(process_id, num_processes, port, out, devices):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)  # the test session's 8 host devices: the workers set theirs
    cmd = [sys.executable, str(HERE), "--worker"]
    cmd += [str(process_id), str(num_processes), str(port), str(out), str(devices)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(procs, timeout=300):
    outputs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            outputs.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rc, _, stderr in outputs:
        assert rc == 0, stderr[-4000:]
    return outputs


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """2 processes x 2 CPU devices against 1 process x 1 device: the same
    training run (the batch of 4 split over 4 devices), resume included, and
    the same batch of solves; checkpoints and results written once."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    port = _free_port()
    procs = [_start(i, 2, port, two, 2) for i in range(2)]
    procs.append(_start(0, 1, 0, one, 1))
    outputs = _wait(procs)

    info = [json.loads((two / f"process{i}.json").read_text()) for i in range(2)]
    assert [i["devices"] for i in info] == [4, 4] and [i["processes"] for i in info] == [2, 2]
    assert all(i["loss_devices"] == 4 and "batch" in i["loss_spec"] for i in info)
    ref = np.load(one / "process0.npz")
    for i in range(2):
        got = np.load(two / f"process{i}.npz")
        assert set(got) == set(ref)
        assert int(got["start_step"]) == 4
        for name in ref:
            scale = max(float(np.max(np.abs(ref[name]))), 1e-300)
            err = float(np.max(np.abs(got[name] - ref[name]))) / scale
            assert err < 1e-12, (i, name, err)

    # process 0 alone wrote: one run's checkpoints (steps 2, 4 and 6; keep=2)
    names = sorted(p.name for p in (two / "checkpoints").glob("ckpt-*.json"))
    ref_names = sorted(p.name for p in (one / "checkpoints").glob("ckpt-*.json"))
    assert names == ref_names and len(names) == 2
    assert (two / "results" / "history.json").exists()
    # progress shown once: the bar of the first run is on process 0's stderr only
    bar = re.compile(r"train:\s*\d+%")
    assert bar.search(outputs[0][2]) and not bar.search(outputs[1][2])


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    pid, nproc, port, out, devices = sys.argv[2:7]
    worker(int(pid), int(nproc), int(port), pathlib.Path(out), int(devices))
