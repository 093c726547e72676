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

from ._checkpoint import load_latest, save_checkpoint
from ._model import AbstractModel
from ._params import AttentionParams


class TrainState(NamedTuple):
    """Everything a run needs to continue: the model, the optimiser state,
    the number of steps taken and the PRNG key of the next step."""

    model: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


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


def _make_chunk(sampler, optimizer, batch_size, num, record):
    def one_step(carry, _):
        model, opt_state, step, key = carry
        key, sub = jax.random.split(key)
        measures, losses = sampler(sub, batch_size)
        sols = batch_solve(model, measures, losses)
        grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), sols.grads)
        updates, opt_state = optimizer.update(grads, opt_state, model.params)
        params = optax.apply_updates(model.params, updates)
        model = model.with_params(params)
        metrics = {
            "loss": jnp.mean(sols.loss),
            "grad_norm": _global_norm(grads),
            "param_norm": _global_norm(params),
            "max_block_norm": jnp.max(params.block_norms()),
        }
        out = (metrics, params if record else None)
        return (model, opt_state, step + 1, key), out

    @eqx.filter_jit
    def chunk(model, opt_state, step, key):
        carry, (metrics, traj) = lax.scan(one_step, (model, opt_state, step, key), None, num)
        model = carry[0]
        return carry, metrics, traj, model.params.block_norms()

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

    **Returns:** a [`mfattn.TrainResult`][].
    """
    if not isinstance(model, AbstractModel):
        raise TypeError(f"`model` must be an mfattn model, got {type(model).__name__}")
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"`num_steps` must be a non-negative int, got {num_steps!r}")
    if steps_per_call < 1:
        raise ValueError("`steps_per_call` must be >= 1")
    if state is None:
        state = TrainState(model, optimizer.init(model.params), jnp.asarray(0, jnp.int32), key)
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
        carry, metrics, traj, block_norms = chunks[num](*state)
        state = TrainState(*carry)
        metrics = jax.device_get(metrics)
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
