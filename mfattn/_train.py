"""Training: jitted multi-step chunks, metrics, checkpoints and resume."""

import math
import pathlib
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh

from ._checkpoint import check_count
from ._checks import check_finite
from ._distributed import all_ok, batch_mesh, check_same, constrain_batch, gather, is_main_process
from ._distributed import replicate as _replicate
from ._fingerprint import run_fingerprint
from ._model import AbstractModel
from ._params import AttentionParams
from ._plots import plot_training
from ._runs import CheckpointRun, open_checkpoint_dir


class TrainState(NamedTuple):
    """Everything a run needs to continue: the model, the optimiser state,
    the number of steps taken and the PRNG key of the next step."""

    model: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


class DivergenceError(RuntimeError):
    """A training run produced a non-finite loss, gradient norm or parameter.

    Raised by [`mfattn.train`][] at the end of the chunk where it happened;
    nothing of that chunk is written to the checkpoints.

    **Attributes:**

    - `step`: the optimiser step that went non-finite, counted from 1 like the
      checkpoints (`history["loss"][step - 1]` is its loss).
    - `what`: the names of what went non-finite at that step, among `"loss"`,
      `"gradient norm"` (of the batch-mean gradient map) and the parameter
      fields after the update (`"params.Q"`, ...).
    - `state`: the last finite [`mfattn.TrainState`][] (after step `step - 1`).
    - `history`: the history (as in [`mfattn.TrainResult`][]) up to and
      including step `step`.
    - `checkpoint`: the checkpoint a rerun resumes from (its manifest path):
      the newest valid one of this run in `checkpoint_dir` numbered up to
      `num_steps`; or `None`.
    """

    def __init__(self, message, *, step, what, state, history, checkpoint):
        super().__init__(message)
        self.step = step
        self.what = what
        self.state = state
        self.history = history
        self.checkpoint = checkpoint


class TrainResult(NamedTuple):
    """What [`mfattn.train`][] returns.

    - `model`: the trained model.
    - `state`: the final [`mfattn.TrainState`][] (pass it to `train(..., state=)`
      to continue).
    - `history`: numpy arrays, one entry per step: `loss` (batch mean before the
      step), `grad_norm` (global norm of the batch-mean gradient map),
      `param_norm` (global parameter norm after the step), `max_block_norm`
      (largest Frobenius norm of any block after the step); and per chunk:
      `chunk_step`, `block_norms` (`(chunks, L, H, 4)`, order Q, K, V, O);
      and `start_step`, the step the run started from (0, or that of the
      checkpoint it resumed).
    - `trajectory`: with `record_params=True`, the parameters before the first
      step and after every step, stacked (`(K+1, L, H, d, k)` leaves); else `None`.
    """

    model: Any
    state: TrainState
    history: dict
    trajectory: AttentionParams | None


def _loss_axes(losses, batch: int):
    """`vmap` axes of a batch of losses: array fields with a leading batch axis
    are per-sample data (axis 0); scalar fields (a Python or 0-d float, such as
    a scale) are shared by the batch (`None`). Anything else is an error that
    names the field."""
    paths = jax.tree_util.tree_flatten_with_path(losses)[0]
    axes = []
    for path, leaf in paths:
        shape = jnp.shape(leaf)
        if shape == ():
            axes.append(None)
        elif shape[0] == batch:
            axes.append(0)
        else:
            name = type(losses).__name__ + jax.tree_util.keystr(path)
            raise ValueError(
                f"the loss field `{name}` has shape {shape}: a batch of {batch} losses needs "
                f"per-sample fields with a leading axis of {batch}, or scalar fields shared by "
                "the batch; give a shared array field a leading axis (e.g. with "
                "`jnp.broadcast_to`), or make it a scalar"
            )
    return jax.tree_util.tree_unflatten(jax.tree.structure(losses), axes)


