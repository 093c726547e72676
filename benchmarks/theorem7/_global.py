"""Part 4 of the study (docs/theory.md, section 7): the fluctuation along
training. Independent initialisations are trained with AdamW at a decaying
step on one shared data stream, and, as a control, on one independent stream
each; their spread is measured at checkpoints up to `K` steps, the state
apart from the adjoint at the tokens and at test points away from them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mfattn

from ._config import Theorem7Config
from ._parts import inits_of, keys_of, probe_outputs, probes_of, task_of

STREAMS = ("shared", "independent")
QUANTITIES = ("state", "adjoint_tokens", "adjoint_far")


def inverse_sqrt_schedule(eta: float, decay: float):
    """The step `eta_k = eta / sqrt(1 + k / decay)`: it decays without a horizon,
    so the step at `k` is the same whatever the last step of the run."""
    return lambda k: eta / jnp.sqrt(1.0 + k / decay)


def spread_quantities(out: dict) -> dict:
    """Per initialisation `r` (the leading axis of every array of `out`, from
    `probe_outputs`), the sup over points of the distance to the mean over
    initialisations, scaled by `sqrt(R / (R - 1))`: `state` (the state at
    depth 1 of the tokens and test particles, as part 1's `state`),
    `adjoint_tokens` (the adjoint at depth 0 of the tokens) and `adjoint_far`
    (that of the test particles), each `(R,)`."""
    R = out["x_tokens"].shape[0]
    c = np.sqrt(R / (R - 1))
    dev = {k: c * np.linalg.norm(v - v.mean(axis=0), axis=-1).max(axis=1) for k, v in out.items()}
    return {
        "state": np.maximum(dev["x_tokens"], dev["x_test"]),
        "adjoint_tokens": dev["p_tokens"],
        "adjoint_far": dev["p_test"],
    }


def scale_quantities(out: dict) -> dict:
    """The size of what `spread_quantities` spreads: the sup over points of
    the norm of the mean over initialisations, per quantity (floats)."""
    sup = lambda v: float(np.linalg.norm(v.mean(axis=0), axis=-1).max())
    return {
        "state": max(sup(out["x_tokens"]), sup(out["x_test"])),
        "adjoint_tokens": sup(out["p_tokens"]),
        "adjoint_far": sup(out["p_test"]),
    }


def head_drift(params, init) -> np.ndarray:
    """Per initialisation, the mean over heads and blocks of `|theta_k -
    theta_0|_F / |theta_0|_F` (how far training moved the heads)."""
    ratios = []
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(init)):
        a, b = np.asarray(a), np.asarray(b)
        num = np.linalg.norm(a - b, axis=(-2, -1))
        ratios.append(num / np.linalg.norm(b, axis=(-2, -1)))
    return np.mean(ratios, axis=0).reshape(ratios[0].shape[0], -1).mean(axis=1)


def stream_keys(data_key, R: int, stream: str):
    """One data key per initialisation: the same key for all (`"shared"`), or
    `R` independent keys (`"independent"`); the batch of step `k` of
    initialisation `r` is drawn from `fold_in(keys[r], k)`."""
    if stream == "shared":
        return jax.vmap(lambda _: data_key)(jnp.arange(R))
    if stream == "independent":
        return jax.random.split(jax.random.fold_in(data_key, 1), R)
    raise ValueError(f"`stream` must be one of {STREAMS}, got {stream!r}")


_TRAINERS: dict = {}


def make_trainer(task, opt: optax.GradientTransformation, beta: float, batch: int, cache=None):
    """`advance(params, state, keys, k0, k1)`: steps `k0, ..., k1 - 1` of the
    optimiser `opt` for every initialisation (leading axis of `params`, `state`
    and `keys`), each on its own data key; returns the new `params`, `state`
    and the training loss per initialisation, averaged over the steps. One
    compilation for every `k0, k1`. With `cache` (a hashable description of
    `task`, `opt`, `beta` and `batch`), the function made for the same
    description before is returned, and its compilation reused (an optimiser
    of `optax.inject_hyperparams` reads its numbers from its state)."""
    if cache is not None and cache in _TRAINERS:
        return _TRAINERS[cache]

    def grads(p, measures, losses):
        sols = jax.vmap(lambda m, lo: mfattn.solve_discrete(p, m, lo, beta))(measures, losses)
        return jax.tree.map(lambda g: g.mean(axis=0), sols.grads), sols.loss.mean()

    def update(p, s, key, k):
        measures, losses = task(jax.random.fold_in(key, k), batch)
        g, value = grads(p, measures, losses)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, value

    @jax.jit
    def advance(params, state, keys, k0, k1):
        def body(k, carry):
            params, state, total = carry
            params, state, values = jax.vmap(update, in_axes=(0, 0, 0, None))(
                params, state, keys, k
            )
            return params, state, total + values

        zero = jnp.zeros(keys.shape[0], dtype=jax.tree.leaves(params)[0].dtype)
        params, state, total = jax.lax.fori_loop(k0, k1, body, (params, state, zero))
        return params, state, total / jnp.maximum(k1 - k0, 1)

    if cache is not None:
        _TRAINERS[cache] = advance
    return advance


def global_point(cfg: Theorem7Config, L: int, H: int, stream: str) -> dict:
    """The spread among `cfg.global_inits` initialisations at `(L, H)` at every
    checkpoint `k` of `cfg.global_checkpoints`, trained with AdamW (per-entry
    step `eta / sqrt(d k)` decayed by `inverse_sqrt_schedule`, weight decay as
    part 1) on the stream `stream`: per checkpoint and quantity of
    `spread_quantities`, the values per initialisation, and the training loss
    averaged over the steps since the previous checkpoint. The initialisations
    are the same for both streams."""
    data_key, probe_key, init_key = keys_of(cfg, "global")
    probes = probes_of(cfg, probe_key)
    R = cfg.global_inits
    params = inits_of(cfg, init_key, L, H, R)
    eta_fixed = cfg.eta / np.sqrt(cfg.dim * cfg.head_dim)
    eta = inverse_sqrt_schedule(eta_fixed, cfg.global_decay)
    opt = optax.adamw(eta, weight_decay=cfg.weight_decay)
    shape = (cfg.dim, cfg.head_dim, cfg.tokens, cfg.clusters, cfg.beta, cfg.batch)
    advance = make_trainer(
        task_of(cfg),
        opt,
        cfg.beta,
        cfg.batch,
        cache=("global", *shape, eta_fixed, cfg.global_decay, cfg.weight_decay),
    )
    keys = stream_keys(data_key, R, stream)
    state = jax.vmap(opt.init)(params)
    per_init = {q: [] for q in QUANTITIES}
    scale = {q: [] for q in QUANTITIES}
    drift, init, losses, k_prev = [], params, [], 0
    for k in cfg.global_checkpoints:
        if k > k_prev:
            params, state, loss = advance(params, state, keys, k_prev, k)
            losses.append(float(np.mean(loss)))
            k_prev = k
        else:
            losses.append(None)  # no step before this checkpoint
        out = probe_outputs(params, probes, cfg.beta)
        for q, v in spread_quantities(out).items():
            per_init[q].append(v.tolist())
        for q, v in scale_quantities(out).items():
            scale[q].append(v)
        drift.append(head_drift(params, init).tolist())
    return {
        "L": L,
        "H": H,
        "stream": stream,
        "inits": R,
        "checkpoints": list(cfg.global_checkpoints),
        "per_init": per_init,
        "scale": scale,
        "head_drift": drift,
        "train_loss": losses,
    }
