"""The scaling-law study (SPEC section 7): how far a trained finite transformer
(L layers, H heads) is from its trained mean-field limit, uniformly over test
particles, against L and H.

    python -m benchmarks.scaling --quick      # < 5 minutes on 2 cores
    python -m benchmarks.scaling              # the full preset

For each initialisation r (R of them) the discrete model (heads i.i.d. per layer
from nu_0) and the limit (M antithetic particles from the same nu_0 on a depth
grid) are trained K steps with the same optimiser on the same data stream; at
every step k both carry the same test particles z (a random set in a ball, with
labels) through the field of a fixed token measure, and the error is

    E_r[ max_z max_l max_k |z_k^l - z_k(l/L)| + |p_k^l - p_k(l/L)| ].

The limit's own error is measured as M against 4M particles. Results (every raw
measurement, fits with bootstrap intervals) go to a JSON file and a PNG plot;
points already in the JSON are skipped, so an interrupted run resumes.
"""

import argparse
import json
import pathlib
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import mfattn  # noqa: E402

PRESETS = {
    "quick": dict(
        dim=4,
        head_dim=4,
        tokens=16,
        beta=1.0,
        steps=4,
        batch=8,
        lr=2e-2,
        nodes=17,
        particles=128,
        inits=3,
        test_points=48,
        radius=1.0,
        L_sweep=[2, 4, 8, 16],
        H_at_L=64,
        H_sweep=[4, 16, 64],
        L_at_H=8,
    ),
    "full": dict(
        dim=4,
        head_dim=4,
        tokens=32,
        beta=1.0,
        steps=20,
        batch=16,
        lr=1e-2,
        nodes=33,
        particles=256,
        inits=8,
        test_points=256,
        radius=1.5,
        L_sweep=[2, 4, 8, 16, 32],
        H_at_L=256,
        H_sweep=[4, 16, 64, 256],
        L_at_H=16,
    ),
}


def optimizer(cfg):
    return optax.adamw(cfg["lr"], weight_decay=1e-3)


def task_for(cfg):
    return mfattn.DenoisingTask(dim=cfg["dim"], num_tokens=cfg["tokens"], num_clusters=3)


def train_traj(model, cfg, key):
    res = mfattn.train(
        model,
        task_for(cfg),
        optimizer(cfg),
        cfg["steps"],
        key,
        batch_size=cfg["batch"],
        steps_per_call=cfg["steps"],
        record_params=True,
        progress=False,
    )
    return jax.tree.map(jnp.asarray, res.trajectory)


def probe(cfg, key):
    """A fixed token measure with its loss, and test particles (z, labels) in a ball."""
    ktask, kz, kl = jax.random.split(key, 3)
    measure, loss = task_for(cfg).sample(ktask)
    m, d = cfg["test_points"], cfg["dim"]

    def ball(k):
        k1, k2 = jax.random.split(k)
        u = jax.random.normal(k1, (m, d))
        u = u / jnp.linalg.norm(u, axis=-1, keepdims=True)
        return cfg["radius"] * u * jax.random.uniform(k2, (m, 1)) ** (1 / d)

    return measure, loss, ball(kz), ball(kl)


def limit_flows(traj_l, cfg, measure, loss, z, zl, Lmax):
    """Test-particle states and adjoints of the limit at t = j / Lmax, for every
    training step: `(K+1, Lmax+1, m, d)` each. Solved once, shared by all L."""
    ts = jnp.arange(Lmax + 1) / Lmax

    def one(grid):
        sol = mfattn.solve_limit(
            grid, measure, loss, cfg["beta"], test_points=z, test_labels=zl, ts=ts
        )
        return sol.test_xs, sol.test_ps

    return jax.jit(jax.vmap(one))(traj_l)


def errors_over_training(traj_d, lim, cfg, measure, loss, z, zl, Lmax):
    """(K+1, m): max_l |z^l - z(l/L)| + |p^l - p(l/L)| at every training step."""
    L = traj_d.Q.shape[1]

    def one(params):
        sol = mfattn.solve_discrete(
            params, measure, loss, cfg["beta"], test_points=z, test_labels=zl
        )
        return sol.test_xs, sol.test_ps

    xs, ps = jax.jit(jax.vmap(one))(traj_d)
    every = Lmax // L
    dx = jnp.linalg.norm(xs - lim[0][:, ::every], axis=-1)
    dp = jnp.linalg.norm(ps - lim[1][:, ::every], axis=-1)
    return np.asarray(jnp.max(dx + dp, axis=1))


