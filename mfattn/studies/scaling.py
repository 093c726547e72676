"""The convergence study (docs/theory.md, section 7): how far a trained finite
transformer (`L` layers, `H` heads) is from its trained mean-field limit, where
training matters.

    python -m benchmarks.scaling --quick       # the quick preset (minutes)
    python -m benchmarks.scaling --medium      # ~30 minutes on 2 idle cores
    python -m benchmarks.scaling               # the full preset (see PRESETS)
    python -m mfattn                           # = the quick preset

**The regime.** `nu_0` ties `O = V` (`Q, K, V` Xavier-uniform, `O = V`): it is
compactly supported, `E[O V^T] = (k a^2 / 3) I != 0`, so the limit moves from
`k = 0` and the Euler (`1/L`) term is present at initialisation. Tokens are
the in-context denoising task rescaled to RMS norm (`x / sqrt(d)`, the labels
too; Remark 8), so errors are RMS errors of the original variables. Both
models are trained `K` steps on the same data stream with the same optimiser;
the learning rate is a common per-block schedule: every optimiser moves a
`d x k` block by about `eta` (Frobenius) per step (AdamW and blockwise "mean"
at `eta / sqrt(d k)`, blockwise "sum" at `eta`).

**What is measured**, per condition (task, optimiser) and grid point `(L, H)`,
from `R` initialisations and `P` probe token sets (each with random test
particles `z` in the ball that covers the data's support), at the recorded
training steps `k`:

- the error `max_l |z_k^l - z_k(l/L)| + |p_k^l - p_k(l/L)|` (sup over `z`,
  max over probes, layers and recorded steps), split into a bias (the error of
  the mean over initialisations) and a fluctuation (`mfattn.bias_fluctuation`);
  the sup over `z` is refined by an adversarial ascent with restarts
  (`mfattn.adversarial_sup`, central-difference gradients) at the step where
  each initialisation's error peaks;
- Lemma 6: every discrete head pushed through the limit's training as a test
  parameter (`mfattn.train_coupled`), `max_k max_{l,h} |theta^k - theta~^k|`;
- the limit's own error at every recorded step: `J` against `2J` depth nodes
  and `M` against `4M` particles (independent draws); points whose reference
  error exceeds a fifth of the error they are compared with are excluded from
  the fits and marked;
- the limit's displacement `max_z |z_k(1) - z_0(1)|`.

Results go, per condition, to `<out>_points/<condition>.json` (an interrupted
run resumes there; a failed condition is recorded with its error and skipped),
and together with the fits (`mfattn.power_law_fit`, `mfattn.jackknife`: `t`
intervals over initialisations, never from fewer than 4) to `<out>.json` and
a PNG per question.
"""

import argparse
import json
import pathlib
import time
import traceback
import zlib
from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mfattn

# --- presets ------------------------------------------------------------------
_COMMON = dict(
    seed=2026,
    head_dim=4,
    clusters=3,
    beta=1.0,
    eta=0.02,
    weight_decay=1e-3,
    restarts=2,
    adversarial_steps=4,
    adversarial_step_size=0.15,
)
PRESETS = {
    # minutes: the main condition only, on a grid small enough (L H <= 8) for a
    # J M = 512 reference; what it can show is limited, and it says so
    "quick": dict(
        _COMMON,
        dim=4,
        tokens=8,
        batch=4,
        steps=20,
        record_every=10,
        nodes=8,
        particles=64,
        sweep_particles=64,
        L=[1, 2],
        H=[2, 4],
        inits=4,
        probes=2,
        n_sweep=[],
        causal_sweep=False,
        d_sweep=[],
        optimizers=["adamw"],
        sweep_LH=[2, 4],
    ),
    # about 30 minutes on 2 idle cores: the grid L H <= 64 against J M = 2048
    # (the limit's Monte-Carlo error is about sqrt(L H / (J M)) of the
    # fluctuation, so it stays below a fifth of it), the sweeps at (2, 4)
    "medium": dict(
        _COMMON,
        dim=4,
        tokens=8,
        batch=4,
        steps=60,
        record_every=15,
        nodes=16,
        particles=128,
        sweep_particles=64,
        L=[1, 2, 4],
        H=[4, 16],
        inits=6,
        probes=2,
        n_sweep=[4, 8, 16],
        causal_sweep=True,
        d_sweep=[2, 4, 16],
        optimizers=["adamw", "blockwise_sum", "blockwise_mean"],
        sweep_LH=[2, 4],
    ),
    # not run on the 2-core machine (see benchmarks/README.md for its cost)
    "full": dict(
        _COMMON,
        dim=4,
        tokens=8,
        batch=8,
        steps=200,
        record_every=20,
        nodes=64,
        particles=512,
        sweep_particles=256,
        L=[2, 4, 8, 16],
        H=[4, 16, 64],
        inits=16,
        probes=4,
        n_sweep=[4, 8, 16, 32, 64],
        causal_sweep=True,
        d_sweep=[2, 4, 8, 16, 32],
        optimizers=["adamw", "blockwise_sum", "blockwise_mean"],
        sweep_LH=[4, 16],
    ),
}


