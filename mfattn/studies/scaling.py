"""The convergence study (docs/theory.md, section 7): how far a trained finite
transformer (`L` layers, `H` heads) is from its trained mean-field limit, where
training matters.

    python -m benchmarks.scaling --quick       # the quick preset (minutes)
    python -m benchmarks.scaling --medium      # about 25 min on 2 cores
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
- the same for the state alone (`|z_k^l - z_k(l/L)|`) and the adjoint alone
  (random `z`), each against the limit's own error of that part (the sup of
  the sum is dominated by the adjoint, whose own error in the limit is the
  larger);
- Lemma 6: every discrete head pushed through the limit's training as a test
  parameter (`mfattn.train_coupled`), `max_k max_{l,h} |theta^k - theta~^k|`;
- the limit's own error at every recorded step: `J` against `2J` depth nodes
  and `M` against `4M` particles (independent draws), of the state and adjoint
  together and of each alone; points whose reference error exceeds a fifth of
  the quantity they are compared with are excluded from its fits and marked;
- the limit's displacement `max_z |z_k(1) - z_0(1)|`.

The sweeps (over `n`, masked and not, and over `d` per optimiser, at one grid
point) may use their own reference and training length: `sweep_nodes`,
`sweep_particles`, `sweep_steps`, `sweep_record_every` (default: the main
grid's).

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
    # random test points per initialisation and probe (18 = the stencil count
    # of d = 4, which every d now shares)
    test_points=18,
    # test particles per solve of the limit: solves of 18 cost a third to a
    # fifth of solves of 288 per particle (see `limit_eval_blocks`)
    limit_block=18,
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
    # 25 min on 2 cores (measured, idle, 2026-11-24): the grid L H <= 64
    # against J M = 2048 (the limit's Monte-Carlo error of the state is about
    # sqrt(L H / (J M)) of the fluctuation), the sweeps at (2, 4), two values
    # each of n and d
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
        n_sweep=[4, 16],
        causal_sweep=True,
        d_sweep=[2, 8],
        optimizers=["adamw", "blockwise_sum", "blockwise_mean"],
        sweep_LH=[2, 4],
    ),
    # 53 min on 2 cores (measured, idle, 2026-11-24): the medium grid
    # against the same reference, with 16 initialisations and K = 200 steps
    # (the horizon); the sweeps at (2, 4) with their own shorter training
    # (`sweep_*`), n = 4 and 32 masked and not, d = 2 and 32 per optimiser.
    # A finer reference (J M >> 2048) or a grid to L H = 1024 needs a GPU
    # (see benchmarks/README.md)
    "full": dict(
        _COMMON,
        dim=4,
        tokens=8,
        batch=4,
        steps=200,
        record_every=40,
        nodes=16,
        particles=128,
        L=[1, 2, 4],
        H=[4, 16],
        inits=16,
        probes=2,
        n_sweep=[4, 32],
        causal_sweep=True,
        d_sweep=[2, 32],
        optimizers=["adamw", "blockwise_sum", "blockwise_mean"],
        sweep_LH=[2, 4],
        sweep_nodes=8,
        sweep_particles=128,
        sweep_steps=60,
        sweep_record_every=30,
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


def limit_eval_blocks(grid, measure, loss, z, zl, beta, kernel, T, memory=2e9, block=None):
    """`_limit_eval` over blocks of test particles: at most `block` per solve
    (default: all), and each block's solve kept within about `memory` bytes
    (measured: about 26 bytes per test particle, parameter particle and entry
    of a `d x d` matrix; at `d = 32` one solve of 2080 test particles against
    `J M = 1024` particles asked for 57 GB). Test particles do not act on the
    tokens, so the blocks are independent up to the adaptive solver's step
    sizes; small blocks are also faster (measured on 2 cores, `d = 4`, `n =
    4`: 5 ms per test particle in solves of 18 against 17 ms in solves of 288
    at `J M = 1024`, 13 against 70 ms at `J M = 4096`). The last block is
    padded (repeating its last point) so that every block has one shape: one
    compilation."""
    m, d = z.shape
    heads = grid.Q.shape[0] * grid.Q.shape[1]
    block = min(m, block or m, max(1, int(memory // (26 * heads * d * d))))
    pad = -m % block
    z = jnp.concatenate([jnp.asarray(z), jnp.repeat(jnp.asarray(z)[-1:], pad, 0)])
    zl = jnp.concatenate([jnp.asarray(zl), jnp.repeat(jnp.asarray(zl)[-1:], pad, 0)])
    xs, ps = [], []
    for i in range(0, m + pad, block):
        x, p = _limit_eval(
            grid, measure, loss, z[i : i + block], zl[i : i + block], beta, kernel, T
        )
        xs.append(np.asarray(x))
        ps.append(np.asarray(p))
    return np.concatenate(xs, axis=1)[:, :m], np.concatenate(ps, axis=1)[:, :m]


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


def _split(samples, reference):
    """The error of components `(R, P, S, L+1, m, d)` (initialisations, probes,
    recorded steps, layers, test points) against the limit's `(P, S, L+1, m,
    d)`: per initialisation and step (random z), and its bias and fluctuation
    over all steps, per step, and with each initialisation left out."""
    R, S = samples[0].shape[0], samples[0].shape[2]
    bf = mfattn.bias_fluctuation(samples, reference)
    loo = [
        float(mfattn.bias_fluctuation(tuple(np.delete(a, i, 0) for a in samples), reference).bias)
        for i in range(R)
    ]
    per = [
        mfattn.bias_fluctuation(
            tuple(a[:, :, s] for a in samples), tuple(b[:, s] for b in reference)
        )
        for s in range(S)
    ]
    err = sum(np.linalg.norm(a - b[None], axis=-1) for a, b in zip(samples, reference))
    per_step = err.max(axis=(1, 3, 4))  # (R, S)
    return {
        "total_random": per_step.max(axis=1).tolist(),
        "per_step_random": per_step.tolist(),
        "bias": float(bf.bias),
        "bias_loo": loo,
        "bias_noise": float(bf.noise),
        "bias_per_step": [float(b.bias) for b in per],
        "fluctuation": np.asarray(bf.fluctuation).tolist(),
        "fluctuation_per_step": [np.asarray(b.fluctuation).tolist() for b in per],
    }


# --- one condition ------------------------------------------------------------------
class Condition:
    """One (task, optimiser) condition: the limit and its references, the
    discrete models of every grid point, trained on one data stream."""

    def __init__(
        self, cfg, dim, tokens, opt, causal, grid, particles=None, *, nodes=None, steps=None
    ):
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
        self.nodes = cfg["nodes"] if nodes is None else nodes
        # bytes one solve of the limit's test particles may take (not a preset key)
        self.memory = cfg.get("limit_memory_bytes", 2e9)
        # test particles per solve of the limit (older configurations: all)
        self.limit_block = cfg.get("limit_block")
        # (K, record_every): the sweeps may train for fewer steps than the main grid
        self.steps = (cfg["steps"], cfg["record_every"]) if steps is None else tuple(steps)
        self.R = cfg["inits"]
        # random test points per init and probe (older configurations: the
        # ascent's stencil size, `restarts (2d + 1)`)
        self.block = cfg.get("test_points", cfg["restarts"] * (2 * dim + 1))
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
            self.steps[0],
            self.train_key,
            batch_size=cfg["batch"],
            record_every=self.steps[1],
        )

    def limit_states(self, traj, probes):
        """`(S, P)` list of (xs, ps), each `(Lmax+1, m, d)`."""
        beta = self.cfg["beta"]
        return [
            [
                limit_eval_blocks(
                    _tree_index(traj, s),
                    m,
                    lo,
                    z,
                    zl,
                    beta,
                    self.kernel,
                    self.Lmax,
                    self.memory,
                    self.limit_block,
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
        probe where its error peaks): returns the best error per init. The
        inits that peak at one (step, probe) ascend together, and only they
        are solved (padded to a power of two: few shapes, few compilations)."""
        best = np.array(err_random, float)
        groups = {}
        for r, (s, p, worst) in enumerate(per_init_step_probe):
            groups.setdefault((s, p), []).append((r, worst))
        for (s, p), members in groups.items():
            z, zl = np.asarray(probes[p][2]), np.asarray(probes[p][3])
            idx = [r for r, _ in members]
            idx = np.array(idx + [idx[-1]] * ((1 << (len(idx) - 1).bit_length()) - len(idx)))
            worst = dict(members)
            vals = self._ascend(
                jax.tree.map(lambda a, s=s, idx=idx: jnp.asarray(np.asarray(a[s])[idx]), disc_traj),
                _tree_index(lim_traj, s),
                probes[p],
                np.stack([z[worst[r]] for r in idx]),
                np.stack([zl[worst[r]] for r in idx]),
            )
            for i, (r, _) in enumerate(members):
                best[r] = max(best[r], vals[i])
        return best

    def _ascend(self, params, lim, probe, starts, labels):
        """The ascent of `g` inits (`params` `(g, L, H, d, k)`) against the limit
        `lim` at one probe, from `starts` `(g, c, d)` with their labels: the
        best error of each init."""
        cfg, d = self.cfg, self.dim
        g, c = starts.shape[:2]
        h = 1e-5 * self.task.radius
        measure, loss = probe[0], probe[1]
        ms, ls = _stack(measure, g), _stack(loss, g)
        every = self.Lmax // params.Q.shape[1]

        def errors(pts, lab):
            """`(g, q, d)` points of each init -> `(g, q)` errors."""
            q = pts.shape[1]
            lx, lp = limit_eval_blocks(
                lim,
                measure,
                loss,
                jnp.asarray(pts.reshape(g * q, d)),
                jnp.asarray(lab.reshape(g * q, d)),
                cfg["beta"],
                self.kernel,
                self.Lmax,
                self.memory,
                self.limit_block,
            )
            lx = lx[::every].reshape(-1, g, q, d).transpose(1, 0, 2, 3)
            lp = lp[::every].reshape(-1, g, q, d).transpose(1, 0, 2, 3)
            dx, dp = _discrete_eval(
                params, ms, ls, jnp.asarray(pts), jnp.asarray(lab), cfg["beta"], self.kernel
            )
            return _err((np.asarray(dx), np.asarray(dp)), (lx, lp)).max(axis=1)

        def error_fn(flat, lab=labels):
            """`(g c q, d)` points, init-major, each `q` with the label of its start."""
            lab = np.repeat(lab.reshape(g * c, d), flat.shape[0] // (g * c), axis=0)
            e = errors(np.asarray(flat).reshape(g, -1, d), lab.reshape(g, -1, d))
            return jnp.asarray(e.reshape(-1))

        res = mfattn.adversarial_sup(
            error_fn,  # the last step's values (no stencil)
            jnp.asarray(starts.reshape(g * c, d)),
            self.task.radius,
            steps=cfg["adversarial_steps"],
            step_size=cfg["adversarial_step_size"],
            value_and_grad=mfattn.central_difference(error_fn, h),
        )
        return np.asarray(res.values).reshape(g, c).max(axis=1)

    # ---- the whole condition
    def run(self, log=print):
        cfg, R = self.cfg, self.R
        t0 = time.perf_counter()
        probes = self.probes()
        inits = [self.discrete_inits(L, H) for L, H in self.grid]
        J, M = self.nodes, self.particles
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
        # reference errors per step (max over probes, z and t = l / Lmax): of the
        # state and adjoint together (the theorem's quantity), and of each part
        def ref_err(other, part=None):
            e = lambda a, b: (
                _err(a, b) if part is None else np.linalg.norm(a[part] - b[part], axis=-1)
            )
            return [
                float(max(e(lim[s][p], other[s][p]).max() for p in range(len(probes))))
                for s in range(S)
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
                "M_vs_4M": ref_err(lim_big),
                "J_vs_2J": ref_err(lim_fine),
                "M_vs_4M_state": ref_err(lim_big, 0),
                "J_vs_2J_state": ref_err(lim_fine, 0),
                "M_vs_4M_adjoint": ref_err(lim_big, 1),
                "J_vs_2J_adjoint": ref_err(lim_fine, 1),
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
            both = _split((X, Pp), (LX, LP))
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
                "bias": both["bias"],
                "bias_loo": both["bias_loo"],
                "bias_noise": both["bias_noise"],
                "bias_per_step": both["bias_per_step"],
                "fluctuation": both["fluctuation"],
                "fluctuation_per_step": both["fluctuation_per_step"],
                # each part alone (random z): the state x and the adjoint p
                "state": _split((X,), (LX,)),
                "adjoint": _split((Pp,), (LP,)),
                "lemma6": lem.max(axis=0).tolist(),
                "lemma6_per_step": lem.T.tolist(),
                "lemma6_reference": lem_ref.tolist(),
                "discrete_loss": np.asarray(main.discrete_loss[j]).mean(axis=1).tolist(),
            }
            log(
                f"  L={L:3d} H={H:4d}: total {np.mean(total):.4g} "
                f"(random z {np.mean(total_random):.4g}) bias {both['bias']:.4g} "
                f"fluct {np.mean(both['fluctuation']):.4g} lemma6 {np.mean(lem.max(0)):.4g}; "
                f"state alone: bias {out['points'][f'L{L}/H{H}']['state']['bias']:.4g}"
            )
        out["wall_seconds"] = time.perf_counter() - t0
        return out


# --- orchestration ----------------------------------------------------------------
def _sweeps_apart(cfg) -> bool:
    """Whether the sweeps are trained or referenced unlike the main grid
    (`sweep_nodes`, `sweep_particles`, `sweep_steps`, `sweep_record_every`)."""
    return any(
        cfg.get("sweep_" + k, cfg[k]) != cfg[k]
        for k in ("nodes", "particles", "steps", "record_every")
    )


def sweep_condition_name(cfg, dim, tokens, opt, causal=False):
    """The condition that holds a sweep point: the main condition's own name
    when the sweeps share its settings (the point joins its grid), else a
    separate `-sweep` condition, so that every point of a sweep is measured
    alike."""
    name = condition_name(dim, tokens, opt, causal)
    main = condition_name(cfg["dim"], cfg["tokens"], cfg["optimizers"][0])
    return name + "-sweep" if name == main and _sweeps_apart(cfg) else name


def conditions(cfg):
    """`{name: (dim, tokens, opt, causal, grid)}`, in the order they run: the
    main grid, the `d` sweep, the `n` sweep."""
    grid = [(L, H) for L in cfg["L"] for H in cfg["H"]]
    sweep = [tuple(cfg["sweep_LH"])]
    out = {}

    def add(dim, tokens, opt, causal, pts, main=False):
        if main:
            name = condition_name(dim, tokens, opt, causal)
        else:
            name = sweep_condition_name(cfg, dim, tokens, opt, causal)
        if name in out:
            have = out[name][4]
            out[name] = (dim, tokens, opt, causal, have + [p for p in pts if p not in have])
        else:
            out[name] = (dim, tokens, opt, causal, list(pts))

    add(cfg["dim"], cfg["tokens"], cfg["optimizers"][0], False, grid, main=True)
    for d in cfg["d_sweep"]:  # every optimiser at one d before the next d
        for opt in cfg["optimizers"]:
            add(d, cfg["tokens"], opt, False, sweep)
    for n in cfg["n_sweep"]:
        add(cfg["dim"], n, cfg["optimizers"][0], False, sweep)
        if cfg["causal_sweep"]:
            add(cfg["dim"], n, cfg["optimizers"][0], True, sweep)
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
            if main:
                M, J, steps = cfg["particles"], cfg["nodes"], None
            else:  # the sweeps' own reference and training length, where given
                M = cfg.get("sweep_particles", cfg["particles"])
                J = cfg.get("sweep_nodes", cfg["nodes"])
                steps = (
                    cfg.get("sweep_steps", cfg["steps"]),
                    cfg.get("sweep_record_every", cfg["record_every"]),
                )
            res = Condition(cfg, dim, tokens, opt, causal, grid, M, nodes=J, steps=steps).run(log)
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


PARTS = {"": None, "state_": "state", "adjoint_": "adjoint"}
"""Prefixes of the fitted quantities: the state and adjoint together (the
theorem's error), the state alone, the adjoint alone."""


def _view(pt, prefix):
    """A point's record for one part (`""`: both, `"state_"`, `"adjoint_"`)."""
    return pt if PARTS[prefix] is None else pt[PARTS[prefix]]


def _flags(pt, ref):
    """Which quantities of a point its reference error disqualifies, for the
    state and adjoint together and for each alone (each against the reference
    error of its own part). A quantity is a maximum over the recorded steps, so
    the limit's own error can move it by up to its own maximum over the steps:
    a quantity is disqualified where that exceeds a fifth of it. `*_kK`: the
    same at the last recorded step alone."""
    out = {}
    for prefix, part in PARTS.items():
        suffix = "" if part is None else f"_{part}"
        r = np.maximum(np.asarray(ref["M_vs_4M" + suffix]), np.asarray(ref["J_vs_2J" + suffix]))
        v = _view(pt, prefix)
        per_step = np.asarray(v["per_step_random"]).mean(axis=0)
        out[prefix + "total"] = bool(r.max() > per_step.max() / 5)
        out[prefix + "total_kK"] = bool(r[-1] > per_step[-1] / 5)
        out[prefix + "bias"] = bool(r.max() > max(v["bias_per_step"]) / 5)
        # the fluctuation is measured among initialisations: the limit plays no part
        out[prefix + "fluctuation"] = False
        out[prefix + "reference_max"] = float(r.max())
        out[prefix + "bias_resolved"] = bool(v["bias"] > 2 * v["bias_noise"])
    lem = np.asarray(pt["lemma6_per_step"]).mean(axis=0)
    out["lemma6"] = bool(max(pt["lemma6_reference"]) > lem.max() / 5)
    return out


def _bias_vs_L(P, keys):
    """Slope of `log bias` on `log L` over `keys`, jackknifed with the
    leave-one-out biases (`bias_loo`) of the records `P[k]`."""
    Ls = np.array([P[k]["L"] for k in keys], float)
    full = np.array([P[k]["bias"] for k in keys])
    loo = np.array([P[k]["bias_loo"] for k in keys])  # (points, R)
    R = loo.shape[1]

    def slope(idx):
        b = full if len(idx) == R else loo[:, np.setdiff1d(np.arange(R), idx)[0]]
        return np.polyfit(np.log(Ls), np.log(b), 1)[0]

    jk = mfattn.jackknife(slope, R)
    return {"L": Ls.tolist(), "bias": full.tolist(), "slope": jk["estimate"], "slope_ci": jk["ci"]}


def summarize(data):
    """Fits from the per-condition results: `{"fits": ..., "marks": ...,
    "reference": ..., "displacement": ...}` (what the study's JSON adds).

    Every fit uses only the points whose reference error is below a fifth of
    the fitted quantity, needs 4 initialisations (jackknife `t` intervals over
    them) and more points than parameters. Fits are made for the state and
    adjoint together (no prefix: the theorem's error, with the adversarial sup)
    and for each alone (`state_`, `adjoint_`: random `z`)."""
    cfg, pts = data["config"], data["points"]
    fits, marks = {}, {}
    main = condition_name(cfg["dim"], cfg["tokens"], cfg["optimizers"][0])
    reference, displacement = {}, {}
    for cname, c in pts.items():
        reference[cname] = c["reference"]
        displacement[cname] = c["displacement"]
        marks[cname] = {k: _flags(p, c["reference"]) for k, p in c["points"].items()}
    enough = cfg["inits"] >= 4
    if main in pts:
        c = pts[main]
        P = c["points"]
        ok = lambda k, q: not marks[main][k][q]
        grid = list(P)
        Hmax = max(P[k]["H"] for k in grid)
        Lmax = max(P[k]["L"] for k in grid)
        last = len(c["steps"]) - 1
        for prefix in PARTS:
            V = {k: _view(P[k], prefix) for k in grid}
            # bias against L at the largest H (jackknife over inits of the slope)
            at_H = sorted((k for k in grid if P[k]["H"] == Hmax), key=lambda k: P[k]["L"])
            keys = [k for k in at_H if ok(k, prefix + "bias")]
            excluded = [P[k]["L"] for k in at_H if k not in keys]
            if len(keys) >= 2 and enough:
                V2 = {k: dict(V[k], L=P[k]["L"]) for k in keys}
                fits[prefix + "bias_vs_L"] = dict(
                    _bias_vs_L(V2, keys),
                    H=Hmax,
                    resolved=[marks[main][k][prefix + "bias_resolved"] for k in keys],
                    excluded=excluded,
                )
            else:  # recorded, with why it is not fitted
                fits[prefix + "bias_vs_L"] = {
                    "L": [P[k]["L"] for k in at_H],
                    "bias": [V[k]["bias"] for k in at_H],
                    "H": Hmax,
                    "excluded": excluded,
                    "slope": None,
                    "slope_ci": None,
                    "why": (
                        "fewer than 4 initialisations"
                        if not enough
                        else "fewer than 2 depths whose bias is above five times the "
                        "limit's own error"
                    ),
                }
            # `E = c L^a H^b`: the error (max over steps), the fluctuation (max
            # over steps, at k = 0 and at the last step: the part training adds)
            total = "total" if prefix == "" else "total_random"
            quantities = {
                "total": ("total", lambda v, t=total: v[t]),
                # the error after the last step (random z): what training leaves
                "total_kK": ("total_kK", lambda v: np.asarray(v["per_step_random"])[:, last]),
                "fluctuation": ("fluctuation", lambda v: v["fluctuation"]),
                "fluctuation_k0": ("fluctuation", lambda v: v["fluctuation_per_step"][0]),
                "fluctuation_kK": ("fluctuation", lambda v: v["fluctuation_per_step"][last]),
            }
            if prefix == "":  # Lemma 6 (zero at k = 0: all of it training's)
                quantities["lemma6"] = ("lemma6", lambda v: v["lemma6"])
            for name, (q, get) in quantities.items():
                keys = [k for k in grid if ok(k, prefix + q if q != "lemma6" else q)]
                if len(keys) >= 4:
                    cov = {"L": [P[k]["L"] for k in keys], "H": [P[k]["H"] for k in keys]}
                    f = _fit(cov, [get(V[k]) for k in keys])
                    if f is not None:
                        f["points_used"] = keys
                        fits[f"{prefix}{name}_vs_LH"] = f
            keys = [k for k in grid if ok(k, prefix + "total")]
            if len(keys) >= 5 and enough:
                fits[prefix + "total_combined"] = dict(
                    mfattn.combined_fit(
                        [P[k]["L"] for k in keys],
                        [P[k]["H"] for k in keys],
                        [V[k][total] for k in keys],
                        interval="jackknife",
                    ),
                    points_used=keys,
                )
            for axis, fixed, var in [("L", "H", Hmax), ("H", "L", Lmax)]:
                keys = [k for k in grid if P[k][fixed] == var and ok(k, prefix + "total")]
                if len(keys) >= 2:
                    f = _fit({axis: [P[k][axis] for k in keys]}, [V[k][total] for k in keys])
                    if f is not None:
                        fits[f"{prefix}total_vs_{axis}"] = dict(f, at={fixed: var})
        # the horizon: error per recorded step at every grid point
        fits["horizon"] = {
            k: {
                "steps": c["steps"],
                "per_step": [_mean_ci(col) for col in np.asarray(P[k]["per_step_random"]).T],
                "bias_per_step": P[k]["bias_per_step"],
                "state_per_step": [
                    _mean_ci(col) for col in np.asarray(P[k]["state"]["per_step_random"]).T
                ],
            }
            for k in grid
        }
    # tokens (masked and unmasked) and dimension (per optimiser) sweeps, at one
    # grid point; each quantity uses the conditions its reference allows
    L, H = cfg["sweep_LH"]
    at = f"L{L}/H{H}"

    def sweep(names, xs, q, get):
        rows = [pts[n]["points"].get(at) if n in pts else None for n in names]
        flag = [marks[n].get(at, {}) if n in pts else {} for n in names]
        keep = [r is not None and not f.get(q, True) for r, f in zip(rows, flag)]
        used = [x for x, k in zip(xs, keep) if k]
        vals = [get(r) for r, k in zip(rows, keep) if k]
        out = {
            "x": used,
            "excluded": [x for x, k, r in zip(xs, keep, rows) if r is not None and not k],
            "values": [_mean_ci(v) for v in vals],
        }
        if len(used) >= 2:
            out.update(_fit({"slope": used}, vals) or {})
        return out

    opt0 = cfg["optimizers"][0]
    for causal in (False, True):
        names = [sweep_condition_name(cfg, cfg["dim"], n, opt0, causal) for n in cfg["n_sweep"]]
        if not any(n in pts for n in names):
            continue
        tag = "causal" if causal else "unmasked"
        fits[f"total_vs_n_{tag}"] = {
            prefix + "total": sweep(
                names,
                cfg["n_sweep"],
                prefix + "total",
                lambda r, p=prefix: _view(r, p)["total" if p == "" else "total_random"],
            )
            for prefix in PARTS
        }
        fits[f"total_vs_n_{tag}"]["state_total_kK"] = sweep(
            names,
            cfg["n_sweep"],
            "state_total_kK",
            lambda r: np.asarray(r["state"]["per_step_random"])[:, -1],
        )
    lemma6 = {}
    for opt in cfg["optimizers"]:
        names = [sweep_condition_name(cfg, d, cfg["tokens"], opt) for d in cfg["d_sweep"]]
        if not any(n in pts for n in names):
            continue
        lemma6[opt] = {"lemma6": sweep(names, cfg["d_sweep"], "lemma6", lambda r: r["lemma6"])}
        lemma6[opt]["state_total_kK"] = sweep(
            names,
            cfg["d_sweep"],
            "state_total_kK",
            lambda r: np.asarray(r["state"]["per_step_random"])[:, -1],
        )
        for prefix in PARTS:
            lemma6[opt][prefix + "total"] = sweep(
                names,
                cfg["d_sweep"],
                prefix + "total",
                lambda r, p=prefix: _view(r, p)["total" if p == "" else "total_random"],
            )
    if lemma6:
        fits["lemma6"] = lemma6
    return {"fits": fits, "marks": marks, "reference": reference, "displacement": displacement}


# --- plots and text ------------------------------------------------------------------
def _log_axes(ax, x=None, which="y"):
    """Log axes whose ticks are plain numbers (`0.2`, `1`, `5`), not `2 x 10^-1`."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    lo, hi = ax.get_ylim()
    # a narrow range (less than a factor 4) gets more ticks, so that it has some
    subs = (1.0, 2.0, 5.0) if hi > 4 * lo else (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0)
    axes = [ax.yaxis] if which == "y" else [ax.xaxis, ax.yaxis]
    for a in axes:
        a.set_major_locator(LogLocator(base=10, subs=subs))
        a.set_major_formatter(fmt)
        a.set_minor_locator(NullLocator())
        a.set_minor_formatter(NullFormatter())
    if x is not None:
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(x, [f"{v:g}" for v in x])


def plot(data, out):
    """One PNG per question next to `out`: `_LH` (how the error, its bias, its
    fluctuation and the Lemma 6 distance fall with `L` at each `H`), `_LH_state`
    (the same for the state alone), `_horizon` (does the error stay bounded in
    the training step `k`), `_reference` (does the limit move more than its
    own error), `_n` (does the error grow with the number of tokens, masked and
    not), `_d` (does the Lemma 6 distance grow with `d`, per optimiser). Open
    markers: points that the limit's own error disqualifies (excluded from the
    fits)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, pts, fits, marks = data["config"], data["points"], data["fits"], data["marks"]
    main = condition_name(cfg["dim"], cfg["tokens"], cfg["optimizers"][0])
    out = pathlib.Path(out)
    name = lambda suffix: out.with_name(out.stem + suffix)
    R = cfg["inits"]
    if main in pts:
        P, mk = pts[main]["points"], marks[main]
        ref = pts[main]["reference"]
        own = lambda part="": np.maximum(ref["M_vs_4M" + part], ref["J_vs_2J" + part])
        Hs = sorted({p["H"] for p in P.values()})
        x = np.array(sorted({p["L"] for p in P.values()}), float)
        for prefix, suffix, panels, what in [
            (
                "",
                "_LH.png",
                [
                    ("total", "error (sup over z, adversarial)"),
                    ("bias", "bias (error of the mean over inits)"),
                    ("fluctuation", "fluctuation (distance to that mean)"),
                    ("lemma6", "Lemma 6: max |theta - theta~|"),
                ],
                "state and adjoint, |x - x_lim| + |p - p_lim|",
            ),
            (
                "state_",
                "_LH_state.png",
                [
                    ("total_random", "error of the state (random z)"),
                    ("bias", "bias of the state"),
                    ("fluctuation", "fluctuation of the state"),
                ],
                "the state alone, |x - x_lim|",
            ),
        ]:
            fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.4))
            for ax, (q, title) in zip(axes, panels):
                flag = "total" if q == "total_random" else q
                flag = flag if q == "lemma6" else prefix + flag
                for i, H in enumerate(Hs):
                    ks = sorted((k for k in P if P[k]["H"] == H), key=lambda k: P[k]["L"])
                    V = [P[k] if q == "lemma6" else _view(P[k], prefix) for k in ks]
                    Ls = [P[k]["L"] for k in ks]
                    y = [v["bias"] if q == "bias" else np.mean(v[q]) for v in V]
                    ax.plot(Ls, y, "-", color=f"C{i}", label=f"H = {H}")
                    for L, k, v, yy in zip(Ls, ks, V, y):
                        ax.plot(L, yy, "o", color=f"C{i}", mfc="none" if mk[k][flag] else f"C{i}")
                        if q != "bias":
                            ax.plot([L] * len(v[q]), v[q], ".", color=f"C{i}", alpha=0.3)
                if q != "lemma6" and q != "fluctuation":
                    part = "" if prefix == "" else "_state"
                    ax.axhline(
                        own(part).max(), color="k", lw=0.8, ls=":", label="limit's own error"
                    )
                y0 = ax.get_lines()[0].get_ydata()[0]
                ax.plot(x, y0 * (x / x[0]) ** -1.0, "k--", lw=0.8, label="slope 1/L")
                ax.plot(x, y0 * (x / x[0]) ** -0.5, "k-.", lw=0.8, label="slope L^-1/2")
                ax.set(xscale="log", yscale="log", xlabel="depth L", title=title)
                _log_axes(ax, x)
                ax.legend(fontsize=7)
            axes[0].set_ylabel("mean over initialisations (dots: each)")
            fig.suptitle(
                f"{main}, {what}: {R} initialisations, K = {cfg['steps']} training steps; "
                "open markers: excluded (the limit's own error is above a fifth)",
                fontsize=10,
            )
            fig.tight_layout()
            fig.savefig(name(suffix), dpi=100)
            plt.close(fig)
        # the horizon: the error against the training step, per grid point
        steps = np.asarray(pts[main]["steps"])
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
        for ax, key, part, title in [
            (axes[0], "per_step", "", "state and adjoint"),
            (axes[1], "state_per_step", "_state", "the state alone"),
        ]:
            for i, (k, h) in enumerate(fits.get("horizon", {}).items()):
                m = np.array([e["mean"] for e in h[key]])
                ax.plot(steps, m, "o-", color=f"C{i % 10}", label=k.replace("/", ", "))
                if all(e["ci"] for e in h[key]):
                    lo = np.maximum([e["ci"][0] for e in h[key]], 0.5 * m)
                    hi = [e["ci"][1] for e in h[key]]
                    ax.fill_between(steps, lo, hi, color=f"C{i % 10}", alpha=0.12)
            ax.plot(steps, own(part), "k:", label="limit's own error")
            ax.set(yscale="log", xlabel="training step k", title=title)
            _log_axes(ax)
            ax.set_xticks(steps)
            ax.legend(fontsize=7, ncol=2)
        axes[0].set_ylabel(f"error, mean over {R} inits (random z)")
        fig.suptitle("does the error stay bounded in the training step k?", fontsize=10)
        fig.tight_layout()
        fig.savefig(name("_horizon.png"), dpi=100)
        plt.close(fig)
        # the reference: the limit's displacement against its own error
        fig, ax = plt.subplots(figsize=(10, 4.4))
        disp = np.asarray(pts[main]["displacement"], float)
        ax.plot(steps[1:], disp[1:], "o-", color="C0", label="displacement max_z |z_k(1) - z_0(1)|")
        for part, ls, lab in [("_state", "-", "x"), ("", ":", "x and p")]:
            for key, mkr, c, what in [
                ("M_vs_4M", "s", "C1", "M vs 4M"),
                ("J_vs_2J", "^", "C2", "J vs 2J"),
            ]:
                ax.plot(
                    steps, ref[key + part], mkr + ls, color=c, label=f"own error ({lab}), {what}"
                )
        ax.set(
            yscale="log",
            xlabel="training step k",
            title=f"does the limit move more than its own error? (J = {ref['nodes']}, "
            f"M = {ref['particles']})",
        )
        _log_axes(ax)
        ax.set_xticks(steps)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.tight_layout()
        fig.savefig(name("_reference.png"), dpi=100)
        plt.close(fig)

    def sweep_panel(ax, f, label, marker, color):
        if f and f["excluded"]:  # say what is left out, and why
            ax.text(
                0.02,
                0.03 + 0.06 * len(ax.texts),
                f"{label}: {f['excluded']} excluded (the limit's own error is above a fifth)",
                transform=ax.transAxes,
                fontsize=7,
                color=color,
            )
        if not f or not f["x"]:
            return
        y = np.array([t["mean"] for t in f["values"]])
        lab = f"{label}: slope {_ci(f, 'slope')}" if "slope_ci" in f else label
        ax.plot(f["x"], y, marker, color=color, label=lab)
        if all(t["ci"] for t in f["values"]):
            err = np.abs(np.array([t["ci"] for t in f["values"]]).T - y)
            ax.errorbar(f["x"], y, yerr=err, fmt="none", capsize=3, color=color)

    if any(k.startswith("total_vs_n_") for k in fits):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
        for ax, q, title in [
            (axes[0], "total", "state and adjoint (adversarial sup)"),
            (axes[1], "state_total", "the state alone (random z)"),
        ]:
            for i, tag in enumerate(("unmasked", "causal")):
                f = fits.get(f"total_vs_n_{tag}", {}).get(q)
                sweep_panel(ax, f, tag, ["o-", "s--"][i], f"C{i}")
            ax.set(xscale="log", yscale="log", xlabel="tokens n", title=title)
            _log_axes(ax, cfg["n_sweep"])
            ax.legend(fontsize=8)
        axes[0].set_ylabel(f"error, mean over {R} inits")
        fig.suptitle(
            f"does the error grow with n? (L, H) = {tuple(cfg['sweep_LH'])}; "
            "points the limit's own error disqualifies are left out",
            fontsize=10,
        )
        fig.tight_layout()
        fig.savefig(name("_n.png"), dpi=100)
        plt.close(fig)
    if "lemma6" in fits:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
        for ax, q, title in [
            (axes[0], "lemma6", "Lemma 6: max |theta - theta~|"),
            (
                axes[1],
                "state_total_kK",
                f"error of the state at k = {cfg.get('sweep_steps', cfg['steps'])} (random z)",
            ),
        ]:
            for i, (opt, f) in enumerate(fits["lemma6"].items()):
                # distinct markers: optimisers that coincide stay visible
                sweep_panel(ax, f.get(q), opt, ["o-", "s--", "^:"][i % 3], f"C{i}")
            ax.set(xscale="log", yscale="log", xlabel="dimension d (RMS-normalised)", title=title)
            _log_axes(ax, cfg["d_sweep"])
            ax.legend(fontsize=8)
        axes[0].set_ylabel(f"mean over {R} inits")
        fig.suptitle(
            f"does Lemma 6 (and the error) grow with d, per optimiser? (L, H) = "
            f"{tuple(cfg['sweep_LH'])}; points the limit's own error disqualifies are left out",
            fontsize=10,
        )
        fig.tight_layout()
        fig.savefig(name("_d.png"), dpi=100)
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
        + (f" (sweeps: K = {cfg['sweep_steps']})" if "sweep_steps" in cfg else "")
    ]
    for name, c in pts.items():
        r = c["reference"]
        lines.append(
            f"{name}: limit displacement {max(c['displacement']):.3g}; own error (x and p) "
            f"M vs 4M {max(r['M_vs_4M']):.3g}, J vs 2J {max(r['J_vs_2J']):.3g}; (x alone) "
            f"{max(r['M_vs_4M_state']):.3g}, {max(r['J_vs_2J_state']):.3g}"
        )
    main = condition_name(cfg["dim"], cfg["tokens"], cfg["optimizers"][0])
    if main in data.get("marks", {}):
        m = data["marks"][main]
        for prefix, what in [("", "x and p"), ("state_", "x alone")]:
            out = {q: sum(v[prefix + q] for v in m.values()) for q in ("total", "bias")}
            lines.append(
                f"{main} ({what}): of {len(m)} grid points, excluded by the limit's own error "
                f"(above a fifth of the quantity): error {out['total']}, bias {out['bias']}; "
                f"bias above twice its noise at "
                f"{sum(v[prefix + 'bias_resolved'] for v in m.values())}"
            )
        lines.append(
            f"Lemma 6: excluded at {sum(v['lemma6'] for v in m.values())} of {len(m)}. Fits "
            "need 4 usable points (2 for the bias against L) and 4 initialisations; a fit "
            "not printed is one the data cannot support"
        )
    for prefix in PARTS:
        f = fits.get(prefix + "bias_vs_L")
        if f is not None and f["slope"] is not None:
            lines.append(
                f"{prefix}bias vs L (H = {f['H']}, L = {f['L']}): slope {f['slope']:+.2f} "
                f"[{f['slope_ci'][0]:+.2f}, {f['slope_ci'][1]:+.2f}]"
            )
        elif f is not None:
            lines.append(f"{prefix}bias vs L (H = {f['H']}): not fitted, {f['why']}")
        for q in ("total", "total_kK", "fluctuation", "fluctuation_k0", "fluctuation_kK", "lemma6"):
            k = f"{prefix}{q}_vs_LH"
            if k in fits:
                lines.append(f"{k}: L {_ci(fits[k], 'L')}, H {_ci(fits[k], 'H')}")
    for tag in ("unmasked", "causal"):
        for q, f in fits.get(f"total_vs_n_{tag}", {}).items():
            if "slope_ci" in f:
                lines.append(f"{q} vs n ({tag}, n = {f['x']}): slope {_ci(f, 'slope')}")
    for opt, g in fits.get("lemma6", {}).items():
        for q, f in g.items():
            if "slope_ci" in f:
                lines.append(f"{q} vs d ({opt}, d = {f['x']}): slope {_ci(f, 'slope')}")
    return "\n".join(lines)


def table(data) -> str:
    """The main grid as Markdown: mean (t interval) of the error, bias,
    fluctuation and Lemma 6 distance per `(L, H)`, and the state's alone."""
    cfg, pts = data["config"], data["points"]
    main = condition_name(cfg["dim"], cfg["tokens"], cfg["optimizers"][0])
    if main not in pts:
        return "(the main condition has not run)"
    P, marks = pts[main]["points"], data["marks"][main]
    fmt = lambda x: (
        f"{x['mean']:.3g} [{x['ci'][0]:.3g}, {x['ci'][1]:.3g}]" if x["ci"] else f"{x['mean']:.3g}"
    )
    lines = [
        f"Main condition `{main}`, {cfg['inits']} initialisations, K = {cfg['steps']} steps "
        "(95 % t intervals over initialisations; * = excluded from fits: the limit's own error "
        "is above a fifth of the quantity; (noise): bias below twice its Monte-Carlo noise):",
        "",
        "| L | H | error x+p (adversarial sup) | bias x+p | fluctuation x+p | "
        "error x (random z) | bias x | fluctuation x | Lemma 6 |",
        "| --: | --: | --: | --: | --: | --: | --: | --: | --: |",
    ]
    for k, p in sorted(P.items(), key=lambda kv: (kv[1]["L"], kv[1]["H"])):
        m = marks[k]
        star = lambda q, m=m: "*" if m[q] else ""
        noise = lambda q, m=m: "" if m[q] else " (noise)"
        s = p["state"]
        lines.append(
            f"| {p['L']} | {p['H']} | {fmt(_mean_ci(p['total']))}{star('total')} | "
            f"{p['bias']:.3g}{star('bias')}{noise('bias_resolved')} | "
            f"{fmt(_mean_ci(p['fluctuation']))} | "
            f"{fmt(_mean_ci(s['total_random']))}{star('state_total')} | "
            f"{s['bias']:.3g}{star('state_bias')}{noise('state_bias_resolved')} | "
            f"{fmt(_mean_ci(s['fluctuation']))} | "
            f"{fmt(_mean_ci(p['lemma6']))}{star('lemma6')} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0]
    )
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the quick preset (minutes)")
    g.add_argument(
        "--medium", action="store_true", help="the medium preset (about 25 min on 2 cores)"
    )
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