def batch_solve(model: AbstractModel, measures, losses):
    """`model.solve` over a batch of measures (leading axis), vmapped; the
    losses' per-sample fields are mapped with them, their scalar fields shared.
    A batch placed by [`mfattn.shard_batch`][] (and a model by
    [`mfattn.replicate`][]) is solved in parallel, each device on its part,
    across processes too; [`mfattn.gather`][] brings the results back."""
    batch = measures.points.shape[0]
    axes = _loss_axes(losses, batch)
    return jax.vmap(lambda m, lo: model.solve(m, lo), in_axes=(0, axes))(measures, losses)


@eqx.filter_jit
def evaluate(model: AbstractModel, sampler, key, batch_size: int = 64):
    """Mean loss of `model` on a batch of `batch_size` samples drawn from `key`
    (use a key never used for training for a held-out loss)."""
    measures, losses = sampler(key, batch_size)
    return jnp.mean(batch_solve(model, measures, losses).loss)


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree)))


def _check_names(params) -> tuple[str, ...]:
    """What the per-step check looks at, in the order of its flags."""
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    return ("loss", "gradient norm") + tuple(
        "params" + jax.tree_util.keystr(path) for path, _ in paths
    )


def _nonfinite_flags(loss, grad_norm, params):
    flags = [~jnp.isfinite(loss), ~jnp.isfinite(grad_norm)]
    flags += [~jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(params)]
    return jnp.stack(flags)


def _make_chunk(sampler, optimizer, batch_size, num, record, mesh=None):
    def one_step(carry, _):
        state, first_bad, what = carry
        model, opt_state, step, key = state
        key, sub = jax.random.split(key)
        measures, losses = sampler(sub, batch_size)
        if mesh is not None:  # every process draws the batch; each device solves its part
            measures, losses = constrain_batch((measures, losses), mesh, batch_size)
        sols = batch_solve(model, measures, losses)
        grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), sols.grads)
        updates, opt_state = optimizer.update(grads, opt_state, model.params)
        params = optax.apply_updates(model.params, updates)
        metrics = {
            "loss": jnp.mean(sols.loss),
            "grad_norm": _global_norm(grads),
            "param_norm": _global_norm(params),
            "max_block_norm": jnp.max(params.block_norms()),
        }
        # the divergence check: one flag per checked quantity; from the first
        # bad step on, the state stays the last finite one (the host raises)
        flags = _nonfinite_flags(metrics["loss"], metrics["grad_norm"], params)
        new_bad = (first_bad < 0) & jnp.any(flags)
        first_bad = jnp.where(new_bad, step, first_bad)
        what = jnp.where(new_bad, flags, what)
        new_state = (model.with_params(params), opt_state, step + 1, key)
        state = jax.tree.map(lambda new, old: jnp.where(first_bad < 0, new, old), new_state, state)
        out = (metrics, params if record else None)
        return (state, first_bad, what), out

    @eqx.filter_jit
    def chunk(model, opt_state, step, key):
        flags = jnp.zeros(len(_check_names(model.params)), bool)
        init = ((model, opt_state, step, key), jnp.asarray(-1, step.dtype), flags)
        (state, first_bad, what), (metrics, traj) = lax.scan(one_step, init, None, num)
        return state, metrics, traj, state[0].params.block_norms(), (first_bad, what)

    return chunk


