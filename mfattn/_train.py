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

from ._checkpoint import list_checkpoints, load_latest, save_checkpoint
from ._checks import check_finite
from ._model import AbstractModel
from ._params import AttentionParams


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
    - `checkpoint`: the newest checkpoint left in `checkpoint_dir` (its
      manifest path), from which a rerun resumes, or `None`.
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
      `chunk_step`, `block_norms` (`(chunks, L, H, 4)`, order Q, K, V, O).
    - `trajectory`: with `record_params=True`, the parameters before the first
      step and after every step, stacked (`(K+1, L, H, d, k)` leaves); else `None`.
    """

    model: Any
    state: TrainState
    history: dict
    trajectory: AttentionParams | None


def batch_solve(model: AbstractModel, measures, losses):
    """`model.solve` over a batch of measures (leading axis), vmapped."""
    return jax.vmap(lambda m, lo: model.solve(m, lo))(measures, losses)


@eqx.filter_jit
def evaluate(model: AbstractModel, sampler, key, batch_size: int = 64):
    """Mean loss of `model` on a batch of `batch_size` samples drawn from `key`
    (use a key never used for training for a held-out loss)."""
    measures, losses = sampler(key, batch_size)
    return jnp.mean(jax.vmap(lambda m, lo: model.solve(m, lo).loss)(measures, losses))


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


def _make_chunk(sampler, optimizer, batch_size, num, record):
    def one_step(carry, _):
        state, first_bad, what = carry
        model, opt_state, step, key = state
        key, sub = jax.random.split(key)
        measures, losses = sampler(sub, batch_size)
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
    - `num_steps`: total number of steps of the run (a resumed run continues
      to this number).
    - `key`: the PRNG key of the run; step `k` uses the `k`-th split of it, so
      that a resumed run reproduces the uninterrupted one.
    - `checkpoint_dir`, `checkpoint_every`: write a checkpoint (the full
      [`mfattn.TrainState`][] plus the history) every `checkpoint_every` steps
      (rounded up to a multiple of `steps_per_call`) and at the end; keep the
      last `keep`. With `resume=True` (default) the run restarts from the newest
      valid checkpoint there.
    - `record_params`: also return the parameters after every step.
    - `state`: continue from a [`mfattn.TrainState`][] (overrides `model`/`key`).

    Every step checks, inside the jitted chunk, that the batch loss, the
    gradient norm and every parameter field after the update are finite; the
    first step that is not, and what went non-finite, are sent to the host with
    the chunk's metrics. Then `train` stops without writing that chunk to the
    checkpoints, so the newest checkpoint is the last finite one, and a rerun
    with a smaller learning rate and the same `checkpoint_dir` resumes from it
    (checkpoints are written atomically and verified on load; a non-finite or
    corrupted one is skipped with a warning).

    **Returns:** a [`mfattn.TrainResult`][].

    **Raises:** [`mfattn.DivergenceError`][] naming the step and what went
    non-finite (it carries the last finite state and the history);
    `ValueError` for non-finite initial parameters. A runtime check that fires
    inside a chunk (a limit solve that fails, a sampler that draws a NaN) is
    raised as it is, with a note naming the chunk's steps; that chunk is not
    written to the checkpoints either.
    """
    if not isinstance(model, AbstractModel):
        raise TypeError(f"`model` must be an mfattn model, got {type(model).__name__}")
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"`num_steps` must be a non-negative int, got {num_steps!r}")
    if steps_per_call < 1:
        raise ValueError("`steps_per_call` must be >= 1")
    if state is None:
        check_finite(model.params, "model.params")
        state = TrainState(model, optimizer.init(model.params), jnp.asarray(0, jnp.int32), key)
    else:
        check_finite(state.model.params, "state.model.params")
    history: dict[str, list] = {
        k: []
        for k in ("loss", "grad_norm", "param_norm", "max_block_norm", "chunk_step", "block_norms")
    }
    trajectory = [jax.tree.map(lambda a: np.asarray(a)[None], state.model.params)]
    if checkpoint_dir is not None and resume:
        found = load_latest(checkpoint_dir, state)
        if found is not None:
            _, state, saved = found
            history = {k: list(saved[k]) if k in saved else [] for k in history}
            if record_params:
                if "trajectory_0" not in saved:
                    raise ValueError(
                        "resuming with record_params=True from a checkpoint written without it"
                    )
                treedef = jax.tree.structure(state.model.params)
                leaves = [saved[f"trajectory_{i}"] for i in range(treedef.num_leaves)]
                trajectory = [jax.tree.unflatten(treedef, leaves)]
    if checkpoint_every is not None:
        checkpoint_every = steps_per_call * math.ceil(checkpoint_every / steps_per_call)

    start = int(state.step)
    chunks = {}
    bar = None
    if progress and num_steps > start:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=start, desc="train", unit="step")
    step = start
    while step < num_steps:
        # Chunks are aligned to multiples of steps_per_call from step 0, so a
        # resumed run runs exactly the same compiled chunks.
        num = min(steps_per_call - step % steps_per_call, num_steps - step)
        if num not in chunks:
            chunks[num] = _make_chunk(sampler, optimizer, batch_size, num, record_params)
        try:
            carry, metrics, traj, block_norms, (first_bad, what) = chunks[num](*state)
        except RuntimeError as e:  # a runtime check inside the chunk (e.g. a failed solve)
            if bar is not None:
                bar.close()
            _add_note(e, _chunk_note(step, num, checkpoint_dir))
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
                TrainState(*carry),
                _history_arrays(history),
                checkpoint_dir,
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
        if checkpoint_dir is not None and (
            step == num_steps or (checkpoint_every and step % checkpoint_every == 0)
        ):
            save_checkpoint(
                checkpoint_dir,
                step,
                state,
                _history_arrays(history, trajectory, record_params),
                keep,
            )
    if bar is not None:
        bar.close()
    traj_out = None
    if record_params:
        traj_out = _concat(trajectory)
    return TrainResult(state.model, state, _history_arrays(history), traj_out)


