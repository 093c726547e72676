"""The scaling-law study (docs/theory.md, section 7): how far a trained finite transformer
(`L` layers, `H` heads) is from its trained mean-field limit, uniformly over
test particles, against `L`, `H`, the number of tokens `n` and the dimension `d`.

    python -m benchmarks.scaling --quick      # < 5 minutes on 2 cores
    python -m benchmarks.scaling              # the full preset
    python -m mfattn                          # = the --quick preset

For each initialisation `r` (`R` of them) the discrete model (heads i.i.d. per
layer from `nu_0`) and the limit are trained `K` steps with the same optimiser
on the same data stream. At every step `k` both carry the same test particles
`z` (random points in a ball, then an adversarial gradient ascent on the worst
of them) through the field of a fixed token measure, and the error is

    E_r[ max_z max_l max_k |z_k^l - z_k(l/L)| + |p_k^l - p_k(l/L)| ].

**The reference.** The limit is deterministic: one particle approximation per
condition serves every initialisation `r`. It uses `J` depth nodes with
piecewise-constant interpolation and `M` antithetic particles per node, drawn
independently at every node (`mfattn.antithetic_mean_field(...,
independent_nodes=True)`): the law at every node is exactly `nu_0`, the
velocity at initialisation is exactly zero, and the Monte-Carlo errors of the
`J` nodes average out along depth. Its own error is measured as `M` against
`4M` particles (fresh draws) and compared with the smallest discrete error.

Every raw measurement and the fits (single slopes, the combined law
`a/L + b L^-alpha H^-gamma`, with bootstrap intervals over initialisations) go
to a JSON file, with a PNG plot next to it. Points already in the JSON are
skipped, so an interrupted run resumes where it stopped.
"""

import argparse
import json
import pathlib
import time
import zlib
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mfattn import (
    AttentionParams,
    DenoisingTask,
    DiscreteTransformer,
    MeanFieldTransformer,
    antithetic_mean_field,
    blockwise_adamw,
    combined_fit,
    flow_error,
    slope_fit,
    solve_discrete,
    solve_limit,
    train,
)

PRESETS = {
    "quick": dict(
        dim=4,
        head_dim=4,
        tokens=16,
        beta=1.0,
        steps=2,
        batch=4,
        lr=2e-2,
        weight_decay=1e-3,
        nodes=8,
        particles=64,
        ref_factor=1,
        inits=2,
        test_points=32,
        radius=1.0,
        L=[2, 4, 8],
        H=[4, 16, 64],
        heatmap=False,
        sweep_LH=[8, 16],
        n_sweep=[16, 32],
        d_sweep=[2, 4],
        sweep_particles=64,
        sweep_ref_factor=1,
        sweep_inits=2,
        adversarial=dict(candidates=2, steps=2, step_size=0.1, where="largest"),
    ),
    "full": dict(
        dim=4,
        head_dim=4,
        tokens=16,
        beta=1.0,
        steps=4,
        batch=8,
        lr=2e-2,
        weight_decay=1e-3,
        nodes=64,
        particles=512,
        ref_factor=4,
        inits=4,
        test_points=64,
        radius=1.0,
        L=[2, 4, 8, 16, 32],
        H=[4, 16, 64, 256],
        heatmap=True,
        sweep_LH=[8, 16],
        n_sweep=[8, 16, 32, 64],
        d_sweep=[2, 4, 8],
        sweep_particles=128,
        sweep_ref_factor=1,
        sweep_inits=3,
        adversarial=dict(candidates=2, steps=2, step_size=0.1, where="cross"),
    ),
}


# --- the pieces ---------------------------------------------------------------
def _optimizer(cfg, name):
    if name == "adamw":
        return optax.adamw(cfg["lr"], weight_decay=cfg["weight_decay"])
    return blockwise_adamw(cfg["lr"], weight_decay=cfg["weight_decay"])


def _trajectory(model, task, opt, cfg, key):
    """Parameters after every training step, `k = 0..K` on the leading axis."""
    res = train(
        model,
        task,
        opt,
        cfg["steps"],
        key,
        batch_size=cfg["batch"],
        steps_per_call=cfg["steps"],
        record_params=True,
        progress=False,
    )
    return jax.tree.map(jnp.asarray, res.trajectory)  # starts with the initial parameters