def train(
    model: AbstractModel,
    sampler,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    key,
    *,
    batch_size: int = 16,
    steps_per_call: int = 10,
    checkpoint_dir=None,
    checkpoint_every: int | None = None,
    keep: int = 2,
    resume: bool = True,
    record_params: bool = False,
    progress: bool = True,
    state: TrainState | None = None,
    allow_optimizer_change: bool = False,
    mesh: Mesh | None = None,
) -> TrainResult:
    """Train `model` for `num_steps` optimiser steps on fresh data.

    Every step draws a batch from `sampler(key, batch_size)` (e.g. a
    [`mfattn.DenoisingTask`][]), solves the model on each sample (forward,
    closed-form adjoint, gradient map), averages the gradient map over the batch
    (docs/theory.md, section 4) and applies `optimizer` (e.g. `optax.adamw` or
    [`mfattn.blockwise_adamw`][]). `steps_per_call` steps run inside one jitted
    `lax.scan`, so the host is not in the loop; a progress bar follows the run.

    **Arguments:**

    - `model`: a [`mfattn.DiscreteTransformer`][] or [`mfattn.MeanFieldTransformer`][].
    - `sampler`: `sampler(key, batch_size) -> (measures, losses)`, batched.
    - `optimizer`: an `optax.GradientTransformation`.
    - `num_steps`: total number of steps of the run, a non-negative int (a
      resumed run continues to this number).
    - `key`: the PRNG key of the run; step `k` uses the `k`-th split of it, so
      that a resumed run reproduces the uninterrupted one.
    - `batch_size`, `steps_per_call`: positive ints.
    - `checkpoint_dir`: a directory for checkpoints (the full
      [`mfattn.TrainState`][] plus the history), created and locked (the file
      `mfattn.lock`, holding this process's pid and host) before the first
      step, so that an unusable directory or one in use by another run fails
      at once; the lock of a killed run is taken over with a warning.
    - `checkpoint_every`: `None` (a checkpoint at the end only) or a positive
      int: a checkpoint every `checkpoint_every` steps (rounded up to a
      multiple of `steps_per_call`) and at the end.
    - `keep`: a positive int: of this run's checkpoints up to the one just
      written, the newest `keep` are kept.
    - `resume`: with `True` (default), restart from the newest valid
      checkpoint of this run in `checkpoint_dir` numbered up to `num_steps`.
    - `record_params`: also return the parameters after every step.
    - `state`: continue from a [`mfattn.TrainState`][] (overrides `model`/`key`).
    - `allow_optimizer_change`: also resume from checkpoints of a run that
      differs from this one in the optimizer only (e.g. a smaller learning
      rate after a [`mfattn.DivergenceError`][]; the optimiser state must have
      the same structure), with a warning.
    - `mesh`: a `jax.sharding.Mesh` over whose devices each step's batch is
      split (its leading axis over all the mesh's axes; parameters and
      optimiser state on every device), or `None` (default): under
      multi-controller JAX (`jax.distributed.initialize()`, more than one
      process) a mesh over every device of every process,
      [`mfattn.batch_mesh`][]; in one process, no split. With several
      processes, each runs `train` with the same arguments; process 0 alone
      shows progress and writes the checkpoints (`checkpoint_dir` must be on a
      file system every process sees), and every process returns the same
      result, as host-local arrays.

    **Checkpoints belong to a run.** Each records the fingerprint of the run
    that wrote it (in the manifest and, as a run id, in its name,
    `ckpt-00000005-<run>.json`): the model's tree structure, shapes, dtypes
    and configuration, its initial parameter values, the optimizer (its
    functions, what their closures hold, and the updates it makes in two steps
    on fixed data), the sampler (its structure and configuration; for a
    function, its code, closure and the data globals it reads), the key, the
    starting `state`, `batch_size` and `steps_per_call`. `num_steps` is not
    part of it: a run may be continued to more steps, and a resume never
    returns a state past `num_steps` (checkpoints of this run numbered higher
    are left alone, and the run starts from an earlier one or from step 0).
    With `resume=True`, a directory that holds checkpoints of other runs but
    none of this one is an error before training, naming what differs; with
    `resume=False` the run starts afresh and writes its own checkpoints beside
    the others'. Clean-up removes only this run's older checkpoints, never
    another run's or newer ones.

    Every step checks, inside the jitted chunk, that the batch loss, the
    gradient norm and every parameter field after the update are finite; the
    first step that is not, and what went non-finite, are sent to the host with
    the chunk's metrics. Then `train` stops without writing that chunk to the
    checkpoints, so the newest checkpoint is the last finite one, and a rerun
    with a smaller learning rate, `allow_optimizer_change=True` and the same
    `checkpoint_dir` resumes from it (checkpoints are written atomically and
    verified on load; a non-finite, corrupted or malformed one is skipped with
    a warning).

    **Returns:** a [`mfattn.TrainResult`][].

    **Raises:** [`mfattn.DivergenceError`][] naming the step and what went
    non-finite (it carries the last finite state and the history);
    `ValueError` for non-finite initial parameters; `TypeError`/`ValueError`
    naming the argument for a bad argument, an unusable `checkpoint_dir`, or
    one holding other runs' checkpoints only (with `resume=True`);
    `RuntimeError` if another run holds `checkpoint_dir`. A runtime check that
    fires inside a chunk (a limit solve that fails, a sampler that draws a
    NaN) is raised as it is, with a note naming the chunk's steps; that chunk
    is not written to the checkpoints either. A failed checkpoint write (a
    full disk) is raised with a note; the earlier checkpoints are kept.
    """
    if not isinstance(model, AbstractModel):
        raise TypeError(f"`model` must be an mfattn model, got {type(model).__name__}")
    if not all(callable(getattr(optimizer, f, None)) for f in ("init", "update")):
        raise TypeError(
            f"`optimizer` must be an optax.GradientTransformation, got {type(optimizer).__name__}"
        )
    num_steps = check_count(num_steps, "num_steps", 0)
    batch_size = check_count(batch_size, "batch_size", 1)
    steps_per_call = check_count(steps_per_call, "steps_per_call", 1)
    if checkpoint_every is not None:
        checkpoint_every = check_count(checkpoint_every, "checkpoint_every", 1)
    keep = check_count(keep, "keep", 1)
    if mesh is None and jax.process_count() > 1:
        mesh = batch_mesh()
    if mesh is not None:
        if not isinstance(mesh, Mesh):
            raise TypeError(f"`mesh` must be a jax.sharding.Mesh or None, got {mesh!r}")
        if batch_size % mesh.size:
            raise ValueError(
                f"`batch_size` = {batch_size} must be a multiple of the {mesh.size} devices "
                "of `mesh` (every process's devices, under jax.distributed)"
            )
    flags = dict(resume=resume, record_params=record_params, progress=progress)
    flags["allow_optimizer_change"] = allow_optimizer_change
    for name, flag in flags.items():
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"`{name}` must be a bool, got {flag!r}")
    if state is None:
        check_finite(model.params, "model.params")
        state = TrainState(model, optimizer.init(model.params), jnp.asarray(0, jnp.int32), key)
        given = None
    else:
        check_finite(state.model.params, "state.model.params")
        if int(state.step) > num_steps:
            raise ValueError(
                f"`state` is at step {int(state.step)}, past `num_steps` = {num_steps}"
            )
        given = state
    lock = None
    if checkpoint_dir is not None:
        if is_main_process():  # creates, locks and cleans the directory
            try:
                checkpoint_dir, lock = open_checkpoint_dir(checkpoint_dir)
            except BaseException:
                all_ok(False, "opening `checkpoint_dir`")
                raise
        all_ok(True, "opening `checkpoint_dir` on process 0")
        checkpoint_dir = pathlib.Path(checkpoint_dir)
    try:
        run = None
        if checkpoint_dir is not None:
            fingerprint = run_fingerprint(
                state.model,
                optimizer,
                sampler,
                state.key,
                batch_size=batch_size,
                steps_per_call=steps_per_call,
                state=given,
            )
            run = CheckpointRun(checkpoint_dir, fingerprint, num_steps, allow_optimizer_change)
        return _train(
            state,
            sampler,
            optimizer,
            num_steps,
            batch_size=batch_size,
            steps_per_call=steps_per_call,
            run=run,
            checkpoint_every=checkpoint_every,
            keep=keep,
            resume=resume,
            record_params=record_params,
            progress=progress,
            mesh=mesh,
        )
    finally:
        if lock is not None:
            lock.release()


