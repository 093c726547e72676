"""The measurements of the study (docs/theory.md, section 7), each on the public
API of mfattn: the fluctuation among initialisations trained on one data
stream, the bias of the mean at initialisation against the exact limit, and the
sup of the fluctuation over token sets."""

import warnings
import zlib
from functools import partial

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mfattn
from benchmarks.scaling._condition import RMSTask, make_optimizer, tied_init

from ._config import Theorem7Config


def task_of(cfg: Theorem7Config, tokens: int | None = None) -> RMSTask:
    """The denoising task in RMS norm (`benchmarks/scaling`)."""
    n = cfg.tokens if tokens is None else tokens
    return RMSTask(mfattn.DenoisingTask(dim=cfg.dim, num_tokens=n, num_clusters=cfg.clusters))


def keys_of(cfg: Theorem7Config, part: str):
    """`(data, probes, inits)` keys of one part: the same for every grid point."""
    root = jax.random.fold_in(jax.random.key(cfg.seed), zlib.crc32(part.encode()))
    return jax.random.split(root, 3)


def ball(key, m, d, radius):
    """`m` points uniform in the ball of `radius` around 0 in `R^d`."""
    k1, k2 = jax.random.split(key)
    u = jax.random.normal(k1, (m, d))
    u = u / jnp.linalg.norm(u, axis=-1, keepdims=True)
    return radius * u * jax.random.uniform(k2, (m, 1)) ** (1 / d)


def probes_of(cfg: Theorem7Config, key):
    """`cfg.probes` token sets with their losses, test points and test labels."""
    task = task_of(cfg)
    out = []
    for p in range(cfg.probes):
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, p), 3)
        measure, loss = task.sample(k1)
        z = ball(k2, cfg.test_points, cfg.dim, task.radius)
        zl = ball(k3, cfg.test_points, cfg.dim, task.radius)
        out.append((measure, loss, z, zl))
    return out


def inits_of(cfg: Theorem7Config, key, L: int, H: int, R: int):
    """`R` independent draws of `(L, H)` heads from `nu_0`, stacked `(R, L, H, d, k)`."""
    keys = jax.random.split(jax.random.fold_in(key, 7919 * L + H), R)
    return jax.vmap(lambda k: tied_init(k, L, H, cfg.dim, cfg.head_dim))(keys)


# --- outputs of many initialisations at the probes ------------------------------------
@partial(jax.jit, static_argnames=("beta",))
def outputs(params, measure, loss, z, zl, beta):
    """Per initialisation (leading axis of `params`): the state at depth 1 and
    the adjoint at depth 0 of the tokens and of the test particles `z` (labels
    `zl`): `(x_tokens, p_tokens, x_test, p_test)`, each `(R, ., d)`."""

    def one(p):
        s = mfattn.solve_discrete(p, measure, loss, beta, z, test_labels=zl)
        return s.xs[-1], s.ps[0], s.test_xs[-1], s.test_ps[0]

    return jax.vmap(one)(params)


def probe_outputs(params, probes, beta):
    """`outputs` at every probe, concatenated over the probes' points: a dict of
    `(R, P*n, d)` (tokens) and `(R, P*m, d)` (test particles) arrays."""
    parts = [outputs(params, *pr, beta) for pr in probes]
    cat = lambda i: np.concatenate([np.asarray(o[i]) for o in parts], axis=1)
    return {"x_tokens": cat(0), "p_tokens": cat(1), "x_test": cat(2), "p_test": cat(3)}


def fluctuation_per_init(out: dict) -> dict:
    """Per initialisation `r`, the sup over points of `|x_r - mean x| + |p_r -
    mean p|`, scaled by `sqrt(R / (R - 1))` (the deviation from the sample mean
    is smaller than from the law's mean by that factor): `total` (tokens and
    test particles), `state`, `adjoint`, `tokens`, `test` (each `(R,)`)."""
    R = out["x_tokens"].shape[0]
    c = np.sqrt(R / (R - 1))
    dev = {k: c * np.linalg.norm(v - v.mean(axis=0), axis=-1) for k, v in out.items()}
    tok = dev["x_tokens"] + dev["p_tokens"]
    test = dev["x_test"] + dev["p_test"]
    return {
        "total": np.maximum(tok.max(axis=1), test.max(axis=1)),
        "state": np.maximum(dev["x_tokens"].max(axis=1), dev["x_test"].max(axis=1)),
        "adjoint": np.maximum(dev["p_tokens"].max(axis=1), dev["p_test"].max(axis=1)),
        "tokens": tok.max(axis=1),
        "test": test.max(axis=1),
    }