def _probe(task, cfg, key):
    """A fixed token measure with its loss, and test particles (z, labels) in a ball."""
    ktask, kz, kl = jax.random.split(key, 3)
    measure, loss = task.sample(ktask)
    m, d = cfg["test_points"], task.dim

    def ball(k):
        k1, k2 = jax.random.split(k)
        u = jax.random.normal(k1, (m, d))
        u = u / jnp.linalg.norm(u, axis=-1, keepdims=True)
        return cfg["radius"] * u * jax.random.uniform(k2, (m, 1)) ** (1 / d)

    return measure, loss, ball(kz), ball(kl)


@partial(jax.jit, static_argnames="beta")
def _limit_states(traj, measure, loss, z, zl, beta):
    """Test-particle states and adjoints of the limit at its nodes `t = j / J`
    for every training step: `(K+1, J+1, m, d)` each."""
    J = traj.Q.shape[1]
    ts = jnp.arange(J + 1) / J

    def one(grid):
        sol = solve_limit(
            grid,
            measure,
            loss,
            beta,
            test_points=z,
            test_labels=zl,
            ts=ts,
            interpolation="constant",
        )
        return sol.test_xs, sol.test_ps

    return jax.lax.map(one, traj)


@partial(jax.jit, static_argnames="beta")
def _discrete_errors(traj, lim, measure, loss, z, zl, beta):
    """`(K+1, m)`: max_l |z^l - z(l/L)| + |p^l - p(l/L)| at every training step."""
    L = traj.Q.shape[1]
    every = (lim[0].shape[1] - 1) // L

    def one(params):
        sol = solve_discrete(params, measure, loss, beta, test_points=z, test_labels=zl)
        return sol.test_xs, sol.test_ps

    xs, ps = jax.lax.map(one, traj)
    dx = jnp.linalg.norm(xs - lim[0][:, ::every], axis=-1)
    dp = jnp.linalg.norm(ps - lim[1][:, ::every], axis=-1)
    return jnp.max(dx + dp, axis=1)


def _limit_vs_limit(a, b):
    dx = jnp.linalg.norm(a[0] - b[0], axis=-1)
    dp = jnp.linalg.norm(a[1] - b[1], axis=-1)
    return np.asarray(jnp.max(dx + dp, axis=1))  # (K+1, m)


@partial(jax.jit, static_argnames=("beta", "radius", "step_size", "steps"))
def _adversarial(params, grid, measure, loss, beta, z, zl, radius, step_size, steps):
    """Normalised gradient ascent of the flow error over test particles in the
    ball of radius `radius`, from `z`: returns the best error found per particle."""

    def err(z):
        return flow_error(params, grid, measure, loss, beta, z, zl, interpolation="constant")

    def body(carry, _):
        z, best = carry
        e, g = jax.value_and_grad(lambda z: jnp.sum(err(z)))(z)
        del e
        g = g / (jnp.linalg.norm(g, axis=-1, keepdims=True) + 1e-30)
        z = z + step_size * radius * g
        norm = jnp.linalg.norm(z, axis=-1, keepdims=True)
        z = jnp.where(norm > radius, z * radius / norm, z)
        return (z, jnp.maximum(best, err(z))), None

    (z, best), _ = jax.lax.scan(body, (z, err(z)), None, length=steps)
    return best