# --- the task, the law nu_0, the optimisers --------------------------------------
class RMSTask(eqx.Module):
    """[`mfattn.DenoisingTask`][] rescaled to RMS norm: tokens and labels divided
    by `sqrt(d)` (Remark 8 of docs/theory.md, section 7)."""

    task: mfattn.DenoisingTask

    @property
    def scale(self) -> float:
        return 1.0 / float(np.sqrt(self.task.dim))

    @property
    def radius(self) -> float:
        """A ball around 0 that holds every token: centres in `[-1, 1]^d`,
        offsets and noise truncated at 2 standard deviations per coordinate."""
        t = self.task
        return float(self.scale * np.sqrt(t.dim) * (1 + 2 * (t.spread + t.noise)))

    def sample(self, key):
        measure, loss = self.task.sample(key)
        return (
            mfattn.EmpiricalMeasure(measure.points * self.scale),
            mfattn.DenoisingLoss(loss.targets * self.scale),
        )

    def __call__(self, key, batch_size: int):
        return jax.vmap(self.sample)(jax.random.split(key, batch_size))


def tied_init(key, depth, heads, dim, head_dim):
    """`nu_0` with `O = V`: `Q, K, V` Xavier-uniform, i.i.d. over depth and heads."""
    p = mfattn.AttentionParams.xavier_uniform(key, depth, heads, dim, head_dim)
    return mfattn.AttentionParams(p.Q, p.K, p.V, p.V)


def make_optimizer(name, eta, dim, head_dim, weight_decay):
    """The optimiser `name` with the common per-block step `eta`."""
    per_entry = eta / np.sqrt(dim * head_dim)
    if name == "adamw":
        return optax.adamw(per_entry, weight_decay=weight_decay)
    if name == "blockwise_sum":
        return mfattn.blockwise_adamw(eta, weight_decay=weight_decay, reduction="sum")
    if name == "blockwise_mean":
        return mfattn.blockwise_adamw(per_entry, weight_decay=weight_decay, reduction="mean")
    raise ValueError(f"unknown optimiser {name!r}")


def condition_name(dim, tokens, opt, causal=False):
    return f"d{dim}-n{tokens}-{opt}" + ("-causal" if causal else "")


# --- evaluation (compiled once per shape) -----------------------------------------
@partial(jax.jit, static_argnames=("beta", "kernel", "T"))
def _limit_eval(grid, measure, loss, z, zl, beta, kernel, T):
    """The limit's test particles and adjoints at `t = j / T`, `(T+1, m, d)` each."""
    sol = mfattn.solve_limit(
        grid,
        measure,
        loss,
        beta,
        z,
        test_labels=zl,
        ts=jnp.arange(T + 1) / T,
        interpolation="constant",
        kernel=kernel,
    )
    return sol.test_xs, sol.test_ps


@partial(jax.jit, static_argnames=("beta", "kernel"))
def _discrete_eval(params, measures, losses, z, zl, beta, kernel):
    """Per initialisation `r`: its params `(R, L, H, d, k)`, token set, and test
    particles `(R, m, d)`: states and adjoints `(R, L+1, m, d)`."""

    def one(p, m, lo, zz, ll):
        sol = mfattn.solve_discrete(p, m, lo, beta, zz, test_labels=ll, kernel=kernel)
        return sol.test_xs, sol.test_ps

    return jax.vmap(one)(params, measures, losses, z, zl)


def _tree_index(tree, i):
    return jax.tree.map(lambda a: jnp.asarray(a[i]), tree)


def _stack(tree, R):
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (R,) + a.shape), tree)


def _ball(key, m, d, radius):
    k1, k2 = jax.random.split(key)
    u = jax.random.normal(k1, (m, d))
    u = u / jnp.linalg.norm(u, axis=-1, keepdims=True)
    return radius * u * jax.random.uniform(k2, (m, 1)) ** (1 / d)


def _err(a, b):
    """`|a_x - b_x| + |a_p - b_p|` over the last axis."""
    return np.linalg.norm(a[0] - b[0], axis=-1) + np.linalg.norm(a[1] - b[1], axis=-1)