def _train(
    state,
    sampler,
    optimizer,
    num_steps,
    *,
    batch_size,
    steps_per_call,
    run,
    checkpoint_every,
    keep,
    resume,
    record_params,
    progress,
    mesh=None,
):
    history: dict[str, list] = {
        k: []
        for k in ("loss", "grad_norm", "param_norm", "max_block_norm", "chunk_step", "block_norms")
    }
    trajectory = [jax.tree.map(lambda a: np.asarray(a)[None], state.model.params)]
    if run is not None and resume:
        found = run.resume(state)
        if found is not None:
            path, state, saved = found
            history = {k: list(saved[k]) if k in saved else [] for k in history}
            if record_params:
                if "trajectory_0" not in saved:
                    raise ValueError(
                        f"resuming with `record_params=True` from {path}, written without "
                        "it: pass `record_params=False`, or `resume=False` to start afresh, "
                        "or use another `checkpoint_dir`"
                    )
                treedef = jax.tree.structure(state.model.params)
                leaves = [saved[f"trajectory_{i}"] for i in range(treedef.num_leaves)]
                trajectory = [jax.tree.unflatten(treedef, leaves)]
    if checkpoint_every is not None:
        checkpoint_every = steps_per_call * math.ceil(checkpoint_every / steps_per_call)
    if run is not None:
        check_same(int(state.step), "the step to resume from")
    if mesh is not None:
        state = _replicate(state, mesh)

    start = int(state.step)
    chunks = {}
    bar = None
    if progress and num_steps > start and is_main_process():
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=start, desc="train", unit="step")
    step = start
    while step < num_steps:
        # Chunks are aligned to multiples of steps_per_call from step 0, so a
        # resumed run runs exactly the same compiled chunks.
        num = min(steps_per_call - step % steps_per_call, num_steps - step)
        if num not in chunks:
            chunks[num] = _make_chunk(sampler, optimizer, batch_size, num, record_params, mesh)
        try:
            carry, metrics, traj, block_norms, (first_bad, what) = chunks[num](*state)
        except RuntimeError as e:  # a runtime check inside the chunk (e.g. a failed solve)
            if bar is not None:
                bar.close()
            if _nonfinite_states(e):  # a diverging run: find the step, raise DivergenceError
                one = chunks.get(1) or _make_chunk(
                    sampler, optimizer, batch_size, 1, record_params, mesh
                )
                _locate_divergence(e, one, state, step, num, history, run, num_steps)
            _add_note(e, _chunk_note(step, num, run, gather(state)))
            raise
        metrics, first_bad, what = jax.device_get((metrics, first_bad, what))
        if first_bad >= 0:
            if bar is not None:
                bar.close()
            kept = int(first_bad) - step + 1  # the steps up to the bad one
            for k, v in metrics.items():
                history[k].extend(np.asarray(v)[:kept].tolist())
            _raise_divergence(
                int(first_bad) + 1,
                [n for n, f in zip(_check_names(state.model.params), what) if f],
                gather(TrainState(*carry)),
                _history_arrays(history),
                run,
                num_steps,
            )
        state = TrainState(*carry)
        for k, v in metrics.items():
            history[k].extend(np.asarray(v).tolist())
        step += num
        history["chunk_step"].append(step)
        history["block_norms"].append(np.asarray(block_norms))
        if record_params:
            trajectory.append(jax.tree.map(np.asarray, traj))
        if bar is not None:
            bar.update(num)
            bar.set_postfix(loss=f"{metrics['loss'][-1]:.4g}")
        if (
            run is not None
            and is_main_process()
            and (step == num_steps or (checkpoint_every and step % checkpoint_every == 0))
        ):
            try:
                run.save(
                    step, gather(state), _history_arrays(history, trajectory, record_params), keep
                )
            except BaseException:
                if bar is not None:
                    bar.close()
                raise
    if bar is not None:
        bar.close()
    traj_out = None
    if record_params:
        traj_out = _concat(trajectory)
    out = _history_arrays(history)
    out["start_step"] = np.asarray(start)  # 0, or the step of the checkpoint resumed
    state = gather(state)
    return TrainResult(state.model, state, out, traj_out)


