"""Multi-controller JAX: two local processes (CPU devices, gloo collectives)
train and solve a batch split over the devices of both, with the results of
one process; process 0 alone writes the checkpoints and the results. Two
processes share a study's conditions and give the study JSON of one.

The workers are this file run as a script (`python test_multiprocess.py
--worker ...` or `--study-worker ...`), each in its own process, started by
the test."""

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


def study_worker(process_id: int, num_processes: int, port: int, out: pathlib.Path):
    """The convergence study (benchmarks/scaling) on a grid of 7 conditions,
    each a synthetic record with known answers (test_scaling.py): what is
    checked is the split, the files and the summary, not the numerics."""
    import dataclasses

    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_num_cpu_devices", 1)
    if num_processes > 1:
        jax.distributed.initialize(
            f"localhost:{port}", num_processes, process_id, initialization_timeout=120
        )
    import test_scaling  # this file's folder is the script's path

    from benchmarks import scaling

    scaling.Condition.run = test_scaling._synthetic_run
    cfg = dataclasses.replace(
        test_scaling.TINY,
        n_sweep=[4, 8],
        causal_sweep=True,
        d_sweep=[2, 8],
        optimizers=["adamw", "blockwise_sum"],
        sweep_LH=[2, 4],
    )
    data = scaling.run(cfg, out / "study.json", progress=True)
    (out / f"returned{process_id}.json").write_text(json.dumps(data))


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


def _start(process_id, num_processes, port, out, devices=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)  # the test session's 8 host devices: the workers set theirs
    cmd = [sys.executable, str(HERE), "--worker" if devices else "--study-worker"]
    cmd += [str(process_id), str(num_processes), str(port), str(out)]
    cmd += [str(devices)] if devices else []
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


def test_process_share_and_barrier_in_one_process(monkeypatch):
    """One process: the share is every item and a barrier returns at once;
    over `P` processes the shares are round-robin, disjoint and cover the
    items; bad arguments are named."""
    import jax

    import mfattn

    items = ["a", "b", "c", "d", "e"]
    assert mfattn.process_share(items) == items
    assert mfattn.process_share(iter(items)) == items
    assert mfattn.process_share(enumerate("xy")) == [(0, "x"), (1, "y")]
    assert mfattn.process_share([]) == []
    assert mfattn.is_main_process()
    mfattn.barrier("one")
    mfattn.barrier("one")  # again: a no-op as well
    with pytest.raises(ValueError, match="name"):
        mfattn.barrier("")
    with pytest.raises(ValueError, match="timeout"):
        mfattn.barrier("one", timeout=0)

    monkeypatch.setattr(jax, "process_count", lambda: 3)
    shares = []
    for i in range(3):
        monkeypatch.setattr(jax, "process_index", lambda i=i: i)
        shares.append(mfattn.process_share(items))
    assert shares == [["a", "d"], ["b", "e"], ["c"]]
    assert not mfattn.is_main_process()


def _strip_times(x):
    if isinstance(x, dict):
        return {k: _strip_times(v) for k, v in x.items() if "seconds" not in k}
    if isinstance(x, list):
        return [_strip_times(v) for v in x]
    return x


@pytest.mark.slow
def test_two_processes_share_a_study(tmp_path):
    """2 processes run the study's conditions round-robin, each writing its
    own conditions' files, and process 0 alone writes the study JSON and the
    PNGs and prints the report: the JSON of 1 process, up to timings, returned
    on both. Resumed, each process computes again only its own missing
    conditions."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    port = _free_port()
    procs = [_start(i, 2, port, two) for i in range(2)]
    procs.append(_start(0, 1, 0, one))
    outputs = _wait(procs)

    ref = json.loads((one / "study.json").read_text())
    got = json.loads((two / "study.json").read_text())
    assert _strip_times(got) == _strip_times(ref) and len(ref["points"]) == 7
    for i in range(2):  # every process returns the study JSON
        returned = json.loads((two / f"returned{i}.json").read_text())
        assert _strip_times(returned) == _strip_times(got)
    names = list(ref["points"])  # in the order they run
    ran = re.compile(r"^\[p(\d)\] \[\d+/7\] (\S+): grid", re.M)
    for i in range(2):
        assert [m[1] for m in ran.findall(outputs[i][1])] == names[i::2]
        assert {m[0] for m in ran.findall(outputs[i][1])} == {str(i)}
    assert sorted(p.stem for p in (two / "study_points").glob("d*.json")) == sorted(names)
    for name in ("_LH", "_horizon", "_reference", "_n", "_d"):
        assert (two / f"study{name}.png").exists()
    done = re.compile(r"^7 conditions done, 0 failed", re.M)
    assert done.search(outputs[0][1]) and not done.search(outputs[1][1])

    # resumed: one condition of each process's share is missing
    for name in names[:2]:
        (two / "study_points" / f"{name}.json").unlink()
    port = _free_port()
    outputs = _wait([_start(i, 2, port, two) for i in range(2)])
    for i in range(2):
        assert [m[1] for m in ran.findall(outputs[i][1])] == [names[i]]
    again = json.loads((two / "study.json").read_text())
    assert _strip_times(again) == _strip_times(ref)


@pytest.mark.slow
def test_two_processes_share_the_theorem7_study(tmp_path):
    """`python -m benchmarks.theorem7` started as 2 processes: each computes
    the conditions it owns (the bias points after the reference, in a second
    pass), process 0 alone prints the table and writes the JSON, which equals
    that of 1 process up to timings."""
    args = ["--quick", "--L", "4,8", "--H", "4", "--bias-L", "4,8", "--n", "4"]
    args += ["--trained-L", "2,4", "--adjoint-H", "2,4"]
    args += ["--no-progress"]
    port = _free_port()
    cmd = [sys.executable, "-m", "benchmarks.theorem7", *args]
    two = [
        subprocess.Popen(
            [*cmd, "--out", str(tmp_path / "two.json"), "--coordinator", f"localhost:{port}"]
            + ["--num-processes", "2", "--process-id", str(i)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    one = subprocess.run(
        [*cmd, "--out", str(tmp_path / "one.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    outs = [p.communicate(timeout=900) for p in two]
    for p, (_, err) in zip(two, outs):
        assert p.returncode == 0, err[-3000:]
    ref = json.loads((tmp_path / "one.json").read_text())
    got = json.loads((tmp_path / "two.json").read_text())
    assert _strip_times(got) == _strip_times(ref)
    assert "written to" in outs[0][0] and "written to" not in outs[1][0]
    from benchmarks.theorem7._run import owner

    names = [f.stem for f in (tmp_path / "two").glob("*.json")]
    assert {owner(n, 2) for n in names} == {0, 1}


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    pid, nproc, port, out, devices = sys.argv[2:7]
    worker(int(pid), int(nproc), int(port), pathlib.Path(out), int(devices))
if __name__ == "__main__" and sys.argv[1:2] == ["--study-worker"]:
    pid, nproc, port, out = sys.argv[2:6]
    study_worker(int(pid), int(nproc), int(port), pathlib.Path(out))