# --- one condition ------------------------------------------------------------------
class Condition:
    """One (task, optimiser) condition: the limit and its references, the
    discrete models of every grid point, trained on one data stream."""

    def __init__(self, cfg, dim, tokens, opt, causal, grid, particles=None):
        self.cfg, self.dim, self.tokens, self.opt_name = cfg, dim, tokens, opt
        self.causal, self.grid = causal, [tuple(g) for g in grid]
        self.kernel = mfattn.DenseKernel(causal=True) if causal else None
        self.task = RMSTask(
            mfattn.DenoisingTask(dim=dim, num_tokens=tokens, num_clusters=cfg["clusters"])
        )
        self.opt = make_optimizer(opt, cfg["eta"], dim, cfg["head_dim"], cfg["weight_decay"])
        # data, probes and initialisations depend on the task only: conditions
        # that differ by the optimiser or the mask share them
        root = jax.random.key(cfg["seed"])
        self.key = jax.random.fold_in(root, zlib.crc32(f"d{dim}-n{tokens}".encode()))
        self.train_key, self.probe_key, self.limit_key, self.init_key = jax.random.split(
            self.key, 4
        )
        self.Lmax = max(L for L, _ in self.grid)
        self.particles = cfg["particles"] if particles is None else particles
        self.R = cfg["inits"]
        self.block = cfg["restarts"] * (2 * dim + 1)  # test points per init per call
        self.m = self.R * self.block  # random test points per probe

    # ---- pieces
    def limit_model(self, nodes, particles, key):
        grid = tied_init(key, nodes, particles, self.dim, self.cfg["head_dim"])
        return mfattn.MeanFieldTransformer(
            grid, self.cfg["beta"], interpolation="constant", kernel=self.kernel
        )

    def discrete_inits(self, L, H):
        keys = [jax.random.fold_in(self.init_key, 1000 * L + H + 10**6 * r) for r in range(self.R)]
        ps = [tied_init(k, L, H, self.dim, self.cfg["head_dim"]) for k in keys]
        return jax.tree.map(lambda *a: jnp.stack(a), *ps)

    def probes(self):
        out = []
        for p in range(self.cfg["probes"]):
            k1, k2, k3 = jax.random.split(jax.random.fold_in(self.probe_key, p), 3)
            measure, loss = self.task.sample(k1)
            r = self.task.radius
            out.append(
                (measure, loss, _ball(k2, self.m, self.dim, r), _ball(k3, self.m, self.dim, r))
            )
        return out

    def train(self, nodes, particles, key, discrete):
        cfg = self.cfg
        return mfattn.train_coupled(
            self.limit_model(nodes, particles, key),
            discrete,
            self.task,
            self.opt,
            cfg["steps"],
            self.train_key,
            batch_size=cfg["batch"],
            record_every=cfg["record_every"],
        )

    def limit_states(self, traj, probes):
        """`(S, P)` list of (xs, ps), each `(Lmax+1, m, d)`."""
        beta = self.cfg["beta"]
        return [
            [
                tuple(
                    np.asarray(a)
                    for a in _limit_eval(
                        _tree_index(traj, s), m, lo, z, zl, beta, self.kernel, self.Lmax
                    )
                )
                for m, lo, z, zl in probes
            ]
            for s in range(traj.Q.shape[0])
        ]

    def discrete_states(self, traj, probe):
        """`(S, R, L+1, m, d)` states and adjoints of every init at a probe's
        random test particles (in blocks of the adversarial call's size)."""
        measure, loss, z, zl = probe
        R, b = self.R, self.block
        ms, ls = _stack(measure, R), _stack(loss, R)
        xs, ps = [], []
        for s in range(traj.Q.shape[0]):
            params = _tree_index(traj, s)
            bx, bp = [], []
            for i in range(R):
                zz = _stack(z[i * b : (i + 1) * b], R)
                zzl = _stack(zl[i * b : (i + 1) * b], R)
                x, p = _discrete_eval(params, ms, ls, zz, zzl, self.cfg["beta"], self.kernel)
                bx.append(np.asarray(x))
                bp.append(np.asarray(p))
            xs.append(np.concatenate(bx, axis=2))
            ps.append(np.concatenate(bp, axis=2))
        return np.stack(xs), np.stack(ps)

    # ---- the adversarial sup for one grid point
    def adversarial(self, disc_traj, lim_traj, probes, per_init_step_probe, err_random):
        """Ascent from each init's `restarts` worst random `z` (at the step and
        probe where its error peaks): returns the best error per init."""
        cfg, R, b, c, d = self.cfg, self.R, self.block, self.cfg["restarts"], self.dim
        h = 1e-5 * self.task.radius
        best = np.array(err_random, float)
        groups = {}
        for r, (s, p, worst) in enumerate(per_init_step_probe):
            groups.setdefault((s, p), []).append((r, worst))
        for (s, p), members in groups.items():
            measure, loss, z, zl = probes[p]
            lim = _tree_index(lim_traj, s)
            params = _tree_index(disc_traj, s)
            ms, ls = _stack(measure, R), _stack(loss, R)
            # starts and labels, per init (the members; the others ride along)
            starts = np.zeros((R, c, d))
            labels = np.zeros((R, c, d))
            for r, worst in members:
                starts[r] = np.asarray(z)[worst]
                labels[r] = np.asarray(zl)[worst]

            def value_and_grad(
                flat, labels=labels, ms=ms, ls=ls, lim=lim, params=params, probe=probes[p]
            ):
                measure, loss, every = probe[0], probe[1], self.Lmax // params.Q.shape[1]
                # flat (R c, d) -> the error of each point and its central-difference gradient
                pts = flat.reshape(R, c, d)
                eye = h * np.eye(d)
                sten = np.concatenate(
                    [pts[:, :, None], pts[:, :, None] + eye, pts[:, :, None] - eye], axis=2
                ).reshape(R, b, d)
                lab = np.repeat(labels, 2 * d + 1, axis=1).reshape(R, b, d)
                lx, lp = _limit_eval(
                    lim,
                    measure,
                    loss,
                    jnp.asarray(sten.reshape(R * b, d)),
                    jnp.asarray(lab.reshape(R * b, d)),
                    cfg["beta"],
                    self.kernel,
                    self.Lmax,
                )
                lx = np.asarray(lx)[::every].reshape(-1, R, b, d).transpose(1, 0, 2, 3)
                lp = np.asarray(lp)[::every].reshape(-1, R, b, d).transpose(1, 0, 2, 3)
                dx, dp = _discrete_eval(
                    params, ms, ls, jnp.asarray(sten), jnp.asarray(lab), cfg["beta"], self.kernel
                )
                e = _err((np.asarray(dx), np.asarray(dp)), (lx, lp)).max(axis=1)  # (R, b)
                e = e.reshape(R, c, 2 * d + 1)
                grad = (e[..., 1 : d + 1] - e[..., d + 1 :]) / (2 * h)
                return jnp.asarray(e[..., 0].reshape(R * c)), jnp.asarray(grad.reshape(R * c, d))

            res = mfattn.adversarial_sup(
                None,
                jnp.asarray(starts.reshape(R * c, d)),
                self.task.radius,
                steps=cfg["adversarial_steps"],
                step_size=cfg["adversarial_step_size"],
                value_and_grad=value_and_grad,
            )
            vals = np.asarray(res.values).reshape(R, c).max(axis=1)
            for r, _ in members:
                best[r] = max(best[r], vals[r])
        return best

    # ---- the whole condition
    def run(self, log=print):
        cfg, R = self.cfg, self.R
        t0 = time.perf_counter()
        probes = self.probes()
        inits = [self.discrete_inits(L, H) for L, H in self.grid]
        J, M = cfg["nodes"], self.particles
        main = self.train(J, M, self.limit_key, inits)
        log(f"  trained the limit (J={J}, M={M}) and {len(inits)} grid points")
        # references: M vs 4M (with the test parameters), J vs 2J
        big = self.train(J, 4 * M, jax.random.fold_in(self.limit_key, 4), inits)
        fine = self.train(2 * J, M, jax.random.fold_in(self.limit_key, 2), [])
        log("  trained the references (J, 4M) and (2J, M)")
        lim = self.limit_states(main.limit, probes)
        lim_big = self.limit_states(big.limit, probes)
        lim_fine = self.limit_states(fine.limit, probes)
        S = len(main.steps)
        # reference errors per step (max over probes, z and t = l / Lmax)
        ref_M = [
            max(_err(lim[s][p], lim_big[s][p]).max() for p in range(len(probes))) for s in range(S)
        ]
        ref_J = [
            max(_err(lim[s][p], lim_fine[s][p]).max() for p in range(len(probes))) for s in range(S)
        ]
        disp = [
            max(
                np.linalg.norm(lim[s][p][0][-1] - lim[0][p][0][-1], axis=-1).max()
                for p in range(len(probes))
            )
            for s in range(S)
        ]
        out = {
            "condition": condition_name(self.dim, self.tokens, self.opt_name, self.causal),
            "dim": self.dim,
            "tokens": self.tokens,
            "opt": self.opt_name,
            "causal": self.causal,
            "steps": main.steps.tolist(),
            "reference": {
                "M_vs_4M": [float(x) for x in ref_M],
                "J_vs_2J": [float(x) for x in ref_J],
                "nodes": J,
                "particles": M,
            },
            "displacement": [float(x) for x in disp],
            "limit_loss": main.limit_loss.tolist(),
            "points": {},
        }
        for j, (L, H) in enumerate(self.grid):
            every = self.Lmax // L
            per_probe = []  # (S, R, L+1, m) errors, per probe
            xs_all, ps_all, lx_all, lp_all = [], [], [], []
            for p, probe in enumerate(probes):
                xs, ps = self.discrete_states(main.discrete[j], probe)  # (S, R, L+1, m, d)
                lx = np.stack([lim[s][p][0][::every] for s in range(S)])  # (S, L+1, m, d)
                lp = np.stack([lim[s][p][1][::every] for s in range(S)])
                per_probe.append(_err((xs, ps), (lx[:, None], lp[:, None])))
                xs_all.append(xs)
                ps_all.append(ps)
                lx_all.append(lx)
                lp_all.append(lp)
            E = np.stack(per_probe)  # (P, S, R, L+1, m)
            per_step = E.max(axis=(0, 3, 4)).T  # (R, S): random z
            total_random = per_step.max(axis=1)
            # bias and fluctuation: samples (R, P, S, L+1, m, d) against the limit
            X = np.stack(xs_all, axis=1).transpose(2, 1, 0, 3, 4, 5)  # (R, P, S, L+1, m, d)
            Pp = np.stack(ps_all, axis=1).transpose(2, 1, 0, 3, 4, 5)
            LX = np.stack(lx_all)  # (P, S, L+1, m, d)
            LP = np.stack(lp_all)
            bf = mfattn.bias_fluctuation((X, Pp), (LX, LP))
            loo = [
                float(
                    mfattn.bias_fluctuation(
                        (np.delete(X, i, 0), np.delete(Pp, i, 0)), (LX, LP)
                    ).bias
                )
                for i in range(R)
            ]
            bias_step = [
                float(mfattn.bias_fluctuation((X[:, :, s], Pp[:, :, s]), (LX[:, s], LP[:, s])).bias)
                for s in range(S)
            ]
            fluct_step = [
                np.asarray(
                    mfattn.bias_fluctuation(
                        (X[:, :, s], Pp[:, :, s]), (LX[:, s], LP[:, s])
                    ).fluctuation
                ).tolist()
                for s in range(S)
            ]
            # the adversarial sup, from each init's worst points at its peak
            where = []
            for r in range(R):
                s = int(per_step[r].argmax())
                p = int(E[:, s, r].max(axis=(1, 2)).argmax())
                worst = np.argsort(E[p, s, r].max(axis=0))[::-1][: cfg["restarts"]]
                where.append((s, p, worst))
            total = self.adversarial(main.discrete[j], main.limit, probes, where, total_random)

            # Lemma 6: |theta^k - theta~^k| (Frobenius over the head's 4 blocks)
            def head_dist(a, b):
                pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
                sq = sum(
                    np.sum((np.asarray(x) - np.asarray(y)) ** 2, axis=(-2, -1)) for x, y in pairs
                )
                return np.sqrt(sq)  # (S, R, L, H)

            lem = head_dist(main.discrete[j], main.test[j]).max(axis=(2, 3))  # (S, R)
            lem_ref = head_dist(main.test[j], big.test[j]).max(axis=(1, 2, 3))  # (S,)
            out["points"][f"L{L}/H{H}"] = {
                "L": L,
                "H": H,
                "total": total.tolist(),
                "total_random": total_random.tolist(),
                "per_step_random": per_step.tolist(),
                "peak_step": [int(w[0]) for w in where],
                "bias": float(bf.bias),
                "bias_loo": loo,
                "bias_noise": float(bf.noise),
                "bias_per_step": bias_step,
                "fluctuation": np.asarray(bf.fluctuation).tolist(),
                "fluctuation_per_step": fluct_step,
                "lemma6": lem.max(axis=0).tolist(),
                "lemma6_per_step": lem.T.tolist(),
                "lemma6_reference": lem_ref.tolist(),
                "discrete_loss": np.asarray(main.discrete_loss[j]).mean(axis=1).tolist(),
            }
            log(
                f"  L={L:3d} H={H:4d}: total {np.mean(total):.4g} "
                f"(random z {np.mean(total_random):.4g}) bias {float(bf.bias):.4g} "
                f"fluct {np.mean(bf.fluctuation):.4g} lemma6 {np.mean(lem.max(0)):.4g}"
            )
        out["wall_seconds"] = time.perf_counter() - t0
        return out