_METRICS = ("loss", "grad_norm", "param_norm", "max_block_norm")


def _nonfinite_states(error) -> bool:
    """Whether `error` is a solver's check of non-finite states
    (`check_states_finite`): the run diverged inside the solve."""
    text = str(error)
    return "pass produced NaN" in text or "pass produced inf" in text


def _locate_divergence(error, one, state, step, num, history, run, num_steps):
    """A chunk starting after `step` raised because a solve produced
    non-finite states: run its steps one at a time from `state` (the same
    keys, so the same steps) and raise `DivergenceError` at the first step
    whose solve or whose loss, gradient or parameters are not finite, with
    the history up to it (the failing step's metrics are NaN) and the last
    finite state."""
    for i in range(num):
        try:
            carry, metrics, _, _, (first_bad, what) = one(*state)
        except RuntimeError as e:
            if not _nonfinite_states(e):
                raise
            for k in _METRICS:
                history[k].append(float("nan"))
            try:
                _raise_divergence(
                    step + i + 1,
                    ["states (a solve produced NaN or inf)"],
                    gather(state),
                    _history_arrays(history),
                    run,
                    num_steps,
                )
            except DivergenceError as d:
                raise d from error
        metrics, first_bad, what = jax.device_get((metrics, first_bad, what))
        for k, v in metrics.items():
            history[k].extend(np.asarray(v).tolist())
        if first_bad >= 0:
            _raise_divergence(
                step + i + 1,
                [n for n, f in zip(_check_names(state.model.params), what) if f],
                gather(TrainState(*carry)),
                _history_arrays(history),
                run,
                num_steps,
            )
        state = TrainState(*carry)