# --- one condition --------------------------------------------------------------
class _Condition:
    """The limit (trained once) for one (task, optimiser) condition, shared by
    every discrete model and initialisation compared with it."""

    def __init__(self, cfg, dim, tokens, opt_name, particles, ref_factor, root):
        self.cfg, self.dim, self.opt_name, self.particles = cfg, dim, opt_name, particles
        self.ref_factor = ref_factor
        self.task = DenoisingTask(dim=dim, num_tokens=tokens, num_clusters=3)
        self.opt = _optimizer(cfg, opt_name)
        # the probe, the data stream and the limit's particles depend on the task
        # (d, n) only: conditions that differ by the optimiser (or M) are compared
        # on the same token measure, test particles, data and initialisations
        task_key = jax.random.fold_in(root, zlib.crc32(f"d{dim}-n{tokens}".encode()))
        probe_key, self.train_key, self.limit_key = jax.random.split(task_key, 3)
        self.measure, self.loss, self.z, self.zl = _probe(self.task, cfg, probe_key)
        self._lim = None

    def limit_traj(self, particles, key):
        cfg = self.cfg
        grid = antithetic_mean_field(
            key, cfg["nodes"], particles, self.dim, cfg["head_dim"], independent_nodes=True
        )
        model = MeanFieldTransformer(grid, cfg["beta"], interpolation="constant")
        return _trajectory(model, self.task, self.opt, cfg, self.train_key)

    def states(self, traj):
        return _limit_states(traj, self.measure, self.loss, self.z, self.zl, self.cfg["beta"])

    @property
    def limit(self):
        if self._lim is None:
            self.traj_l = self.limit_traj(self.particles, self.limit_key)
            self._lim = self.states(self.traj_l)
        return self._lim

    def reference_error(self):
        """`M` against `ref_factor * M` particles (independent draws): the limit's
        own error (with `ref_factor = 1`, two independent `M`-particle limits: a
        conservative estimate, about sqrt(2) times the error of one)."""
        big = self.limit_traj(
            self.ref_factor * self.particles, jax.random.fold_in(self.limit_key, 4)
        )
        return _limit_vs_limit(self.limit, self.states(big))

    def discrete(self, L, H, r, adversarial=None):
        cfg = self.cfg
        kd = jax.random.fold_in(jax.random.key(cfg.get("seed", 2026)), 1000 + r)
        params = AttentionParams.xavier_uniform(kd, L, H, self.dim, cfg["head_dim"])
        traj = _trajectory(
            DiscreteTransformer(params, cfg["beta"]), self.task, self.opt, cfg, self.train_key
        )
        err = np.asarray(
            _discrete_errors(
                traj, self.limit, self.measure, self.loss, self.z, self.zl, cfg["beta"]
            )
        )  # (K+1, m)
        out = {
            "L": L,
            "H": H,
            "init": r,
            "uniform_random": float(err.max()),
            "pointwise": float(err[:, 0].max()),  # one fixed z
            "per_step_uniform": err.max(axis=1).tolist(),
        }
        uniform = err.max()
        if adversarial:
            c = adversarial["candidates"]
            worst = np.argsort(err.max(axis=0))[::-1][:c]
            k = int(np.argmax(err[:, worst].max(axis=1)))  # the step where they peak
            at = lambda tree: jax.tree.map(lambda a: a[k], tree)
            best = _adversarial(
                at(traj),
                at(self.traj_l),
                self.measure,
                self.loss,
                cfg["beta"],
                self.z[worst],
                self.zl[worst],
                cfg["radius"],
                adversarial["step_size"],
                adversarial["steps"],
            )
            out["adversarial"] = float(jnp.max(best))
            out["adversarial_gain"] = float(jnp.max(best) / err[k, worst].max())
            uniform = max(uniform, float(jnp.max(best)))
        out["uniform"] = float(uniform)
        return out