# --- orchestration ----------------------------------------------------------------
def conditions(cfg):
    """`{name: (dim, tokens, opt, causal, grid)}`: the main grid, then the sweeps."""
    grid = [(L, H) for L in cfg["L"] for H in cfg["H"]]
    sweep = [tuple(cfg["sweep_LH"])]
    out = {}

    def add(dim, tokens, opt, causal, pts):
        name = condition_name(dim, tokens, opt, causal)
        if name in out:
            have = out[name][4]
            out[name] = (dim, tokens, opt, causal, have + [p for p in pts if p not in have])
        else:
            out[name] = (dim, tokens, opt, causal, list(pts))

    add(cfg["dim"], cfg["tokens"], cfg["optimizers"][0], False, grid)
    for n in cfg["n_sweep"]:
        add(cfg["dim"], n, cfg["optimizers"][0], False, sweep)
        if cfg["causal_sweep"]:
            add(cfg["dim"], n, cfg["optimizers"][0], True, sweep)
    for opt in cfg["optimizers"] if cfg["d_sweep"] else []:
        for d in cfg["d_sweep"]:
            add(d, cfg["tokens"], opt, False, sweep)
    return out


def _paths(preset, out):
    cfg = dict(PRESETS[preset]) if isinstance(preset, str) else dict(preset)
    name = preset if isinstance(preset, str) else "custom"
    out = pathlib.Path(out or f"benchmarks/results/scaling_{name}.json")
    return cfg, out, out.with_name(out.stem + "_points")