def _chunk_note(step, num, run, like):
    checkpoint = None if run is None else run.resumable(like)
    kept = "" if checkpoint is None else f"; the newest checkpoint, {checkpoint}, is kept"
    return (
        f"mfattn.train: raised while running steps {step + 1}-{step + num}; nothing of "
        f"these steps was written to the checkpoints{kept}"
    )


def _add_note(error, note):
    if hasattr(error, "add_note"):  # Python >= 3.11
        error.add_note(note)


def _raise_divergence(step, what, state, history, run, num_steps):
    checkpoint = None if run is None else run.resumable(state)
    if checkpoint is not None:
        advice = (
            f"The last checkpoint, {checkpoint.name} in {checkpoint.parent}, is finite and "
            "was kept: rerun `train` with the same `checkpoint_dir`, a smaller learning "
            "rate and `allow_optimizer_change=True` to resume from it."
        )
    elif run is not None:
        advice = f"No checkpoint of this run had been written to {run.directory} yet."
    else:
        advice = "No `checkpoint_dir` was given."
    raise DivergenceError(
        f"training diverged at step {step} of {num_steps}: non-finite {', '.join(what)}. "
        f"{advice} The error's `state` holds the last finite state (after step {step - 1}).",
        step=step,
        what=tuple(what),
        state=state,
        history=history,
        checkpoint=checkpoint,
    )


def _concat(trajectory):
    return jax.tree.map(lambda *a: np.concatenate(a, axis=0), *trajectory)


def _history_arrays(history, trajectory=None, record=False):
    out = {k: np.asarray(v) for k, v in history.items() if k != "block_norms"}
    out["block_norms"] = (
        np.stack(history["block_norms"]) if history["block_norms"] else np.zeros((0,))
    )
    if record and trajectory is not None:
        for i, leaf in enumerate(jax.tree.leaves(_concat(trajectory))):
            out[f"trajectory_{i}"] = leaf
    return out


def save_results(directory, result: TrainResult, extra: dict | None = None) -> pathlib.Path:
    """Write a run's results for notebooks.

    **Arguments:**

    - `directory`: where to write (created if missing).
    - `result`: a [`mfattn.TrainResult`][].
    - `extra`: a JSON-serialisable dict added to `history.json`.

    Under multi-controller JAX only process 0 writes.

    **Returns:** `directory`, holding `history.json` (metrics per step),
    `params.eqx` (final parameters) and `loss.png` (the loss curve and the
    largest block norm, drawn without touching matplotlib's backend).
    """
    import json

    directory = pathlib.Path(directory)
    if not is_main_process():  # process 0 writes
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    h = result.history
    payload = {
        k: np.asarray(h[k]).tolist() for k in ("loss", "grad_norm", "param_norm", "max_block_norm")
    }
    payload.update(extra or {})
    (directory / "history.json").write_text(json.dumps(payload, indent=1))
    eqx.tree_serialise_leaves(directory / "params.eqx", result.model.params)
    plot_training(h, directory / "loss.png")
    return directory