# --- the study ------------------------------------------------------------------
def run(preset="quick", out=None, *, progress=True):
    """Run (or resume) the study with the preset `"quick"` or `"full"` (or a dict
    of the same keys), write `out` (JSON) and `out` with suffix `.png`, and
    return the JSON data."""
    cfg = dict(PRESETS[preset]) if isinstance(preset, str) else dict(preset)
    name = preset if isinstance(preset, str) else "custom"
    out = pathlib.Path(out or f"benchmarks/results/scaling_{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(out.read_text()) if out.exists() else {}
    if data.get("config") not in (None, cfg):
        raise ValueError(f"{out} holds results of another configuration; pass another `out`")
    data["config"] = cfg
    data.setdefault("points", {})
    pts = data["points"]
    t0 = time.perf_counter()
    before = data.get("wall_seconds", 0.0)
    root = jax.random.key(cfg.get("seed", 2026))

    def save():
        data["wall_seconds"] = before + time.perf_counter() - t0
        out.write_text(json.dumps(data, indent=1))

    # the work list: conditions (limit + discrete runs (L, H, inits, adversarial));
    # a condition is named by its parameters, so sweeps share identical ones
    Lmax, Hmax = max(cfg["L"]), max(cfg["H"])
    if cfg["heatmap"]:
        grid = [(L, H) for L in cfg["L"] for H in cfg["H"]]
    else:  # the cross: L at the largest H, H at the largest L
        grid = [(L, Hmax) for L in cfg["L"]] + [(Lmax, H) for H in cfg["H"] if H != Hmax]
    adv = cfg["adversarial"]
    where = adv["where"]  # "all" grid points, the "cross" (L or H largest), or "largest"
    with_adv = lambda L, H: (
        where == "all" or (where == "cross" and (L == Lmax or H == Hmax)) or (L, H) == (Lmax, Hmax)
    )
    conditions = {}

    def add(dim, tokens, opt, M, factor, runs):
        name = condition_name(dim, tokens, opt, M)
        c = conditions.setdefault(name, {"args": (dim, tokens, opt, M, factor), "runs": []})
        c["runs"] += [r for r in runs if r not in c["runs"]]
        return name

    base = add(
        cfg["dim"],
        cfg["tokens"],
        "adamw",
        cfg["particles"],
        cfg["ref_factor"],
        [(L, H, cfg["inits"], with_adv(L, H)) for L, H in grid],
    )
    Ls, Hs = cfg["sweep_LH"]
    run_s = [(Ls, Hs, cfg["sweep_inits"], False)]
    Ms, fs = cfg["sweep_particles"], cfg["sweep_ref_factor"]
    for n in cfg["n_sweep"]:
        add(cfg["dim"], n, "adamw", Ms, fs, run_s)
    for opt in ("adamw", "blockwise"):
        for d in cfg["d_sweep"]:
            add(d, cfg["tokens"], opt, Ms, fs, run_s)
    # a sweep run already covered by a run with more inits is not repeated
    for c in conditions.values():
        c["runs"] = [
            r
            for r in c["runs"]
            if not any(q[:2] == r[:2] and (q[2], q[3]) > (r[2], r[3]) for q in c["runs"])
        ]
    total = sum(sum(r[2] for r in c["runs"]) + 1 for c in conditions.values())
    bar = _progress(total, len(pts), progress)
    for cname, c in conditions.items():
        dim, tokens, opt, M, factor = c["args"]
        cond = _Condition(cfg, dim, tokens, opt, M, factor, root)  # trains the limit on use
        for L, H, R, adversarial in c["runs"]:
            for r in range(R):
                key = f"{cname}/L{L}/H{H}/r{r}"
                if key in pts:
                    continue
                res = cond.discrete(L, H, r, adv if adversarial else None)
                pts[key] = {"condition": cname, "dim": dim, "tokens": tokens, "opt": opt, **res}
                bar(f"{key}: uniform {res['uniform']:.4g} pointwise {res['pointwise']:.4g}")
                save()
        rkey = f"{cname}/reference"
        if rkey not in pts:
            err = cond.reference_error()
            pts[rkey] = {
                "condition": cname,
                "particles": M,
                "reference_particles": factor * M,
                "uniform": float(err.max()),
                "per_step_uniform": err.max(axis=1).tolist(),
            }
            bar(f"{rkey}: M={M} vs {factor}M: {err.max():.4g}")
            save()
    bar(None)
    data["summary"] = summarize(data, cfg, grid, out, base)
    save()
    return data


def condition_name(dim, tokens, opt, particles):
    return f"d{dim}-n{tokens}-{opt}-M{particles}"


def _progress(total, done, show):
    t0 = time.perf_counter()
    state = {"done": done}
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=done, disable=not show, desc="scaling study")
    except ImportError:  # pragma: no cover
        bar = None

    def step(msg):
        if msg is None:
            if bar is not None:
                bar.close()
            return
        state["done"] += 1
        if bar is not None:
            bar.update(1)
            if show:
                bar.write(f"[{time.perf_counter() - t0:6.0f}s] {msg}")
        elif show:
            print(f"[{state['done']}/{total}] {msg}", flush=True)

    return step