# --- part 1: the fluctuation, trained on one stream ----------------------------------
def train_inits(cfg: Theorem7Config, params, data_key, steps: int):
    """Train `R` initialisations (leading axis of `params`) with AdamW on one
    data stream (the batch of step `k` drawn from `fold_in(data_key, k)`, the
    same for every initialisation) for `steps` steps."""
    task = task_of(cfg)
    opt = make_optimizer("adamw", cfg.eta, cfg.dim, cfg.head_dim, cfg.weight_decay)
    beta = cfg.beta

    def grads(p, measures, losses):
        sols = jax.vmap(lambda m, lo: mfattn.solve_discrete(p, m, lo, beta))(measures, losses)
        return jax.tree.map(lambda g: g.mean(axis=0), sols.grads), sols.loss.mean()

    @jax.jit
    def run(params):
        def step(carry, k):
            params, state = carry
            measures, losses = task(jax.random.fold_in(data_key, k), cfg.batch)

            def update(p, s):
                g, value = grads(p, measures, losses)
                u, s = opt.update(g, s, p)
                return optax.apply_updates(p, u), s, value

            params, state, values = jax.vmap(update)(params, state)
            return (params, state), values

        state = jax.vmap(opt.init)(params)
        (params, _), losses = jax.lax.scan(step, (params, state), jnp.arange(steps))
        return params, losses

    return run(params)


