"""Training the limit, discrete models and test parameters on one data stream:
the coupling of the proof of Theorem 7 (Lemma 6; docs/theory.md, section 7)."""

import functools
from collections.abc import Sequence
from fractions import Fraction
from typing import NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from ._discrete import solve_discrete
from ._model import MeanFieldTransformer
from ._params import AttentionParams


class CoupledTrainResult(NamedTuple):
    """What [`mfattn.train_coupled`][] returns (numpy arrays).

    - `steps`: `(S,)`, the recorded step numbers `0, r, 2r, ..., K`.
    - `limit`: the limit's parameters at those steps, leaves `(S, N, M, d, k)`.
    - `discrete`: a tuple, per discrete set, of its parameters at those steps,
      leaves `(S, *batch, L, H, d, k)`.
    - `test`: the same for the test parameters `theta~` (the discrete set's
      initial heads moved by the limit's gradient map).
    - `limit_loss`: `(K,)`, the limit's batch-mean loss before each step.
    - `discrete_loss`: a tuple, per discrete set, of `(K, *batch)` losses.
    """

    steps: np.ndarray
    limit: AttentionParams
    discrete: tuple
    test: tuple
    limit_loss: np.ndarray
    discrete_loss: tuple


def _test_times(depths):
    """The sorted times `l / L` (all depths) and, per depth, their indices."""
    times = sorted({Fraction(l, L) for L in depths for l in range(L)})
    where = {t: i for i, t in enumerate(times)}
    idx = [np.array([where[Fraction(l, L)] for l in range(L)]) for L in depths]
    return np.array([float(t) for t in times]), idx


