"""Part 5 of the study (docs/theory.md, sections 5 and 7, Lemma 6): the
fluctuation after `K` steps against the dimension `d`, with AdamW at a fixed
per-entry step (the theorem's hyperparameters, not rescaled by `sqrt(d k)`)
against blockwise AdamW, and Adam's `eps` swept.

Held fixed across `d`: the task in RMS norm (per coordinate, centres uniform
in `[-1, 1]`, cluster spread 0.15 and noise 0.3, all divided by `sqrt(d)`), so
the loss of the identity map, the task's difficulty, does not depend on `d`;
the heads' inner dimension `k`, `L`, `H`, the batch, `K` and the steps."""

import dataclasses

import jax
import numpy as np
import optax

import mfattn

from ._config import Theorem7Config
from ._global import head_drift, make_trainer, spread_quantities, stream_keys
from ._parts import inits_of, keys_of, probe_outputs, probes_of, task_of

OPTIMIZERS = ("adamw", "blockwise_sum", "blockwise_mean")


def theorem_optimizer(cfg: Theorem7Config, name: str, eps: float) -> optax.GradientTransformation:
    """The optimiser `name` at the theorem's hyperparameters, the same at every
    `d`: `"adamw"` (`optax.adamw`) and `"blockwise_mean"` at the per-entry step
    `cfg.lemma6_eta_entry`; `"blockwise_sum"` (the theory's blockwise AdamW,
    a block's update of Frobenius size about one) at the per-block step
    `cfg.lemma6_eta_entry * sqrt(4 k)`, so that the three coincide in scale at
    `d = 4`; weight decay `cfg.weight_decay`; Adam's `eps` as given.
    The numbers are hyperparameters of `optax.inject_hyperparams`: they live
    in the optimiser's state, so that one compilation serves every `eps`."""
    eta, wd = cfg.lemma6_eta_entry, cfg.weight_decay
    if name == "adamw":
        return optax.inject_hyperparams(optax.adamw)(learning_rate=eta, eps=eps, weight_decay=wd)
    if name == "blockwise_sum":
        block = eta * np.sqrt(4 * cfg.lemma6_head_dim)
        return optax.inject_hyperparams(mfattn.blockwise_adamw, static_args=("reduction",))(
            learning_rate=block, eps=eps, weight_decay=wd, reduction="sum"
        )
    if name == "blockwise_mean":
        return optax.inject_hyperparams(mfattn.blockwise_adamw, static_args=("reduction",))(
            learning_rate=eta, eps=eps, weight_decay=wd, reduction="mean"
        )
    raise ValueError(f"`name` must be one of {OPTIMIZERS}, got {name!r}")


def eps_name(eps: float) -> str:
    """`1e-08` as `1e-8`: the condition files' spelling of `eps`."""
    mant, exp = f"{eps:.0e}".split("e")
    return f"{mant}e{int(exp)}"


def lemma6_point(cfg: Theorem7Config, d: int, optimizer: str, eps: float) -> dict:
    """The spread among `cfg.lemma6_inits` initialisations at `d` after
    `cfg.lemma6_steps` steps of `theorem_optimizer(cfg, optimizer, eps)` on one
    shared stream (`L = cfg.lemma6_L`, `H = cfg.lemma6_H`, `k =
    cfg.lemma6_head_dim`): per quantity of `spread_quantities` the values per
    initialisation at `k = 0` and after training, the heads' drift, the loss of
    the identity map on the first batch and the training loss."""
    c = dataclasses.replace(cfg, dim=d, head_dim=cfg.lemma6_head_dim)
    data_key, probe_key, init_key = keys_of(c, f"lemma6-d{d}")
    probes = probes_of(c, probe_key)
    R, K = cfg.lemma6_inits, cfg.lemma6_steps
    params = inits_of(c, init_key, cfg.lemma6_L, cfg.lemma6_H, R)
    task = task_of(c)
    opt = theorem_optimizer(cfg, optimizer, eps)
    shape = (d, c.head_dim, c.tokens, c.clusters, c.beta, c.batch)
    advance = make_trainer(task, opt, c.beta, c.batch, cache=("lemma6", *shape, optimizer))
    keys = stream_keys(data_key, R, "shared")
    f0 = spread_quantities(probe_outputs(params, probes, c.beta))
    measures, losses = task(jax.random.fold_in(data_key, 0), c.batch)
    identity = float(np.mean(jax.vmap(lambda m, lo: lo(m))(measures, losses)))
    state = jax.vmap(opt.init)(params)
    tail = max(1, K - max(1, K // 10))  # the training loss of the last tenth of the steps
    trained, state, first = advance(params, state, keys, 0, 1)
    trained, state, _ = advance(trained, state, keys, 1, tail)
    trained, state, last = advance(trained, state, keys, tail, K)
    fK = spread_quantities(probe_outputs(trained, probes, c.beta))
    return {
        "d": d,
        "optimizer": optimizer,
        "eps": eps,
        "L": cfg.lemma6_L,
        "H": cfg.lemma6_H,
        "head_dim": cfg.lemma6_head_dim,
        "inits": R,
        "steps": K,
        "k0": {q: v.tolist() for q, v in f0.items()},
        "kK": {q: v.tolist() for q, v in fK.items()},
        "head_drift": head_drift(trained, params).tolist(),
        "identity_loss": identity,
        "train_loss_first": float(np.mean(first)),
        "train_loss_last": float(np.mean(last)),
    }