def run(preset="quick", out=None, *, progress=True, retry_failed=False, summarize_only=False):
    """Run (or resume) the study with a preset name (or a dict of the same
    keys); write the per-condition results, `out` (JSON) and its PNGs, and
    return the JSON data. With `summarize_only`, only rebuild `out` and the
    PNGs from the per-condition results already there.

    **Raises:** `ValueError` if the results directory holds another configuration.
    """
    cfg, out, pdir = _paths(preset, out)
    pdir.mkdir(parents=True, exist_ok=True)
    cfg_file = pdir / "config.json"
    if cfg_file.exists() and json.loads(cfg_file.read_text()) != cfg:
        raise ValueError(f"{pdir} holds results of another configuration; pass another `out`")
    cfg_file.write_text(json.dumps(cfg, indent=1))
    log = print if progress else (lambda *a, **k: None)
    t0 = time.perf_counter()
    conds = conditions(cfg)
    for i, (cname, (dim, tokens, opt, causal, grid)) in enumerate(conds.items()):
        if summarize_only:
            break
        f = pdir / f"{cname}.json"
        if f.exists():
            old = json.loads(f.read_text())
            if old.get("status") != "failed" or not retry_failed:
                log(f"[{i + 1}/{len(conds)}] {cname}: {old.get('status', 'done')} (skipped)")
                continue
        log(f"[{i + 1}/{len(conds)}] {cname}: grid {grid}")
        try:
            main = cname == condition_name(cfg["dim"], cfg["tokens"], cfg["optimizers"][0])
            M = cfg["particles"] if main else cfg.get("sweep_particles", cfg["particles"])
            res = Condition(cfg, dim, tokens, opt, causal, grid, M).run(log)
            res["status"] = "done"
        except Exception as e:  # a failed point is recorded and skipped
            res = {"status": "failed", "error": repr(e), "traceback": traceback.format_exc()}
            log(f"  FAILED: {e!r}")
        f.write_text(json.dumps(res, indent=1))
    # the JSON: the configuration (with the short names), every
    # condition's raw results, the fits
    short = dict(n=cfg["tokens"], d=cfg["dim"], K=cfg["steps"], J=cfg["nodes"], M=cfg["particles"])
    data = {"config": dict(cfg, **short), "points": {}, "failed": {}}
    for cname in conds:
        f = pdir / f"{cname}.json"
        if f.exists():
            res = json.loads(f.read_text())
            (data["failed"] if res.get("status") == "failed" else data["points"])[cname] = res
    data["not_run"] = [c for c in conds if c not in data["points"] and c not in data["failed"]]
    data["wall_seconds_this_run"] = time.perf_counter() - t0
    data["wall_seconds"] = sum(p.get("wall_seconds", 0.0) for p in data["points"].values())
    data.update(summarize(data))
    out.write_text(json.dumps(data, indent=1))
    plot(data, out)
    if progress:
        print(report(data))
    return data


# --- fits -----------------------------------------------------------------------------
def _mean_ci(x):
    x = np.asarray(x, float)
    if x.size < 4:
        return {"mean": float(x.mean()), "n": int(x.size), "ci": None}
    t = mfattn.t_interval(x)
    return {"mean": t["estimate"], "n": t["n"], "ci": t["ci"]}


def _fit(cov, per_init):
    per_init = np.asarray(per_init, float)
    if per_init.shape[1] < 4 or per_init.shape[0] <= len(cov):
        return None
    return mfattn.power_law_fit(cov, per_init)