def train_coupled(
    limit: MeanFieldTransformer,
    discrete: Sequence[AttentionParams],
    sampler,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    key,
    *,
    batch_size: int = 16,
    record_every: int = 1,
) -> CoupledTrainResult:
    """Train the limit and discrete transformers on the same data stream, and
    push every discrete head through the limit's training as a test parameter.

    Every step draws one batch `sampler(key_k, batch_size)` (the same key
    sequence as [`mfattn.train`][], so the limit's and each discrete model's
    trajectories are those `train` gives) and

    - trains the limit (`limit.solve` on each sample, batch-mean gradient map
      at its nodes, `optimizer`);
    - trains each discrete model (`solve_discrete` with the limit's `beta` and
      kernel, batch-mean gradient map, `optimizer`, its own state);
    - moves each test parameter `theta~_{l,h}`, started at the discrete head
      `theta_{l,h}^0`, by `optimizer` (its own state) with the *limit's*
      gradient map at `t = l / L`: `g(theta~, l/L) = sum_i w_i grad_theta
      G(x_i(l/L), mu_{l/L}; theta~)^T p_i(l/L)`, batch mean, with `x`, `p` the
      limit's tokens and adjoints. It follows the limit's training without
      acting on it: `theta~^k = Phi_k(theta^0, l/L)`, the coupling of Lemma 6
      (docs/theory.md, section 7).

    **Arguments:**

    - `limit`: a [`mfattn.MeanFieldTransformer`][].
    - `discrete`: a sequence of [`mfattn.AttentionParams`][], each with leaves
      `(*batch, L, H, d, k)` (e.g. a leading axis of initialisations, trained
      independently; the optimisers act entrywise or blockwise, so a stack is
      the same as separate runs).
    - `sampler`, `optimizer`, `num_steps`, `key`, `batch_size`: as in
      [`mfattn.train`][].
    - `record_every`: record the parameters every this many steps (and at
      step 0); must divide `num_steps`.

    **Returns:** a [`mfattn.CoupledTrainResult`][].

    **Raises:** `TypeError`/`ValueError` for a model that is not the limit,
    parameters of another dimension, or `record_every` not dividing `num_steps`.
    """
    if not isinstance(limit, MeanFieldTransformer):
        raise TypeError(f"`limit` must be a MeanFieldTransformer, got {type(limit).__name__}")
    if limit.normalization is not None:
        raise ValueError("`train_coupled` is not implemented on the sphere (`geometry=Sphere()`)")
    discrete = tuple(discrete)
    for i, p in enumerate(discrete):
        if not isinstance(p, AttentionParams) or p.Q.ndim < 4:
            raise TypeError(f"`discrete[{i}]` must be an AttentionParams with (..., L, H, d, k)")
        if p.Q.shape[-2:] != limit.params.Q.shape[-2:]:
            raise ValueError(
                f"`discrete[{i}]` has (d, k) = {p.Q.shape[-2:]}, the limit "
                f"{limit.params.Q.shape[-2:]}"
            )
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"`num_steps` must be a non-negative int, got {num_steps!r}")
    if record_every < 1 or (num_steps and num_steps % record_every):
        raise ValueError(f"`record_every` ({record_every}) must divide `num_steps` ({num_steps})")
    depths = [p.Q.shape[-4] for p in discrete]
    ts, idx = _test_times(depths) if discrete else (np.zeros(1), [])
    ts = jnp.asarray(ts, limit.params.dtype)
    field = limit.field
    beta, kernel = limit.beta, limit.kernel

    def batched(fn, params):
        """`fn` over the leading batch axes of a discrete set."""
        for _ in range(params.Q.ndim - 4):
            fn = jax.vmap(fn)
        return fn(params)

    def test_grads(theta, xs, ps, measure, j):
        # theta (L, H, d, k); xs, ps (T, n, d) of one sample
        def layer(th, x, p):
            return field.backward(measure.with_points(x), th, p)[2]

        return jax.vmap(layer)(theta, xs[idx[j]], ps[idx[j]])

    def one_step(carry, _):
        lim, lstate, disc, dstate, test, tstate, key = carry
        key, sub = jax.random.split(key)
        measures, losses = sampler(sub, batch_size)
        model = limit.with_params(lim)
        sols = jax.vmap(lambda m, lo: model.solve(m, lo, saveat=diffrax.SaveAt(ts=ts)))(
            measures, losses
        )
        g = jax.tree.map(lambda a: jnp.mean(a, axis=0), sols.grads)
        upd, lstate = optimizer.update(g, lstate, lim)
        new_lim = optax.apply_updates(lim, upd)

        def disc_grad(p1):
            sol = jax.vmap(lambda m, y: solve_discrete(p1, m, y, beta, kernel=kernel))(
                measures, losses
            )
            mean = jax.tree.map(lambda a: jnp.mean(a, axis=0), sol.grads)
            return mean, jnp.mean(sol.loss)

        def test_grad(j, th1):
            per = jax.vmap(lambda x, pp, m: test_grads(th1, x, pp, m, j))(
                sols.xs, sols.ps, measures
            )
            return jax.tree.map(lambda a: jnp.mean(a, axis=0), per)

        new_disc, new_dstate, new_test, new_tstate, dloss = [], [], [], [], []
        for j, (p, s, th, st) in enumerate(zip(disc, dstate, test, tstate)):
            gd, lo = batched(disc_grad, p)
            u, s = optimizer.update(gd, s, p)
            new_disc.append(optax.apply_updates(p, u))
            new_dstate.append(s)
            gt = batched(functools.partial(test_grad, j), th)
            u, st = optimizer.update(gt, st, th)
            new_test.append(optax.apply_updates(th, u))
            new_tstate.append(st)
            dloss.append(lo)
        carry = (new_lim, lstate, new_disc, new_dstate, new_test, new_tstate, key)
        return carry, (jnp.mean(sols.loss), dloss)

    @eqx.filter_jit
    def chunk(carry, num):
        return lax.scan(one_step, carry, None, length=num)

    carry = (
        limit.params,
        optimizer.init(limit.params),
        list(discrete),
        [optimizer.init(p) for p in discrete],
        list(discrete),
        [optimizer.init(p) for p in discrete],
        key,
    )

    def snapshot(c):
        return jax.device_get((c[0], c[2], c[4]))

    records = [snapshot(carry)]
    steps = [0]
    limit_loss, disc_loss = [], []
    done = 0
    while done < num_steps:
        carry, (ll, dl) = chunk(carry, record_every)
        done += record_every
        records.append(snapshot(carry))
        steps.append(done)
        limit_loss.append(np.asarray(ll))
        disc_loss.append([np.asarray(x) for x in dl])
    stack = lambda *a: np.stack(a)
    lim = jax.tree.map(stack, *[r[0] for r in records])
    disc = tuple(jax.tree.map(stack, *[r[1][j] for r in records]) for j in range(len(discrete)))
    test = tuple(jax.tree.map(stack, *[r[2][j] for r in records]) for j in range(len(discrete)))
    ll = np.concatenate(limit_loss) if limit_loss else np.zeros(0)
    dl = tuple(
        np.concatenate([c[j] for c in disc_loss]) if disc_loss else np.zeros(0)
        for j in range(len(discrete))
    )
    return CoupledTrainResult(np.array(steps), lim, disc, test, ll, dl)
