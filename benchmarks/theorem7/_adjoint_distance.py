"""Part 6 of the study (docs/theory.md, section 7): the adjoint against the
distance from the tokens.

Part 1's models at depth `cfg.adjoint_L` (the same initialisations, trained on
the same stream) are evaluated at test points placed at a distance `delta R`
from a token (`R` the radius of the task's ball, `delta` in
`cfg.adjoint_distances`, a random token and direction per point). Per
distance: the spread among initialisations of the adjoint at depth 0 and of
the state at depth 1 (part 1's sup over points of the distance to the mean),
the size of the mean adjoint, and which terms and how many heads carry the
adjoint. In the discrete model the adjoint of a test point `z` is the
backward formula of the tokens evaluated at `z`,

    p_z^l = p_z^{l+1} + 1 / (L H) sum_h [J_{l,h}(z^l)^T p_z^{l+1}
                                          + sum_j w_j Lambda_{l,h}(x_j^l, z^l)^T p_j^{l+1}],

with `J_{l,h}` the Jacobian of head `h` of layer `l` at the point's state and
`Lambda_{l,h}(x, z)` its Lions derivative (how the field at the token `x`
moves with mass at `z`; it carries the attention weight `a_h(x, z) ~
exp(beta <Q^T x, K^T z>)`, which grows exponentially as `z` leaves the
tokens). Per distance: the Lions term's share of the increments, the share
of the head with the largest increment `c_{l,h}` among the `L H` heads, and
the participation ratio `(sum c)^2 / (L H sum c^2)` (1 when every head
contributes alike, `1 / (L H)` when one carries all). If a few heads carry
the adjoint, the average over heads is a sum of few terms and its spread
cannot fall like `H^{-1/2}` at these `H`."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import mfattn

from ._config import Theorem7Config
from ._parts import inits_of, keys_of, probes_of, task_of, train_inits

QUANTITIES = ("p_spread", "x_spread", "share", "participation", "lions_share")
"""per distance and initialisation: the spreads of `p` (depth 0) and `x`
(depth 1), the largest head's share of the increments, their participation
ratio, and the Lions term's share of the increments' norms"""


def distance_points(cfg: Theorem7Config, key, measure, delta: float):
    """`cfg.adjoint_points` points at distance `delta R` from random tokens of
    `measure` (random directions), and their labels (uniform in the ball)."""
    task = task_of(cfg)
    k1, k2, k3 = jax.random.split(key, 3)
    m, d = cfg.adjoint_points, cfg.dim
    tok = jax.random.randint(k1, (m,), 0, measure.num_points)
    u = jax.random.normal(k2, (m, d))
    u = u / jnp.linalg.norm(u, axis=-1, keepdims=True)
    z = measure.points[tok] + delta * task.radius * u
    k4, k5 = jax.random.split(k3)
    v = jax.random.normal(k4, (m, d))
    v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    zl = task.radius * v * jax.random.uniform(k5, (m, 1)) ** (1 / d)
    return z, zl


@partial(jax.jit, static_argnames=("beta",))
def adjoint_outputs(params, measure, loss, z, zl, beta):
    """Per initialisation (leading axis of `params`): the state at depth 1 and
    the adjoint at depth 0 of the test points `z` `(R, m, d)`; the norms of
    each head's increment `c_{l,h}`, of its Lions part and of its local part,
    `(R, L, H, m)` each; the adjoint recursion rebuilt from the increments and
    the solver's, `(R, L, m, d)` each (their agreement checks the
    measurement)."""
    field = mfattn.AttentionField(beta, mfattn.DenseKernel())
    w = measure.weights

    def one(p):
        s = mfattn.solve_discrete(p, measure, loss, beta, z, test_labels=zl)
        L, H = p.Q.shape[:2]

        def layer(l):
            mu = mfattn.EmpiricalMeasure(s.xs[l], w)

            def head(h):
                ph = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a[l], h, 1), p)
                J = field.grad_x(s.test_xs[l], mu, ph)  # (m, d, d)
                lam = field.lions_derivative(s.xs[l], mu, ph, s.test_xs[l])  # (n, m, d, d)
                local = jnp.einsum("mij,mi->mj", J, s.test_ps[l + 1])
                lions = jnp.einsum("nmij,n,ni->mj", lam, w, s.ps[l + 1])
                return local, lions

            return jax.vmap(head)(jnp.arange(H))  # (H, m, d) each

        local, lions = jax.lax.map(layer, jnp.arange(L))  # (L, H, m, d) each
        inc = local + lions
        rebuilt = s.test_ps[1:] + inc.mean(axis=1) / L  # p^l from p^{l+1}
        norm = lambda v: jnp.linalg.norm(v, axis=-1)
        return (
            s.test_xs[-1],
            s.test_ps[0],
            norm(inc),
            norm(lions),
            norm(local),
            rebuilt,
            s.test_ps[:-1],
        )

    return jax.vmap(one)(params)


def _spread(v):
    """Per initialisation the sup over points of `|v_r - mean v|`, scaled by
    `sqrt(R / (R - 1))` (`v` `(R, m, d)`)."""
    R = v.shape[0]
    return np.sqrt(R / (R - 1)) * np.linalg.norm(v - v.mean(axis=0), axis=-1).max(axis=1)


def _carriers(c):
    """`c` `(R, L, H, m)`: per initialisation, the mean over points of the
    largest head's share of the increments and of the participation ratio."""
    R, L, H, m = c.shape
    c = c.reshape(R, L * H, m)
    total = c.sum(axis=1)
    share = (c.max(axis=1) / np.maximum(total, 1e-300)).mean(axis=1)
    pr = (total**2 / np.maximum(L * H * (c**2).sum(axis=1), 1e-300)).mean(axis=1)
    return share, pr