def fluctuation_point(cfg: Theorem7Config, L: int, H: int) -> dict:
    """The fluctuation at `(L, H)` at `k = 0` and after `cfg.steps` steps: per
    initialisation values of `fluctuation_per_init`, and the training loss."""
    data_key, probe_key, init_key = keys_of(cfg, "fluctuation")
    probes = probes_of(cfg, probe_key)
    params = inits_of(cfg, init_key, L, H, cfg.inits)
    rec = {"L": L, "H": H, "inits": cfg.inits, "steps": cfg.steps}
    f0 = fluctuation_per_init(probe_outputs(params, probes, cfg.beta))
    trained, losses = train_inits(cfg, params, data_key, cfg.steps)
    fK = fluctuation_per_init(probe_outputs(trained, probes, cfg.beta))
    rec["k0"] = {k: v.tolist() for k, v in f0.items()}
    rec["kK"] = {k: v.tolist() for k, v in fK.items()}
    losses = np.asarray(losses)  # (steps, R)
    rec["train_loss_first"] = float(losses[0].mean())
    rec["train_loss_last"] = float(losses[-max(1, cfg.steps // 10) :].mean())
    return rec


# --- part 2: the bias of the mean at initialisation -----------------------------------
def sobol_nu0(key, M: int, dim: int, head_dim: int, dtype=None) -> mfattn.AttentionParams:
    """`M` heads of `nu_0` (`Q, K, V` uniform on `[-a, a]`, `a = sqrt(6 / (d +
    k))`, `O = V`) from a scrambled Sobol sequence seeded from `key`:
    randomised quasi-Monte Carlo, each head exactly `nu_0` marginally."""
    from scipy.stats import qmc

    seed = np.asarray(jax.random.bits(key, (4,), dtype=jnp.uint32))
    sampler = qmc.Sobol(d=3 * dim * head_dim, scramble=True, seed=np.random.default_rng(seed))
    with warnings.catch_warnings():  # the balance warning for non-powers of two
        warnings.simplefilter("ignore", UserWarning)
        u = sampler.random(M)
    a = np.sqrt(6.0 / (dim + head_dim))
    mats = jnp.asarray((a * (2.0 * u - 1.0)).reshape(M, 3, dim, head_dim), dtype=dtype)
    q, k, v = (mats[:, i] for i in range(3))  # (M, d, k): one layer
    return mfattn.AttentionParams(q, k, v, v)


def limit_outputs(cfg: Theorem7Config, heads: mfattn.AttentionParams, probes) -> dict:
    """The exact limit of i.i.d.-in-depth heads (a time-independent field,
    the constant path of the layer `heads`, leaves `(M, d, k)`), at tight tolerance: the same
    dict as `probe_outputs` with a leading axis of one."""
    path = mfattn.ParamPath.constant(heads)
    parts = []
    for measure, loss, z, zl in probes:
        s = mfattn.solve_limit(
            path,
            measure,
            loss,
            cfg.beta,
            z,
            test_labels=zl,
            saveat=diffrax.SaveAt(ts=jnp.array([0.0, 1.0])),
            rtol=cfg.reference_rtol,
            atol=cfg.reference_rtol * 1e-2,
        )
        parts.append((s.xs[-1], s.ps[0], s.test_xs[-1], s.test_ps[0]))
    cat = lambda i: np.concatenate([np.asarray(o[i]) for o in parts], axis=0)[None]
    return {"x_tokens": cat(0), "p_tokens": cat(1), "x_test": cat(2), "p_test": cat(3)}


def _stack_points(out: dict):
    """`(x, p)`: the states of the tokens and test particles `(R, n + m, d)`,
    and the adjoints of the tokens `(R, n, d)`. The adjoints of the test
    particles are left out of the bias: the limit's own Monte-Carlo error there
    (`M` against `4M` heads) is as large as the bias at moderate depths, since
    far from the tokens a few heads carry them (the fluctuation part reports
    them)."""
    x = np.concatenate([out["x_tokens"], out["x_test"]], axis=1)
    return x, out["p_tokens"]


def split_half_bias(x, p, ref_x, ref_p, rng, splits: int) -> float:
    """`sup_points b_x + sup_tokens b_p` with `b^2 = <mean_A - ref, mean_B - ref>` over
    random halves `A, B` of the initialisations (averaged over `splits`
    splits): the Monte-Carlo noise of the mean cancels in expectation, so the
    estimate does not level off at the noise floor as `|mean - ref|` does."""
    R = x.shape[0]
    bx = np.zeros(x.shape[1])
    bp = np.zeros(p.shape[1])
    for _ in range(splits):
        perm = rng.permutation(R)
        a, b = perm[: R // 2], perm[R // 2 : 2 * (R // 2)]
        bx += np.sum((x[a].mean(0) - ref_x) * (x[b].mean(0) - ref_x), axis=-1)
        bp += np.sum((p[a].mean(0) - ref_p) * (p[b].mean(0) - ref_p), axis=-1)
    bx, bp = bx / splits, bp / splits
    return float(np.max(np.sqrt(np.maximum(bx, 0)))) + float(np.max(np.sqrt(np.maximum(bp, 0))))


def bias_reference(cfg: Theorem7Config) -> dict:
    """The limit at the probes with `M` and `4M` Sobol heads, and their distance
    (sup over points of `|dx| + |dp|`)."""
    _, probe_key, init_key = keys_of(cfg, "bias")
    probes = probes_of(cfg, probe_key)
    M = cfg.reference_M
    ref = limit_outputs(cfg, sobol_nu0(init_key, M, cfg.dim, cfg.head_dim), probes)
    big = limit_outputs(
        cfg, sobol_nu0(jax.random.fold_in(init_key, 4), 4 * M, cfg.dim, cfg.head_dim), probes
    )
    rx, rp = _stack_points(ref)
    gx, gp = _stack_points(big)
    err = np.linalg.norm(rx - gx, axis=-1).max() + np.linalg.norm(rp - gp, axis=-1).max()
    test_p = np.linalg.norm(ref["p_test"] - big["p_test"], axis=-1).max()
    return {
        "M": M,
        "M_vs_4M": float(err),
        "M_vs_4M_test_adjoint": float(test_p),
        "x": gx[0].tolist(),  # the 4M solution is the reference
        "p": gp[0].tolist(),
    }


def bias_point(cfg: Theorem7Config, L: int, reference: dict) -> dict:
    """The bias of the mean of `cfg.bias_inits` initialisations at depth `L`
    (`H = cfg.bias_H`, `k = 0`) against the reference: the split-half estimate,
    its bootstrap over initialisations, and the plain `sup |mean - ref|`."""
    _, probe_key, init_key = keys_of(cfg, "bias")
    probes = probes_of(cfg, probe_key)
    R = cfg.bias_inits
    xs, ps = [], []
    chunk = 64  # initialisations per call: bounded memory
    for start in range(0, R, chunk):
        keys = jax.random.fold_in(init_key, 104729 * L + start)
        params = inits_of(cfg, keys, L, cfg.bias_H, min(chunk, R - start))
        x, p = _stack_points(probe_outputs(params, probes, cfg.beta))
        xs.append(x)
        ps.append(p)
    x, p = np.concatenate(xs), np.concatenate(ps)
    rx, rp = np.asarray(reference["x"]), np.asarray(reference["p"])
    rng = np.random.default_rng(L)
    value = split_half_bias(x, p, rx, rp, rng, cfg.splits)
    boots = []
    for _ in range(cfg.boots):
        idx = rng.integers(0, R, R)
        boots.append(split_half_bias(x[idx], p[idx], rx, rp, rng, max(2, cfg.splits // 4)))
    sup = lambda a, b: float(np.linalg.norm(a - b, axis=-1).max())
    plain = sup(x.mean(0), rx) + sup(p.mean(0), rp)
    # the noise of the mean: sqrt(trace Cov / R) per point, its sup
    noise = float(np.sqrt(x.var(0, ddof=1).sum(-1) / R).max()) + float(
        np.sqrt(p.var(0, ddof=1).sum(-1) / R).max()
    )
    return {
        "L": L,
        "H": cfg.bias_H,
        "inits": R,
        "value": value,
        "boots": boots,
        "plain": plain,
        "noise_of_mean": noise,
    }


# --- part 3: the sup over token sets ---------------------------------------------------
def _token_fluctuation(params, points, beta, causal):
    """`mean_r max_i |x_r,i - mean x_i|` at depth 1 for the token set `points`
    (uniform weights), scaled by `sqrt(R / (R - 1))`."""
    kernel = mfattn.DenseKernel(causal=True) if causal else mfattn.DenseKernel()
    measure = mfattn.EmpiricalMeasure(points)

    def one(p):
        return mfattn.solve_discrete(p, measure, None, beta, kernel=kernel).xs[-1]

    x = jax.vmap(one)(params)  # (R, n, d)
    R = x.shape[0]
    dev = jnp.sqrt(R / (R - 1)) * jnp.linalg.norm(x - x.mean(axis=0, keepdims=True), axis=-1)
    return dev.max(axis=1)  # (R,)


@partial(jax.jit, static_argnames=("beta", "causal"))
def _ascent_step(params, points, radius, step, beta, causal):
    f = lambda pts: jnp.mean(_token_fluctuation(params, pts, beta, causal))
    value, g = jax.value_and_grad(f)(points)
    g = g / (jnp.linalg.norm(g) / jnp.sqrt(g.shape[0]) + 1e-30)  # a fixed RMS step per token
    new = points + step * radius * g
    norm = jnp.linalg.norm(new, axis=-1, keepdims=True)
    new = jnp.where(norm > radius, new * radius / norm, new)  # back into the ball
    return value, new


def uniform_point(cfg: Theorem7Config, n: int, causal: bool) -> dict:
    """The sup over token sets of `n` tokens in the task's ball of the
    fluctuation of the tokens' states at depth 1 (`k = 0`): projected gradient
    ascent from `cfg.ascent_restarts` task samples; the value at the start,
    the best value and its per-initialisation values, the values along the
    best ascent, and the gain of its last quarter."""
    _, probe_key, init_key = keys_of(cfg, "uniform")
    task = task_of(cfg, n)
    params = inits_of(cfg, init_key, cfg.uniform_L, cfg.uniform_H, cfg.uniform_inits)
    best = None
    starts = []
    for r in range(cfg.ascent_restarts):
        measure, _ = task.sample(jax.random.fold_in(probe_key, 1000 * n + r))
        pts = measure.points
        values = []
        for _ in range(cfg.ascent_steps):
            v, pts = _ascent_step(params, pts, task.radius, cfg.ascent_step_size, cfg.beta, causal)
            values.append(float(v))
        final = np.asarray(_token_fluctuation(params, pts, cfg.beta, causal))
        values.append(float(final.mean()))
        starts.append(values[0])
        if best is None or values[-1] > best[0][-1]:
            best = (values, final)
    values, final = best
    q = len(values) - 1 - max(1, (len(values) - 1) // 4)
    return {
        "n": n,
        "causal": causal,
        "L": cfg.uniform_L,
        "H": cfg.uniform_H,
        "inits": cfg.uniform_inits,
        "start": float(np.mean(starts)),
        "value": values[-1],
        "per_init": final.tolist(),
        "ascent": values,
        "last_quarter_gain": values[-1] / values[q],
    }