def _flags(pt, ref):
    """Which quantities of a point its reference error disqualifies (reference
    above a fifth of the quantity at the step where the quantity peaks)."""
    ref = np.maximum(np.asarray(ref["M_vs_4M"]), np.asarray(ref["J_vs_2J"]))
    per_step = np.asarray(pt["per_step_random"]).mean(axis=0)
    s = int(per_step.argmax())
    bias_step = np.asarray(pt["bias_per_step"])
    sb = int(bias_step.argmax())
    lem = np.asarray(pt["lemma6_per_step"]).mean(axis=0)
    sl = int(lem.argmax())
    return {
        "total": bool(ref[s] > per_step[s] / 5),
        "bias": bool(ref[sb] > bias_step[sb] / 5),
        # the fluctuation is measured among initialisations: the limit plays no part
        "fluctuation": False,
        "lemma6": bool(pt["lemma6_reference"][sl] > lem[sl] / 5),
        "reference_at_peak": float(ref[s]),
        "bias_resolved": bool(pt["bias"] > 2 * pt["bias_noise"]),
    }


def summarize(data):
    """Fits from the per-condition results: `{"fits": ..., "reference": ...,
    "displacement": ..., "table": ...}` (what the study's JSON adds)."""
    cfg, pts = data["config"], data["points"]
    fits, marks = {}, {}
    main = condition_name(cfg["dim"], cfg["tokens"], cfg["optimizers"][0])
    reference, displacement = {}, {}
    for cname, c in pts.items():
        reference[cname] = c["reference"]
        displacement[cname] = c["displacement"]
        marks[cname] = {k: _flags(p, c["reference"]) for k, p in c["points"].items()}
    if main in pts:
        c = pts[main]
        P = c["points"]
        ok = lambda k, q: not marks[main][k][q]
        grid = list(P)
        Hmax = max(P[k]["H"] for k in grid)
        Lmax = max(P[k]["L"] for k in grid)
        # bias against L at the largest H (jackknife over inits of the slope)
        keys = [k for k in grid if P[k]["H"] == Hmax and ok(k, "bias")]
        if len(keys) >= 2 and cfg["inits"] >= 4:
            Ls = np.array([P[k]["L"] for k in keys], float)
            full = np.array([P[k]["bias"] for k in keys])
            loo = np.array([P[k]["bias_loo"] for k in keys])  # (points, R)
            R = loo.shape[1]

            def slope(idx):
                b = full if len(idx) == R else loo[:, np.setdiff1d(np.arange(R), idx)[0]]
                return np.polyfit(np.log(Ls), np.log(b), 1)[0]

            jk = mfattn.jackknife(slope, R)
            fits["bias_vs_L"] = {
                "H": Hmax,
                "L": Ls.tolist(),
                "bias": full.tolist(),
                "slope": jk["estimate"],
                "slope_ci": jk["ci"],
                "resolved": [marks[main][k]["bias_resolved"] for k in keys],
            }
        for q, name in [("fluctuation", "fluctuation"), ("total", "total"), ("lemma6", "lemma6")]:
            keys = [k for k in grid if ok(k, q if q != "total" else "total")]
            if len(keys) >= 4:
                cov = {"L": [P[k]["L"] for k in keys], "H": [P[k]["H"] for k in keys]}
                f = _fit(cov, [P[k][q] for k in keys])
                if f is not None:
                    f["points_used"] = keys
                    fits[f"{name}_vs_LH"] = f
        keys = [k for k in grid if ok(k, "total")]
        if len(keys) >= 5 and cfg["inits"] >= 4:
            fits["total_combined"] = mfattn.combined_fit(
                [P[k]["L"] for k in keys],
                [P[k]["H"] for k in keys],
                [P[k]["total"] for k in keys],
                interval="jackknife",
            )
        for axis, fixed, var in [("L", "H", Hmax), ("H", "L", Lmax)]:
            keys = [k for k in grid if P[k][fixed] == var and ok(k, "total")]
            if len(keys) >= 2:
                f = _fit({axis: [P[k][axis] for k in keys]}, [P[k]["total"] for k in keys])
                if f is not None:
                    fits[f"total_vs_{axis}"] = dict(f, at={fixed: var})
        # the horizon: error per recorded step at every grid point
        fits["horizon"] = {
            k: {
                "steps": c["steps"],
                "per_step": [_mean_ci(col) for col in np.asarray(P[k]["per_step_random"]).T],
                "bias_per_step": P[k]["bias_per_step"],
            }
            for k in grid
        }
    # tokens (masked and unmasked) and dimension (per optimiser) sweeps
    L, H = cfg["sweep_LH"]
    at = f"L{L}/H{H}"
    for causal in (False, True):
        ns = [
            n
            for n in cfg["n_sweep"]
            if condition_name(cfg["dim"], n, cfg["optimizers"][0], causal) in pts
        ]
        rows = [
            pts[condition_name(cfg["dim"], n, cfg["optimizers"][0], causal)]["points"].get(at)
            for n in ns
        ]
        flag = [
            marks[condition_name(cfg["dim"], n, cfg["optimizers"][0], causal)].get(at, {})
            for n in ns
        ]
        keep = [r is not None and not f.get("total", True) for r, f in zip(rows, flag)]
        excluded = [n for n, k in zip(ns, keep) if not k]
        ns = [n for n, k in zip(ns, keep) if k]
        rows = [r for r, k in zip(rows, keep) if k]
        if len(ns) >= 2:
            tag = "causal" if causal else "unmasked"
            fits[f"total_vs_n_{tag}"] = dict(
                _fit({"n": ns}, [r["total"] for r in rows]) or {},
                x=ns,
                excluded=excluded,
                total=[_mean_ci(r["total"]) for r in rows],
                bias=[r["bias"] for r in rows],
            )
    lemma6 = {}
    for opt in cfg["optimizers"]:
        ds = [d for d in cfg["d_sweep"] if condition_name(d, cfg["tokens"], opt) in pts]
        rows = [pts[condition_name(d, cfg["tokens"], opt)]["points"].get(at) for d in ds]
        flag = [marks[condition_name(d, cfg["tokens"], opt)].get(at, {}) for d in ds]
        keep = [r is not None and not f.get("lemma6", True) for r, f in zip(rows, flag)]
        excluded = [d for d, k in zip(ds, keep) if not k]
        ds = [d for d, k in zip(ds, keep) if k]
        rows = [r for r, k in zip(rows, keep) if k]
        if len(ds) >= 2:
            lemma6[opt] = dict(
                _fit({"d": ds}, [r["lemma6"] for r in rows]) or {},
                x=ds,
                excluded=excluded,
                lemma6=[_mean_ci(r["lemma6"]) for r in rows],
                total=[_mean_ci(r["total"]) for r in rows],
                total_fit=_fit({"d": ds}, [r["total"] for r in rows]),
            )
    if lemma6:
        fits["lemma6"] = lemma6
    return {"fits": fits, "marks": marks, "reference": reference, "displacement": displacement}