def summarize(data, cfg, grid, out, base):
    """Fits and the PNG plot from the raw points; returns the summary dict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    pts = data["points"]
    R = cfg["inits"]
    Lmax, Hmax = max(cfg["L"]), max(cfg["H"])

    def per(cname, LH, R, kind="uniform"):
        return np.array([[pts[f"{cname}/L{L}/H{H}/r{r}"][kind] for r in range(R)] for L, H in LH])

    def line(xs, e):
        mean = e.mean(1)
        half = 1.96 * e.std(1, ddof=1) / np.sqrt(e.shape[1]) if e.shape[1] > 1 else 0 * mean
        slope, ci = slope_fit(xs, e, rng)
        return {
            "x": list(xs),
            "mean": mean.tolist(),
            "ci95_halfwidth": half.tolist(),
            "slope": slope,
            "slope_ci95": ci,
        }

    s = {}
    for kind in ("uniform", "uniform_random", "pointwise"):
        s[f"{kind}_vs_L"] = line(cfg["L"], per(base, [(L, Hmax) for L in cfg["L"]], R, kind))
        s[f"{kind}_vs_H"] = line(cfg["H"], per(base, [(Lmax, H) for H in cfg["H"]], R, kind))
    # the heat map and the combined fit use one kind of sup over z on the whole
    # grid: with the adversarial ascent if it ran everywhere, else random z only
    kind = "uniform" if cfg["adversarial"]["where"] == "all" else "uniform_random"
    errors = per(base, grid, R, kind)
    Lg, Hg = [L for L, _ in grid], [H for _, H in grid]
    s["heatmap"] = {"L": Lg, "H": Hg, "kind": kind, "mean": errors.mean(1).tolist()}
    s["combined_fit"] = combined_fit(Lg, Hg, errors, rng)
    s["combined_fit"]["kind"] = kind
    # the points whose mean error is at least 5x the limit's own error: there the
    # reference cannot distort the measurement; the fit on them alone
    ref_base = pts[f"{base}/reference"]["uniform"]
    trusted = [(L, H) for (L, H), m in zip(grid, errors.mean(1)) if m >= 5 * ref_base]
    s["trusted_points"] = [list(t) for t in trusted]
    if len(trusted) >= 6 and len(trusted) < len(grid):
        s["combined_fit_trusted"] = combined_fit(
            [L for L, _ in trusted], [H for _, H in trusted], per(base, trusted, R, kind), rng
        )
    # where the max over training steps is attained, and the error after the last
    # step alone (the part of the error that training adds or removes)
    steps = np.array(
        [[pts[f"{base}/L{L}/H{H}/r{r}"]["per_step_uniform"] for r in range(R)] for L, H in grid]
    )  # (points, R, K+1): random z
    s["argmax_step_counts"] = np.bincount(
        steps.argmax(-1).ravel(), minlength=steps.shape[-1]
    ).tolist()
    final = steps[..., -1]
    s["final_step_heatmap"] = final.mean(1).tolist()
    s["combined_fit_final_step"] = combined_fit(Lg, Hg, final, rng)
    s["reference_final_step"] = pts[f"{base}/reference"]["per_step_uniform"][-1]
    Ls, Hs = cfg["sweep_LH"]
    Rs = cfg["sweep_inits"]
    Ms = cfg["sweep_particles"]

    def sweep(names):
        return np.array(
            [[pts[f"{n}/L{Ls}/H{Hs}/r{r}"]["uniform"] for r in range(Rs)] for n in names]
        )

    n_names = [condition_name(cfg["dim"], n, "adamw", Ms) for n in cfg["n_sweep"]]
    s["uniform_vs_n"] = line(cfg["n_sweep"], sweep(n_names))
    sweep_names = set(n_names)
    for opt in ("adamw", "blockwise"):
        names = [condition_name(d, cfg["tokens"], opt, Ms) for d in cfg["d_sweep"]]
        sweep_names |= set(names)
        s[f"uniform_vs_d_{opt}"] = line(cfg["d_sweep"], sweep(names))
    refs = {k.split("/")[0]: v["uniform"] for k, v in pts.items() if k.endswith("/reference")}
    s["reference_error"] = refs
    smallest = min(s["heatmap"]["mean"])
    ratios = {n: refs[n] / sweep([n]).mean() for n in sorted(sweep_names)}
    s["reference"] = {
        "base_error": refs[base],
        "base_particles": cfg["particles"],
        "base_reference_particles": cfg["ref_factor"] * cfg["particles"],
        "smallest_discrete_error": smallest,
        "ratio": refs[base] / smallest,
        "below_a_fifth": bool(refs[base] < smallest / 5),
        # the measured difference holds the errors of both independent limits; with
        # Monte-Carlo errors ~ M^-1/2 the M-particle limit's alone is this much of it
        "base_error_alone_estimate": refs[base] / np.sqrt(1 + 1 / cfg["ref_factor"]),
        "sweep_ratios": ratios,
        "sweeps_worst_ratio": max(ratios.values()),
    }
    if "wall_seconds" in data:
        s["wall_seconds"] = data["wall_seconds"]
    _plot(plt, s, cfg, out)
    _print(s)
    return s


def _plot(plt, s, cfg, out):
    fig, axes = plt.subplots(1, 5, figsize=(24, 4.2))
    ref = s["reference"]["base_error"]
    for ax, v in [(axes[0], "L"), (axes[1], "H")]:
        for kind, marker in [("uniform", "o"), ("uniform_random", "^"), ("pointwise", "s")]:
            e = s[f"{kind}_vs_{v}"]
            ax.errorbar(
                e["x"],
                e["mean"],
                yerr=e["ci95_halfwidth"],
                fmt=marker + "-",
                capsize=3,
                label=f"{kind}: slope {e['slope']:.2f} "
                f"[{e['slope_ci95'][0]:.2f}, {e['slope_ci95'][1]:.2f}]",
            )
        x = np.asarray(s[f"uniform_vs_{v}"]["x"], float)
        m0 = s[f"uniform_vs_{v}"]["mean"][0]
        if v == "L":
            ax.plot(x, m0 * (x / x[0]) ** -1.0, "k:", label="1/L")
            ax.plot(x, m0 * (x / x[0]) ** (-1 / 3), "k--", label="theorem L^-1/3")
            ax.plot(x, m0 * (x / x[0]) ** (-1 / 2), "k-.", label="ResNet L^-1/2")
        else:
            ax.plot(x, m0 * (x / x[0]) ** -0.5, "k--", label="theorem H^-1/2")
        ax.axhline(ref, color="C3", lw=0.8, label="limit's own error")
        title = f"H = {max(cfg['H'])}" if v == "L" else f"L = {max(cfg['L'])}"
        ax.set(
            xscale="log", yscale="log", xlabel=v, ylabel="E sup_z max_l max_k error", title=title
        )
        ax.legend(fontsize=6)
    hm = s["heatmap"]
    Ls, Hs = sorted(set(hm["L"])), sorted(set(hm["H"]))
    img = np.full((len(Ls), len(Hs)), np.nan)
    for L, H, m in zip(hm["L"], hm["H"], hm["mean"]):
        img[Ls.index(L), Hs.index(H)] = m
    im = axes[2].imshow(np.log10(img), origin="lower", cmap="viridis", aspect="auto")
    axes[2].set(
        xticks=range(len(Hs)),
        xticklabels=Hs,
        yticks=range(len(Ls)),
        yticklabels=Ls,
        xlabel="H",
        ylabel="L",
        title="log10 uniform error",
    )
    for i in range(len(Ls)):
        for j in range(len(Hs)):
            if np.isfinite(img[i, j]):
                axes[2].text(
                    j, i, f"{img[i, j]:.3f}", ha="center", va="center", fontsize=7, color="w"
                )
    fig.colorbar(im, ax=axes[2])
    cf = s["combined_fit"]
    axes[2].set_title(f"fit a/L + b L^-{cf['alpha']:.2f} H^-{cf['gamma']:.2f}", fontsize=9)
    e = s["uniform_vs_n"]
    axes[3].errorbar(
        e["x"],
        e["mean"],
        yerr=e["ci95_halfwidth"],
        fmt="o-",
        capsize=3,
        label=f"slope {e['slope']:.2f}",
    )
    axes[3].set(
        xscale="log",
        yscale="log",
        xlabel="tokens n",
        title=f"uniform error vs n (L, H = {tuple(cfg['sweep_LH'])})",
    )
    axes[3].legend(fontsize=7)
    for opt, marker in [("adamw", "o"), ("blockwise", "s")]:
        e = s[f"uniform_vs_d_{opt}"]
        axes[4].errorbar(
            e["x"],
            e["mean"],
            yerr=e["ci95_halfwidth"],
            fmt=marker + "-",
            capsize=3,
            label=f"{opt}: slope {e['slope']:.2f}",
        )
    axes[4].set(xscale="log", yscale="log", xlabel="dimension d", title="uniform error vs d")
    axes[4].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


def _fit_text(f):
    """`alpha = .. [..], gamma = .. [..], a = ..; RMS log-residual .. (theorem .., ResNet ..)`."""
    ci = lambda k: [round(x, 3) for x in f[f"{k}_ci95"]]
    return (
        f"alpha = {f['alpha']:.3f} {ci('alpha')}, gamma = {f['gamma']:.3f} {ci('gamma')}, "
        f"a = {f['a']:.3g}; RMS log-residual {f['rms_log_residual']:.3f} (theorem "
        f"{f['theorem_fixed']['rms_log_residual']:.3f}, ResNet "
        f"{f['resnet_fixed']['rms_log_residual']:.3f})"
    )


def _print(s):
    for k, v in s.items():
        if isinstance(v, dict) and "slope" in v:
            print(
                f"{k:24s} mean {np.round(v['mean'], 4).tolist()}  slope {v['slope']:.3f} "
                f"CI {np.round(v['slope_ci95'], 3).tolist()}"
            )
    print(f"combined fit a/L + b L^-alpha H^-gamma: {_fit_text(s['combined_fit'])}")
    r = s["reference"]
    print(
        f"limit reference error (M = {r['base_particles']} vs {r['base_reference_particles']}):"
        f" {r['base_error']:.4g}, smallest discrete error "
        f"{r['smallest_discrete_error']:.4g} (ratio {r['ratio']:.3f}; below a fifth: "
        f"{r['below_a_fifth']}); sweeps' worst ratio {r['sweeps_worst_ratio']:.3f}"
    )
    print(
        f"sup over k attained at k = 0, 1, ...: {s['argmax_step_counts']}; after the last step "
        f"alone: {_fit_text(s['combined_fit_final_step'])}"
    )


def table(data) -> str:
    """The study's results as Markdown (the tables of `benchmarks/README.md`)."""
    cfg, s, pts = data["config"], data["summary"], data["points"]
    hm = s["heatmap"]
    Ls, Hs = sorted(set(hm["L"])), sorted(set(hm["H"]))
    cell = {(L, H): m for L, H, m in zip(hm["L"], hm["H"], hm["mean"])}
    lines = [
        f"Mean over {cfg['inits']} initialisations of the {hm['kind']} error (rows L, columns H):",
        "",
        "| L \\ H | " + " | ".join(map(str, Hs)) + " |",
        "| --: | " + " | ".join("--:" for _ in Hs) + " |",
    ]
    for L in Ls:
        row = [f"{cell[(L, H)]:.4f}" if (L, H) in cell else "" for H in Hs]
        lines.append(f"| {L} | " + " | ".join(row) + " |")
    lines += [
        "",
        "| sweep | x | uniform (adversarial) | uniform (random z) | pointwise | slopes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for v in ("L", "H"):
        u, r, p = (s[f"{k}_vs_{v}"] for k in ("uniform", "uniform_random", "pointwise"))
        at = f"H = {max(cfg['H'])}" if v == "L" else f"L = {max(cfg['L'])}"
        fmt = lambda e: " ".join(f"{m:.4f}" for m in e["mean"])
        sl = lambda e: f"{e['slope']:.2f} [{e['slope_ci95'][0]:.2f}, {e['slope_ci95'][1]:.2f}]"
        lines.append(
            f"| {v} at {at} | {u['x']} | {fmt(u)} | {fmt(r)} | {fmt(p)} | "
            f"{sl(u)} / {sl(r)} / {sl(p)} |"
        )
    for k in ("uniform_vs_n", "uniform_vs_d_adamw", "uniform_vs_d_blockwise"):
        e = s[k]
        lines.append(
            f"| {k[len('uniform_vs_') :]} at (L, H) = {tuple(cfg['sweep_LH'])} | "
            f"{e['x']} | | {' '.join(f'{m:.4f}' for m in e['mean'])} | | "
            f"{e['slope']:.2f} [{e['slope_ci95'][0]:.2f}, {e['slope_ci95'][1]:.2f}] |"
        )
    cf = s["combined_fit"]
    r = s["reference"]
    if "combined_fit_trusted" in s:
        trusted = (
            f" On the {len(s['trusted_points'])} grid points whose error is at least 5x the "
            f"limit's own (the reference cannot distort them): "
            f"{_fit_text(s['combined_fit_trusted'])}."
        )
    else:
        trusted = ""
    counts = s["argmax_step_counts"]
    final = (
        f"The max over training steps k = 0..{len(counts) - 1} is attained at k = 0 (the "
        f"initialisation) in {counts[0]} of {sum(counts)} runs of the grid. The error after "
        f"the last step alone: {_fit_text(s['combined_fit_final_step'])}; smallest "
        f"{min(s['final_step_heatmap']):.4g}, against the limit's own error at that step "
        f"{s['reference_final_step']:.4g}."
    )
    lines += [
        "",
        f"Combined fit `a/L + b L^-alpha H^-gamma` ({cf['kind']}): a = {cf['a']:.3g} "
        f"{[round(x, 3) for x in cf['a_ci95']]}, b = {cf['b']:.3g}, alpha = "
        f"{cf['alpha']:.3f} {[round(x, 3) for x in cf['alpha_ci95']]}, gamma = "
        f"{cf['gamma']:.3f} {[round(x, 3) for x in cf['gamma_ci95']]}; RMS log-residual "
        f"{cf['rms_log_residual']:.3f}, against {cf['theorem_fixed']['rms_log_residual']:.3f}"
        f" with the theorem's exponents (1/3, 1/2) and "
        f"{cf['resnet_fixed']['rms_log_residual']:.3f} with the ResNet ones (1/2, 1/2)." + trusted,
        "",
        final,
        "",
        f"Limit's own error: M = {r['base_particles']} against "
        f"{r['base_reference_particles']} particles per node: {r['base_error']:.4g}; "
        f"smallest discrete error {r['smallest_discrete_error']:.4g} (ratio "
        f"{r['ratio']:.3f}, below a fifth: {r['below_a_fifth']}). Sweeps (M = "
        f"{cfg['sweep_particles']} against {cfg['sweep_ref_factor'] * cfg['sweep_particles']}"
        f"): worst ratio to their discrete error {r['sweeps_worst_ratio']:.3f}. The "
        f"measured difference holds the errors of both independent limits: with "
        f"Monte-Carlo errors ~ M^-1/2, the M-particle limit's alone is about "
        f"{r['base_error_alone_estimate']:.4g} (ratio "
        f"{r['base_error_alone_estimate'] / r['smallest_discrete_error']:.3f}).",
        "",
        f"Wall time: {data.get('wall_seconds', float('nan')) / 60:.1f} min.",
    ]
    del pts
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--quick", action="store_true", help="the < 5 minute preset")
    ap.add_argument("--out", default=None, help="JSON output (the PNG goes next to it)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--table", action="store_true", help="print the Markdown table and exit")
    args = ap.parse_args(argv)
    if args.table:
        preset = "quick" if args.quick else "full"
        out = pathlib.Path(args.out or f"benchmarks/results/scaling_{preset}.json")
        print(table(json.loads(out.read_text())))
        return None
    jax.config.update("jax_enable_x64", True)
    preset = "quick" if args.quick else "full"
    data = run(preset, args.out, progress=not args.no_progress)
    out = pathlib.Path(args.out or f"benchmarks/results/scaling_{preset}.json")
    print(f"written to {out} and {out.with_suffix('.png')} ({data['wall_seconds']:.0f} s)")
    return data