def _newest_checkpoint(checkpoint_dir):
    if checkpoint_dir is None:
        return None
    manifests = list_checkpoints(checkpoint_dir)
    return manifests[-1] if manifests else None


def _chunk_note(step, num, checkpoint_dir):
    checkpoint = _newest_checkpoint(checkpoint_dir)
    kept = "" if checkpoint is None else f"; the newest checkpoint, {checkpoint}, is kept"
    return (
        f"mfattn.train: raised while running steps {step + 1}-{step + num}; nothing of "
        f"these steps was written to the checkpoints{kept}"
    )


def _add_note(error, note):
    if hasattr(error, "add_note"):  # Python >= 3.11
        error.add_note(note)


def _raise_divergence(step, what, state, history, checkpoint_dir, num_steps):
    checkpoint = _newest_checkpoint(checkpoint_dir)
    if checkpoint is not None:
        advice = (
            f"The last checkpoint, {checkpoint.name} in {checkpoint.parent}, is finite and "
            "was kept: rerun `train` with the same `checkpoint_dir` and a smaller "
            "learning rate to resume from it."
        )
    elif checkpoint_dir is not None:
        advice = f"No checkpoint had been written to {checkpoint_dir} yet."
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
    """Write a run's results for notebooks: `history.json` (metrics per step),
    `params.eqx` (final parameters), `loss.png` (the loss curve)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    h = result.history
    payload = {
        k: np.asarray(h[k]).tolist() for k in ("loss", "grad_norm", "param_norm", "max_block_norm")
    }
    payload.update(extra or {})
    (directory / "history.json").write_text(json.dumps(payload, indent=1))
    eqx.tree_serialise_leaves(directory / "params.eqx", result.model.params)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(h["loss"])
    ax[0].set(xlabel="step", ylabel="training loss (batch mean)", yscale="log")
    ax[1].plot(h["max_block_norm"])
    ax[1].set(xlabel="step", ylabel="largest block norm")
    fig.tight_layout()
    fig.savefig(directory / "loss.png", dpi=120)
    plt.close(fig)
    return directory