def limit_vs_limit(traj_a, traj_b, cfg, measure, loss, z, zl, L):
    ts = jnp.arange(L + 1) / L

    def one(ga, gb):
        a = mfattn.solve_limit(ga, measure, loss, cfg["beta"], test_points=z, test_labels=zl, ts=ts)
        b = mfattn.solve_limit(gb, measure, loss, cfg["beta"], test_points=z, test_labels=zl, ts=ts)
        dx = jnp.linalg.norm(a.test_xs - b.test_xs, axis=-1)
        dp = jnp.linalg.norm(a.test_ps - b.test_ps, axis=-1)
        return jnp.max(dx + dp, axis=0)

    return np.asarray(jax.vmap(one)(traj_a, traj_b))


def slope_fit(xs, per_init, rng, boots=2000):
    """Least-squares slope of log(mean error) on log(x), with a bootstrap over inits."""
    xs = np.log(np.asarray(xs, float))
    per_init = np.asarray(per_init)  # (points, R)
    fit = lambda e: np.polyfit(xs, np.log(e.mean(axis=1)), 1)[0]
    R = per_init.shape[1]
    samples = [fit(per_init[:, rng.integers(0, R, R)]) for _ in range(boots)]
    return float(fit(per_init)), [
        float(np.quantile(samples, 0.025)),
        float(np.quantile(samples, 0.975)),
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    preset = "quick" if args.quick else "full"
    cfg = PRESETS[preset]
    out = pathlib.Path(args.out or f"benchmarks/results/scaling_{preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(out.read_text()) if out.exists() else {}
    if data.get("config") not in (None, cfg):
        raise SystemExit(f"{out} holds results of another configuration; pass --out")
    data["config"] = cfg
    data.setdefault("points", {})
    t0 = time.perf_counter()
    root = jax.random.key(2026)
    probe_key, train_key = jax.random.split(jax.random.fold_in(root, 1))
    measure, loss, z, zl = probe(cfg, probe_key)
    Lmax = max(cfg["L_sweep"] + [cfg["L_at_H"]])
    points = [("L", L, cfg["H_at_L"]) for L in cfg["L_sweep"]]
    points += [("H", cfg["L_at_H"], H) for H in cfg["H_sweep"]]

    def save():
        data["wall_seconds"] = data.get("wall_seconds_before", 0.0) + time.perf_counter() - t0
        out.write_text(json.dumps(data, indent=1))

    for r in range(cfg["inits"]):
        kd, kl = jax.random.split(jax.random.fold_in(root, 100 + r))
        lim_key = f"limit/r{r}"
        traj_l = traj_l4 = None
        for sweep, L, H in points:
            name = f"{sweep}/L{L}/H{H}/r{r}"
            if name in data["points"]:
                continue
            if traj_l is None:
                grid = mfattn.antithetic_mean_field(
                    kl, cfg["nodes"], cfg["particles"], cfg["dim"], cfg["head_dim"]
                )
                traj_l = train_traj(mfattn.MeanFieldTransformer(grid, cfg["beta"]), cfg, train_key)
                lim = limit_flows(traj_l, cfg, measure, loss, z, zl, Lmax)
            params = mfattn.AttentionParams.xavier_uniform(kd, L, H, cfg["dim"], cfg["head_dim"])
            traj_d = train_traj(mfattn.DiscreteTransformer(params, cfg["beta"]), cfg, train_key)
            err = errors_over_training(traj_d, lim, cfg, measure, loss, z, zl, Lmax)  # (K+1, m)
            data["points"][name] = {
                "sweep": sweep,
                "L": L,
                "H": H,
                "init": r,
                "uniform": float(err.max()),  # sup over z, max over k (and l inside)
                "pointwise": float(err[:, 0].max()),  # one fixed z
                "per_step_uniform": err.max(axis=1).tolist(),
            }
            print(
                f"[{time.perf_counter() - t0:6.0f}s] {name}: uniform {err.max():.4g}  "
                f"pointwise {err[:, 0].max():.4g}",
                flush=True,
            )
            save()
        if lim_key not in data["points"]:
            if traj_l is None:
                grid = mfattn.antithetic_mean_field(
                    kl, cfg["nodes"], cfg["particles"], cfg["dim"], cfg["head_dim"]
                )
                traj_l = train_traj(mfattn.MeanFieldTransformer(grid, cfg["beta"]), cfg, train_key)
            big = mfattn.antithetic_mean_field(
                jax.random.fold_in(kl, 4),
                cfg["nodes"],
                4 * cfg["particles"],
                cfg["dim"],
                cfg["head_dim"],
            )
            traj_l4 = train_traj(mfattn.MeanFieldTransformer(big, cfg["beta"]), cfg, train_key)
            ref = limit_vs_limit(traj_l, traj_l4, cfg, measure, loss, z, zl, Lmax)
            data["points"][lim_key] = {"sweep": "reference", "init": r, "uniform": float(ref.max())}
            print(
                f"[{time.perf_counter() - t0:6.0f}s] {lim_key}: M vs 4M {ref.max():.4g}", flush=True
            )
            save()

    summarize(data, cfg, out)
    data["wall_seconds_before"] = data["wall_seconds"]
    save()
    return data


def summarize(data, cfg, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    pts = data["points"]
    R = cfg["inits"]

    def table(sweep, xs, key, kind="uniform"):
        per = []
        for x in xs:
            L, H = (x, cfg["H_at_L"]) if sweep == "L" else (cfg["L_at_H"], x)
            per.append([pts[f"{sweep}/L{L}/H{H}/r{r}"][kind] for r in range(R)])
        return np.array(per)

    summary = {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, sweep, xs in [(axes[0], "L", cfg["L_sweep"]), (axes[1], "H", cfg["H_sweep"])]:
        for kind, marker in [("uniform", "o"), ("pointwise", "s")]:
            per = table(sweep, xs, sweep, kind)
            mean = per.mean(1)
            half = 1.96 * per.std(1, ddof=1) / np.sqrt(R) if R > 1 else np.zeros_like(mean)
            slope, ci = slope_fit(xs, per, rng)
            summary[f"{kind}_vs_{sweep}"] = {
                "x": list(xs),
                "mean": mean.tolist(),
                "ci95_halfwidth": half.tolist(),
                "slope": slope,
                "slope_ci95": ci,
            }
            ax.errorbar(
                xs,
                mean,
                yerr=half,
                fmt=marker + "-",
                capsize=3,
                label=f"{kind}: slope {slope:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]",
            )
        x = np.array(xs, float)
        m0 = summary[f"uniform_vs_{sweep}"]["mean"][0]
        if sweep == "L":
            ax.plot(x, m0 * (x / x[0]) ** -1.0, "k:", label="theory 1/L")
            ax.plot(x, m0 * (x / x[0]) ** (-1 / 3), "k--", label="theory L^-1/3")
        else:
            ax.plot(x, m0 * (x / x[0]) ** -0.5, "k--", label="theory H^-1/2")
        ref = [pts[f"limit/r{r}"]["uniform"] for r in range(R)]
        ax.axhline(np.mean(ref), color="C3", lw=0.8, label="limit M vs 4M")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel=sweep,
            ylabel="E sup_z max_l max_k error",
            title=f"H = {cfg['H_at_L']}" if sweep == "L" else f"L = {cfg['L_at_H']}",
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)
    ref = [pts[f"limit/r{r}"]["uniform"] for r in range(R)]
    smallest = min(min(v["mean"]) for k, v in summary.items() if k.startswith("uniform"))
    summary["reference_error"] = float(np.mean(ref))
    summary["reference_below_fifth_of_smallest"] = bool(np.mean(ref) < smallest / 5)
    data["summary"] = summary
    for k, v in summary.items():
        if isinstance(v, dict):
            print(
                f"{k:22s} mean {np.round(v['mean'], 4).tolist()}  slope {v['slope']:.3f} "
                f"CI {np.round(v['slope_ci95'], 3).tolist()}"
            )
    print(
        f"limit reference error (M vs 4M): {summary['reference_error']:.4g}; below a fifth of "
        f"the smallest discrete error: {summary['reference_below_fifth_of_smallest']}"
    )
    print(f"written to {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