# --- plots and text ------------------------------------------------------------------
def plot(data, out):
    """One PNG per question next to `out`: `_LH` (error, bias, fluctuation,
    Lemma 6 against L and H), `_horizon` (error against the training step),
    `_n` (tokens, masked and not), `_d` (Lemma 6 against d per optimiser)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, pts, fits = data["config"], data["points"], data["fits"]
    main = condition_name(cfg["dim"], cfg["tokens"], cfg["optimizers"][0])
    out = pathlib.Path(out)
    if main in pts:
        P = pts[main]["points"]
        ref = pts[main]["reference"]
        refmax = max(max(ref["M_vs_4M"]), max(ref["J_vs_2J"]))
        fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
        Hs = sorted({p["H"] for p in P.values()})
        for ax, q, title in [
            (axes[0], "total", "error (sup over z, adversarial)"),
            (axes[1], "bias", "bias (error of the mean over inits)"),
            (axes[2], "fluctuation", "fluctuation"),
            (axes[3], "lemma6", "Lemma 6: max |theta - theta~|"),
        ]:
            for i, H in enumerate(Hs):
                ks = sorted((k for k in P if P[k]["H"] == H), key=lambda k: P[k]["L"])
                Ls = [P[k]["L"] for k in ks]
                if q == "bias":
                    y = [P[k]["bias"] for k in ks]
                    ax.plot(Ls, y, "o-", color=f"C{i}", label=f"H = {H}")
                else:
                    m = [np.mean(P[k][q]) for k in ks]
                    ax.plot(Ls, m, "o-", color=f"C{i}", label=f"H = {H}")
                    for L, k in zip(Ls, ks):
                        ax.plot([L] * len(P[k][q]), P[k][q], ".", color=f"C{i}", alpha=0.3)
            if q != "lemma6":
                ax.axhline(refmax, color="k", lw=0.8, ls=":", label="limit's own error (max)")
            x = np.array(sorted({p["L"] for p in P.values()}), float)
            y0 = ax.get_lines()[0].get_ydata()[0]
            ax.plot(x, y0 * (x / x[0]) ** -1.0, "k--", lw=0.8, label="1/L")
            ax.plot(x, y0 * (x / x[0]) ** -0.5, "k-.", lw=0.8, label="L^-1/2")
            ax.set(xscale="log", yscale="log", xlabel="depth L", title=title)
            ax.set_xticks(x, [str(int(v)) for v in x])
            ax.minorticks_off()
            ax.legend(fontsize=7)
        fig.suptitle(
            f"{main}: {cfg['inits']} initialisations, K = {cfg['steps']} steps", fontsize=10
        )
        fig.tight_layout()
        fig.savefig(out.with_name(out.stem + "_LH.png"), dpi=100)
        plt.close(fig)
        # horizon
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        steps = pts[main]["steps"]
        for i, (k, h) in enumerate(fits.get("horizon", {}).items()):
            m = [e["mean"] for e in h["per_step"]]
            ax[0].plot(steps, m, "o-", color=f"C{i % 10}", label=k)
        ax[0].plot(
            steps, np.maximum(ref["M_vs_4M"], ref["J_vs_2J"]), "k:", label="limit's own error"
        )
        ax[0].set(
            yscale="log",
            xlabel="training step k",
            ylabel="mean error (random z)",
            title="error against the training step",
        )
        ax[0].legend(fontsize=6, ncol=2)
        ax[1].plot(
            steps,
            pts[main]["displacement"],
            "o-",
            label="limit displacement max_z |z_k(1) - z_0(1)|",
        )
        ax[1].plot(steps, ref["M_vs_4M"], "s--", label="M vs 4M")
        ax[1].plot(steps, ref["J_vs_2J"], "^--", label="J vs 2J")
        ax[1].set(yscale="log", xlabel="training step k", title="the limit moves; its own error")
        ax[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out.with_name(out.stem + "_horizon.png"), dpi=100)
        plt.close(fig)
    if any(k.startswith("total_vs_n_") for k in fits):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for tag, mk in [("unmasked", "o"), ("causal", "s")]:
            f = fits.get(f"total_vs_n_{tag}")
            if f:
                ax.plot(f["x"], [t["mean"] for t in f["total"]], mk + "-", label=tag)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="tokens n",
            ylabel="mean error",
            title=f"error against n at (L, H) = {tuple(cfg['sweep_LH'])}",
        )
        ax.set_xticks(cfg["n_sweep"], [str(n) for n in cfg["n_sweep"]])
        ax.minorticks_off()
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_name(out.stem + "_n.png"), dpi=100)
        plt.close(fig)
    if "lemma6" in fits:
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        for i, (opt, f) in enumerate(fits["lemma6"].items()):
            ax[0].plot(f["x"], [t["mean"] for t in f["lemma6"]], "o-", color=f"C{i}", label=opt)
            ax[1].plot(f["x"], [t["mean"] for t in f["total"]], "o-", color=f"C{i}", label=opt)
        for a, t in [(ax[0], "Lemma 6: max |theta - theta~|"), (ax[1], "error (RMS variables)")]:
            a.set(xscale="log", yscale="log", xlabel="dimension d", title=t)
            a.set_xticks(cfg["d_sweep"], [str(d) for d in cfg["d_sweep"]])
            a.minorticks_off()
            a.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out.with_name(out.stem + "_d.png"), dpi=100)
        plt.close(fig)


def _ci(f, k):
    ci = f.get(f"{k}_ci")
    return f"{f[k]:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else f"{f[k]:+.2f}"


def report(data) -> str:
    """What the data support, as text (printed at the end of a run)."""
    cfg, fits, pts = data["config"], data["fits"], data["points"]
    lines = [
        f"{len(pts)} conditions done, {len(data['failed'])} failed; "
        f"{cfg['inits']} inits, K = {cfg['steps']}"
    ]
    for name, c in pts.items():
        r = c["reference"]
        lines.append(
            f"{name}: limit displacement {max(c['displacement']):.3g}; own error M vs 4M "
            f"{max(r['M_vs_4M']):.3g}, J vs 2J {max(r['J_vs_2J']):.3g}"
        )
    if "bias_vs_L" in fits:
        f = fits["bias_vs_L"]
        lines.append(
            f"bias vs L (H = {f['H']}): slope {f['slope']:+.2f} "
            f"[{f['slope_ci'][0]:+.2f}, {f['slope_ci'][1]:+.2f}]"
        )
    for k in ("fluctuation_vs_LH", "total_vs_LH", "lemma6_vs_LH"):
        if k in fits:
            lines.append(f"{k}: L {_ci(fits[k], 'L')}, H {_ci(fits[k], 'H')}")
    for k in ("total_vs_n_unmasked", "total_vs_n_causal"):
        if k in fits and "n_ci" in fits[k]:
            lines.append(f"{k}: slope in n {_ci(fits[k], 'n')}")
    for opt, f in fits.get("lemma6", {}).items():
        if "d_ci" in f:
            lines.append(f"lemma6 vs d ({opt}): slope {_ci(f, 'd')}")
    return "\n".join(lines)


def table(data) -> str:
    """The main grid as Markdown: mean (t interval) of the error, bias,
    fluctuation and Lemma 6 distance per `(L, H)`."""
    cfg, pts = data["config"], data["points"]
    main = condition_name(cfg["dim"], cfg["tokens"], cfg["optimizers"][0])
    if main not in pts:
        return "(the main condition has not run)"
    P, marks = pts[main]["points"], data["marks"][main]
    fmt = lambda x: (
        f"{x['mean']:.4f} [{x['ci'][0]:.4f}, {x['ci'][1]:.4f}]" if x["ci"] else f"{x['mean']:.4f}"
    )
    lines = [
        f"Main condition `{main}`, {cfg['inits']} initialisations, K = {cfg['steps']} steps "
        "(95 % t intervals over initialisations; * = excluded from fits: the limit's own error "
        "is above a fifth of the quantity):",
        "",
        "| L | H | error (adversarial sup) | bias | fluctuation | Lemma 6 |",
        "| --: | --: | --: | --: | --: | --: |",
    ]
    for k, p in sorted(P.items(), key=lambda kv: (kv[1]["L"], kv[1]["H"])):
        m = marks[k]
        star = lambda q, m=m: "*" if m[q] else ""
        lines.append(
            f"| {p['L']} | {p['H']} | {fmt(_mean_ci(p['total']))}{star('total')} | "
            f"{p['bias']:.4f}{star('bias')}{'' if m['bias_resolved'] else ' (noise)'} | "
            f"{fmt(_mean_ci(p['fluctuation']))}{star('fluctuation')} | "
            f"{fmt(_mean_ci(p['lemma6']))}{star('lemma6')} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0]
    )
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the quick preset (minutes)")
    g.add_argument("--medium", action="store_true", help="~20-30 minutes on 2 cores")
    ap.add_argument(
        "--out", default=None, help="JSON output (PNGs and per-condition files next to it)"
    )
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--retry-failed", action="store_true", help="run failed conditions again")
    ap.add_argument("--table", action="store_true", help="print the Markdown table and exit")
    ap.add_argument(
        "--summarize",
        action="store_true",
        help="rebuild the JSON and PNGs from the per-condition files",
    )
    args = ap.parse_args(argv)
    preset = "quick" if args.quick else "medium" if args.medium else "full"
    out = pathlib.Path(args.out or f"benchmarks/results/scaling_{preset}.json")
    if args.table:
        print(table(json.loads(out.read_text())))
        return None
    jax.config.update("jax_enable_x64", True)  # the command line's choice, not the library's
    data = run(
        preset,
        out,
        progress=not args.no_progress,
        retry_failed=args.retry_failed,
        summarize_only=args.summarize,
    )
    print(f"written to {out} and its PNGs ({data['wall_seconds_this_run']:.0f} s)")
    return data