def _lions_share(lions, local):
    """`lions`, `local` `(R, L, H, m)` norms of the two parts of each head's
    increment: per initialisation, the mean over points of `sum |lions| /
    sum (|lions| + |local|)` over the `L H` heads."""
    total = (lions + local).sum(axis=(1, 2))
    return (lions.sum(axis=(1, 2)) / np.maximum(total, 1e-300)).mean(axis=1)


def adjoint_point(cfg: Theorem7Config, H: int) -> dict:
    """Part 1's `cfg.inits` models at `(cfg.adjoint_L, H)`, at `k = 0` and after
    `cfg.steps` steps, at test points at each distance of
    `cfg.adjoint_distances` from the tokens of part 1's token sets: per
    distance and initialisation the spreads of `p` (depth 0) and `x` (depth 1),
    the largest head's share and the participation ratio; per distance the
    size of the mean `p`, and the largest deviation of the rebuilt adjoint
    recursion from the solver's (a check of the measurement)."""
    L = cfg.adjoint_L
    data_key, probe_key, init_key = keys_of(cfg, "fluctuation")  # part 1's models
    probes = probes_of(cfg, probe_key)
    params = inits_of(cfg, init_key, L, H, cfg.inits)
    trained, losses = train_inits(cfg, params, data_key, cfg.steps)
    point_key = keys_of(cfg, "adjoint")[1]
    rec = {"L": L, "H": H, "inits": cfg.inits, "steps": cfg.steps}
    rec["distances"] = list(cfg.adjoint_distances)
    for name, p in (("k0", params), ("kK", trained)):
        rows = {q: [] for q in QUANTITIES}
        scale, check = [], 0.0
        for i, delta in enumerate(cfg.adjoint_distances):
            ps, xs, cs, lions, local = [], [], [], [], []
            for j, (measure, loss, _, _) in enumerate(probes):
                key = jax.random.fold_in(point_key, 1000 * j + i)
                z, zl = distance_points(cfg, key, measure, delta)
                x, pz, c, li, lo, rebuilt, solver = adjoint_outputs(
                    p, measure, loss, z, zl, cfg.beta
                )
                size = float(np.abs(np.asarray(solver)).max())
                check = max(
                    check, float(np.abs(np.asarray(rebuilt) - np.asarray(solver)).max()) / size
                )
                ps.append(np.asarray(pz))
                xs.append(np.asarray(x))
                cs.append(np.asarray(c))
                lions.append(np.asarray(li))
                local.append(np.asarray(lo))
            pz, x = np.concatenate(ps, axis=1), np.concatenate(xs, axis=1)  # every probe's
            c, li, lo = (np.concatenate(a, axis=-1) for a in (cs, lions, local))
            rows["p_spread"].append(_spread(pz).tolist())
            rows["x_spread"].append(_spread(x).tolist())
            share, pr = _carriers(c)
            rows["share"].append(share.tolist())
            rows["participation"].append(pr.tolist())
            rows["lions_share"].append(_lions_share(li, lo).tolist())
            scale.append(float(np.linalg.norm(pz.mean(axis=0), axis=-1).max()))
        rec[name] = {**rows, "p_scale": scale, "recursion_check": check}
    losses = np.asarray(losses)
    rec["train_loss_first"] = float(losses[0].mean())
    rec["train_loss_last"] = float(losses[-max(1, cfg.steps // 10) :].mean())
    return rec


def adjoint_records(points: list[dict]) -> list[dict]:
    """One record per `(H, k, distance)`: the means over initialisations with
    `t` intervals of the spreads, the head share and the participation ratio,
    and the size of the mean adjoint."""
    out = []
    for p in sorted(points, key=lambda p: p["H"]):
        for k_name in ("k0", "kK"):
            r = p[k_name]
            for i, delta in enumerate(p["distances"]):
                rec = {
                    "L": p["L"],
                    "H": p["H"],
                    "k": 0 if k_name == "k0" else p["steps"],
                    "distance": delta,
                    "inits": p["inits"],
                    "p_scale": r["p_scale"][i],
                }
                for q in QUANTITIES:
                    t = mfattn.t_interval(np.asarray(r[q][i], float), min_samples=8)
                    rec[q] = t["estimate"]
                    rec[q + "_ci"] = list(t["ci"])
                out.append(rec)
    return out


def adjoint_fits(points: list[dict]) -> list[dict]:
    """Per `k` and distance: the exponent in `H` of the spread of `p` and of
    `x`, with jackknife intervals over initialisations (the draws at
    different `H` are independent, so deleting index `r` at every `H` is a
    delete-one jackknife of independent blocks)."""
    pts = sorted(points, key=lambda p: p["H"])
    if len(pts) < 2:
        return []
    out = []
    Hs = [p["H"] for p in pts]
    for k_name in ("k0", "kK"):
        for i, delta in enumerate(pts[0]["distances"]):
            rec = {"k": 0 if k_name == "k0" else pts[0]["steps"], "distance": delta, "H": Hs}
            for q in ("p_spread", "x_spread"):
                f = mfattn.power_law_fit(
                    {"H": Hs}, np.array([p[k_name][q][i] for p in pts]), min_samples=8
                )
                rec[q] = f["H"]
                rec[q + "_ci"] = f["H_ci"]
            out.append(rec)
    return out
