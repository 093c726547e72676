"""One condition of the study (docs/theory.md, section 7): the task, the law
`nu_0`, the optimisers, and the measurement of a (task, optimiser) condition on
its grid of `(L, H)` against the trained limit."""

import time
import zlib
from functools import partial

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mfattn

from ._config import OPTIMIZERS, StudyConfig, condition_name
from ._records import ConditionResult, GridPoint, Reference, Split


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
    raise ValueError(f"`name` must be one of {OPTIMIZERS}, got {name!r}")


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
        saveat=diffrax.SaveAt(ts=jnp.arange(T + 1) / T),
        interpolation=mfattn.PiecewiseConstant(),
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


def _split(samples, reference) -> Split:
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
    return Split(
        total_random=per_step.max(axis=1).tolist(),
        per_step_random=per_step.tolist(),
        bias=float(bf.bias),
        bias_loo=loo,
        bias_noise=float(bf.noise),
        bias_per_step=[float(b.bias) for b in per],
        fluctuation=np.asarray(bf.fluctuation).tolist(),
        fluctuation_per_step=[np.asarray(b.fluctuation).tolist() for b in per],
    )


# --- one condition ------------------------------------------------------------------
class Condition:
    """One (task, optimiser) condition: the limit and its references, the
    discrete models of every grid point, trained on one data stream."""

    def __init__(
        self,
        cfg: StudyConfig,
        dim: int,
        tokens: int,
        opt: str,
        causal: bool,
        grid,
        particles: int | None = None,
        *,
        nodes: int | None = None,
        steps: tuple[int, int] | None = None,
    ):
        self.cfg, self.dim, self.tokens, self.opt_name = cfg, dim, tokens, opt
        self.causal, self.grid = causal, [tuple(g) for g in grid]
        self.kernel = mfattn.DenseKernel(causal=True) if causal else None
        self.task = RMSTask(
            mfattn.DenoisingTask(dim=dim, num_tokens=tokens, num_clusters=cfg.clusters)
        )
        self.opt = make_optimizer(opt, cfg.eta, dim, cfg.head_dim, cfg.weight_decay)
        # data, probes and initialisations depend on the task only: conditions
        # that differ by the optimiser or the mask share them
        root = jax.random.key(cfg.seed)
        self.key = jax.random.fold_in(root, zlib.crc32(f"d{dim}-n{tokens}".encode()))
        self.train_key, self.probe_key, self.limit_key, self.init_key = jax.random.split(
            self.key, 4
        )
        self.Lmax = max(L for L, _ in self.grid)
        self.particles = cfg.particles if particles is None else particles
        self.nodes = cfg.nodes if nodes is None else nodes
        # bytes one solve of the limit's test particles may take
        self.memory = 2e9 if cfg.limit_memory_bytes is None else cfg.limit_memory_bytes
        # test particles per solve of the limit
        self.limit_block = cfg.limit_block
        # (K, record_every): the sweeps may train for fewer steps than the main grid
        self.steps = (cfg.steps, cfg.record_every) if steps is None else tuple(steps)
        self.R = cfg.inits
        self.block = cfg.test_points  # random test points per init and probe
        self.m = self.R * self.block  # random test points per probe

    # ---- pieces
    def limit_model(self, nodes, particles, key):
        grid = tied_init(key, nodes, particles, self.dim, self.cfg.head_dim)
        return mfattn.MeanFieldTransformer(
            grid, self.cfg.beta, interpolation=mfattn.PiecewiseConstant(), kernel=self.kernel
        )

    def discrete_inits(self, L, H):
        keys = [jax.random.fold_in(self.init_key, 1000 * L + H + 10**6 * r) for r in range(self.R)]
        ps = [tied_init(k, L, H, self.dim, self.cfg.head_dim) for k in keys]
        return jax.tree.map(lambda *a: jnp.stack(a), *ps)

    def probes(self):
        out = []
        for p in range(self.cfg.probes):
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
            batch_size=cfg.batch,
            record_every=self.steps[1],
        )

    def limit_states(self, traj, probes):
        """`(S, P)` list of (xs, ps), each `(Lmax+1, m, d)`."""
        beta = self.cfg.beta
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
                x, p = _discrete_eval(params, ms, ls, zz, zzl, self.cfg.beta, self.kernel)
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
                cfg.beta,
                self.kernel,
                self.Lmax,
                self.memory,
                self.limit_block,
            )
            lx = lx[::every].reshape(-1, g, q, d).transpose(1, 0, 2, 3)
            lp = lp[::every].reshape(-1, g, q, d).transpose(1, 0, 2, 3)
            dx, dp = _discrete_eval(
                params, ms, ls, jnp.asarray(pts), jnp.asarray(lab), cfg.beta, self.kernel
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
            steps=cfg.adversarial_steps,
            step_size=cfg.adversarial_step_size,
            value_and_grad=mfattn.central_difference(error_fn, h),
        )
        return np.asarray(res.values).reshape(g, c).max(axis=1)

    # ---- the whole condition
    def run(self, log=print) -> ConditionResult:
        """Train the limit, its references and the grid's discrete models, and
        measure every grid point (progress lines through `log`)."""
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
        reference = Reference(
            M_vs_4M=ref_err(lim_big),
            J_vs_2J=ref_err(lim_fine),
            M_vs_4M_state=ref_err(lim_big, 0),
            J_vs_2J_state=ref_err(lim_fine, 0),
            M_vs_4M_adjoint=ref_err(lim_big, 1),
            J_vs_2J_adjoint=ref_err(lim_fine, 1),
            nodes=J,
            particles=M,
        )
        points = {}
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
                worst = np.argsort(E[p, s, r].max(axis=0))[::-1][: cfg.restarts]
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
            state = _split((X,), (LX,))
            points[f"L{L}/H{H}"] = GridPoint(
                L=L,
                H=H,
                total=total.tolist(),
                total_random=total_random.tolist(),
                per_step_random=per_step.tolist(),
                peak_step=[int(w[0]) for w in where],
                bias=both.bias,
                bias_loo=both.bias_loo,
                bias_noise=both.bias_noise,
                bias_per_step=both.bias_per_step,
                fluctuation=both.fluctuation,
                fluctuation_per_step=both.fluctuation_per_step,
                # each part alone (random z): the state x and the adjoint p
                state=state,
                adjoint=_split((Pp,), (LP,)),
                lemma6=lem.max(axis=0).tolist(),
                lemma6_per_step=lem.T.tolist(),
                lemma6_reference=lem_ref.tolist(),
                discrete_loss=np.asarray(main.discrete_loss[j]).mean(axis=1).tolist(),
            )
            log(
                f"  L={L:3d} H={H:4d}: total {np.mean(total):.4g} "
                f"(random z {np.mean(total_random):.4g}) bias {both.bias:.4g} "
                f"fluct {np.mean(both.fluctuation):.4g} lemma6 {np.mean(lem.max(0)):.4g}; "
                f"state alone: bias {state.bias:.4g}"
            )
        return ConditionResult(
            condition=condition_name(self.dim, self.tokens, self.opt_name, self.causal),
            dim=self.dim,
            tokens=self.tokens,
            opt=self.opt_name,
            causal=self.causal,
            steps=main.steps.tolist(),
            reference=reference,
            displacement=[float(x) for x in disp],
            limit_loss=main.limit_loss.tolist(),
            points=points,
            wall_seconds=time.perf_counter() - t0,
        )
