"""Synchronisation by noise in the common-noise SDE (docs/theory.md, section 9).

    python -m benchmarks.synchronisation --quick   # a few minutes on 2 cores
    python -m benchmarks.synchronisation           # the full preset (resumable)

Tokens follow `mfattn.solve_sde`: `n` tokens in `R^d`, noise from `M` attention
features (Xavier-uniform draws, `k = d`, variance factor `1/H`) and `M'` MLP
features (`mfattn.MLPParams.init`, output scale `s`, hidden width `m`), an
optional self-attention drift `alpha * Gamma(x, mu; Q = K = V = O = I)` (which
pushes tokens apart), Euler-Maruyama with a constant step. Every path draws
its own features, initial tokens `N(0, I)` and Brownian motion. Measured:

- the top Lyapunov exponent `lambda` of the linearised `n`-token flow
  (tangent propagation, renormalised at `segments` times; the rate over the
  last three quarters of `[0, T]`): two token sets driven by the same noise
  merge when `lambda < 0`;
- the rate of the pairwise spread `W(mu_t) = (1/2) iint |x - y|^2 dmu dmu`
  (slope of `log W` over the same window): the tokens of one set merge when
  it is negative; and the fraction of paths with `W(T) < 1e-3 W(0)`;
- propagation of chaos: the distance (MMD and exact W2) between the empirical
  measures of `n` and `2n` tokens (the first `n` shared) driven by the same
  noise and features, against `n`.

Part A: pure noise (no drift), every activation, MLP noise, attention noise
and both, `d = 1, 2, 3`. Part B: the expanding drift `alpha = 1` against the
MLP noise scale `s` and against the attention noise `1/H`, for `beta` in the
preset, `d = 1, 2`: where `lambda` changes sign. Part C: chaos. Means over
`paths` independent paths with 95% intervals (1.96 standard errors).
"""

import argparse
import json
import os
import platform
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

import mfattn  # noqa: E402

ACTIVATIONS = ("tanh", "relu", "gelu", "linear")
PRESETS = {
    "quick": dict(
        paths=16,
        n=8,
        features=16,
        width=16,
        T=4.0,
        dt=1 / 16,
        segments=8,
        dims=(1, 2, 3),
        line_dims=(1, 2),
        scales=(0.5, 1.0, 2.0, 4.0),
        att_vars=(0.25, 1.0, 4.0),
        betas=(1.0, 4.0),
        chaos_n=(4, 8, 16),
        chaos_paths=16,
    ),
    "full": dict(
        paths=48,
        n=8,
        features=16,
        width=16,
        T=6.0,
        dt=1 / 32,
        segments=12,
        dims=(1, 2, 3),
        line_dims=(1, 2),
        scales=(0.5, 1.0, 2.0, 3.0, 4.0, 6.0),
        att_vars=(0.25, 1.0, 4.0),
        betas=(1.0, 4.0),
        chaos_n=(4, 8, 16, 32),
        chaos_paths=32,
    ),
}
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def mixture(onehot):
    """The activation `onehot . (tanh, relu, gelu, linear)`: one compiled
    program serves every activation (the weights are traced)."""

    def act(x):
        return (
            onehot[0] * jnp.tanh(x)
            + onehot[1] * jax.nn.relu(x)
            + onehot[2] * jax.nn.gelu(x, approximate=False)
            + onehot[3] * x
        )

    return act


def spread(X, w=None):
    """`W(mu) = (1/2) iint |x - y|^2 dmu dmu = sum_i w_i |x_i - mean|^2` for
    the tokens `X (..., n, d)`."""
    if w is None:
        w = jnp.full(X.shape[-2], 1.0 / X.shape[-2])
    mean = jnp.einsum("n,...nd->...d", w, X)
    return jnp.einsum("n,...n->...", w, jnp.sum((X - mean[..., None, :]) ** 2, axis=-1))


def make_runner(cfg, d):
    """`run(keys, onehot, att_var, scale, beta, alpha) -> (log_tangent, log W/W0)`
    over `(paths, segments + 1)`; one compile per dimension."""
    n, M, m, T, dt = cfg["n"], cfg["features"], cfg["width"], cfg["T"], cfg["dt"]
    ts = jnp.linspace(0.0, T, cfg["segments"] + 1)
    eye = jnp.eye(d)[None, None]

    @jax.jit
    def run(keys, onehot, att_var, scale, beta, alpha):
        drift = mfattn.AttentionParams(eye, eye, eye, alpha * eye)

        def one(key):
            kf, km, kx, kb, kt = jax.random.split(key, 5)
            feats = mfattn.AttentionParams.xavier_uniform(kf, 1, M, d, d).layer(0)
            feats = eqx.tree_at(lambda p: p.O, feats, feats.O * jnp.sqrt(att_var))
            mlp = mfattn.MLPParams.init(km, M, d, m, scale=scale)
            x0 = jax.random.normal(kx, (n, d))
            sol = mfattn.solve_sde(
                feats,
                mfattn.EmpiricalMeasure(x0),
                beta,
                kb,
                heads=1,
                mlp=mlp,
                activation=mixture(onehot),
                drift=drift,
                t1=T,
                dt0=dt,
                ts=ts,
                tangent=jax.random.normal(kt, (n, d)),
            )
            # W underflows to 0 once the tokens coincide to float64 precision:
            # floored, so that such rates are bounds (of smaller magnitude)
            W = jnp.maximum(spread(sol.xs), 1e-300)
            return sol.log_tangent, jnp.log(W / W[0])

        return jax.vmap(one)(keys)

    return run, np.asarray(ts)


def summarise(log_tangent, log_w, ts):
    """Rates over the window `[T/4, T]`, means and 95% intervals over paths."""
    q = (len(ts) - 1) // 4
    span = ts[-1] - ts[q]
    lam = (log_tangent[:, -1] - log_tangent[:, q]) / span
    rate = (log_w[:, -1] - log_w[:, q]) / span
    finite = np.isfinite(lam) & np.isfinite(rate)
    lam, rate = lam[finite], rate[finite]
    ci = lambda a: float(1.96 * a.std(ddof=1) / np.sqrt(a.size))
    return dict(
        lyapunov=float(lam.mean()),
        lyapunov_ci=ci(lam),
        spread_rate=float(rate.mean()),
        spread_rate_ci=ci(rate),
        sync_fraction=float(np.mean(log_w[:, -1] < np.log(1e-3))),
        paths=int(finite.sum()),
        nonfinite=int((~finite).sum()),
        mean_log_spread=np.nanmean(log_w, axis=0).tolist(),
    )


def verdict(rec):
    lo, hi = rec["lyapunov"] - rec["lyapunov_ci"], rec["lyapunov"] + rec["lyapunov_ci"]
    return "sync" if hi < 0 else ("no sync" if lo > 0 else "undecided")


def crossing(xs, ys):
    """The first `x` where `y` changes sign (log-linear interpolation), or None."""
    for i in range(len(xs) - 1):
        if ys[i] == 0:
            return float(xs[i])
        if ys[i] * ys[i + 1] < 0:
            lx = np.log(xs[i]) + (np.log(xs[i + 1]) - np.log(xs[i])) * ys[i] / (ys[i] - ys[i + 1])
            return float(np.exp(lx))
    return None


def part_sign(cfg, results, save):
    """Part A: the sign of `lambda` under pure noise."""
    rows = results.setdefault("sign", [])
    done = {(r["d"], r["noise"], r["activation"]) for r in rows}
    keys = jax.random.split(jax.random.key(1), cfg["paths"])
    for d in cfg["dims"]:
        run, ts = make_runner(cfg, d)
        jobs = [("attention", "-", 1.0, 0.0)]
        jobs += [("mlp", a, 0.0, 1.0) for a in ACTIVATIONS]
        jobs += [("both", a, 1.0, 1.0) for a in ACTIVATIONS]
        for noise, act, att_var, scale in jobs:
            if (d, noise, act) in done:
                continue
            onehot = np.eye(4)[ACTIVATIONS.index(act) if act != "-" else 0]
            t0 = time.time()
            lt, lw = (np.asarray(a) for a in run(keys, onehot, att_var, scale, 1.0, 0.0))
            rec = dict(d=d, noise=noise, activation=act, beta=1.0, att_var=att_var, scale=scale)
            rec.update(summarise(lt, lw, ts), seconds=time.time() - t0)
            rec["verdict"] = verdict(rec)
            rows.append(rec)
            print(
                f"[sign] d={d} {noise:9s} {act:6s} lambda={rec['lyapunov']:+.3f}"
                f"±{rec['lyapunov_ci']:.3f} spread rate={rec['spread_rate']:+.3f}"
                f"±{rec['spread_rate_ci']:.3f} {rec['verdict']}",
                flush=True,
            )
            save()


def part_line(cfg, results, save):
    """Part B: noise strength against the expanding drift `alpha = 1`."""
    rows = results.setdefault("line", [])
    done = {(r["d"], r["noise"], r["activation"], r["beta"], r["strength"]) for r in rows}
    keys = jax.random.split(jax.random.key(2), cfg["paths"])
    for d in cfg["line_dims"]:
        run, ts = make_runner(cfg, d)
        jobs = [
            ("mlp", a, b, s, 0.0, s)
            for a in ACTIVATIONS
            for b in cfg["betas"]
            for s in cfg["scales"]
        ]
        jobs += [("attention", "-", b, v, v, 0.0) for b in cfg["betas"] for v in cfg["att_vars"]]
        for noise, act, beta, strength, att_var, scale in jobs:
            if (d, noise, act, beta, strength) in done:
                continue
            onehot = np.eye(4)[ACTIVATIONS.index(act) if act != "-" else 0]
            t0 = time.time()
            lt, lw = (np.asarray(a) for a in run(keys, onehot, att_var, scale, beta, 1.0))
            rec = dict(d=d, noise=noise, activation=act, beta=beta, strength=strength, alpha=1.0)
            rec.update(summarise(lt, lw, ts), seconds=time.time() - t0)
            rec["verdict"] = verdict(rec)
            rows.append(rec)
            print(
                f"[line] d={d} {noise:9s} {act:6s} beta={beta} strength={strength} "
                f"lambda={rec['lyapunov']:+.3f}±{rec['lyapunov_ci']:.3f} "
                f"spread rate={rec['spread_rate']:+.3f}±{rec['spread_rate_ci']:.3f}",
                flush=True,
            )
            save()


def w2_uniform(X, Y):
    """Exact W2 between uniform empirical measures of `n` and `2n` points
    (each of the `n` split in two halves: an assignment problem)."""
    from scipy.optimize import linear_sum_assignment

    Xd = np.repeat(X, Y.shape[0] // X.shape[0], axis=0)
    cost = np.sum((Xd[:, None] - Y[None]) ** 2, axis=-1)
    r, c = linear_sum_assignment(cost)
    return float(np.sqrt(cost[r, c].mean()))


def mmd(X, Y, bandwidth=1.0):
    k = lambda A, B: np.exp(-np.sum((A[:, None] - B[None]) ** 2, -1) / (2 * bandwidth**2))
    v = k(X, X).mean() - 2 * k(X, Y).mean() + k(Y, Y).mean()
    return float(np.sqrt(max(v, 0.0)))


def part_chaos(cfg, results, save):
    """Part C: empirical measures of `n` and `2n` tokens under the same noise
    (the first `n` initial tokens shared; attention noise `1/H = 1/4` and tanh
    MLP noise, `d = 2`, no drift). Distances after centring both clouds at
    the `2n`-cloud's mean and dividing by its RMS radius (scale-free: the
    noise moves the whole cloud by large amounts)."""
    if "chaos" in results and results["chaos"].get("complete"):
        return
    d, M, m = 2, cfg["features"], cfg["width"]
    N = 2 * max(cfg["chaos_n"])
    T, dt = cfg["T"], cfg["dt"]

    @jax.jit
    def run(keys, w):
        def one(key):
            kf, km, kx, kb = jax.random.split(key, 4)
            feats = mfattn.AttentionParams.xavier_uniform(kf, 1, M, d, d).layer(0)
            mlp = mfattn.MLPParams.init(km, M, d, m)
            x0 = jax.random.normal(kx, (N, d))
            measure = mfattn.EmpiricalMeasure(x0, w)
            return mfattn.solve_sde(feats, measure, 1.0, kb, heads=4, mlp=mlp, t1=T, dt0=dt).xs

        return jax.vmap(one)(keys)

    rows = []
    keys = jax.random.split(jax.random.key(3), cfg["chaos_paths"])
    for n in cfg["chaos_n"]:
        wa = np.zeros(N)
        wa[:n] = 1 / n
        wb = np.zeros(N)
        wb[: 2 * n] = 1 / (2 * n)
        t0 = time.time()
        xa, xb = np.asarray(run(keys, wa)), np.asarray(run(keys, wb))
        dist = {k: [] for k in ("mmd0", "mmdT", "w2_0", "w2_T")}
        for p in range(len(keys)):
            for t, tag in ((0, "0"), (-1, "T")):
                A, B = xa[p, t, :n], xb[p, t, : 2 * n]
                centre = B.mean(0)
                radius = np.sqrt(np.mean(np.sum((B - centre) ** 2, -1)))
                A, B = (A - centre) / radius, (B - centre) / radius
                dist["mmd" + tag].append(mmd(A, B))
                dist["w2_" + tag].append(w2_uniform(A, B))
        rec = dict(n=n, seconds=time.time() - t0)
        for k, v in dist.items():
            v = np.asarray(v)
            rec[k] = float(v.mean())
            rec[k + "_ci"] = float(1.96 * v.std(ddof=1) / np.sqrt(v.size))
            rec[k + "_paths"] = v.tolist()
        rows.append(rec)
        print(f"[chaos] n={n} " + " ".join(f"{k}={rec[k]:.4f}" for k in dist), flush=True)
    ns = np.log(np.array([r["n"] for r in rows], float))
    fits, fit_cis = {}, {}
    rng = np.random.default_rng(0)
    P = len(keys)
    for k in ("mmd0", "mmdT", "w2_0", "w2_T"):
        per_path = np.array([r[k + "_paths"] for r in rows])  # (len(ns), P), paired
        fits[k] = float(np.polyfit(ns, np.log(per_path.mean(1)), 1)[0])
        boot = [
            np.polyfit(ns, np.log(per_path[:, rng.integers(0, P, P)].mean(1)), 1)[0]
            for _ in range(2000)
        ]
        fit_cis[k] = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
    results["chaos"] = dict(
        rows=rows, slopes=fits, slope_intervals=fit_cis, d=d, heads=4, complete=True
    )
    save()


def part_step_check(cfg, results, save):
    """The time step's effect on `lambda`: one strong-noise case of part B
    (`d = 1`, ReLU, `beta = 1`, `s = 4`, drift `alpha = 1`) at `dt` and `dt/2`,
    on the same keys."""
    if "step_check" in results:
        return
    keys = jax.random.split(jax.random.key(2), cfg["paths"])
    onehot = np.eye(4)[ACTIVATIONS.index("relu")]
    out, lams = {}, []
    for tag, dt in (("dt", cfg["dt"]), ("dt/2", cfg["dt"] / 2)):
        run, ts = make_runner(dict(cfg, dt=dt), 1)
        lt, lw = (np.asarray(a) for a in run(keys, onehot, 0.0, 4.0, 1.0, 1.0))
        rec = summarise(lt, lw, ts)
        rec.pop("mean_log_spread")
        out[tag] = dict(dt=dt, **rec)
        q = (len(ts) - 1) // 4
        lams.append((lt[:, -1] - lt[:, q]) / (ts[-1] - ts[q]))
        print(f"[step] dt={dt}: lambda={rec['lyapunov']:+.3f}±{rec['lyapunov_ci']:.3f}", flush=True)
    diff = lams[0] - lams[1]  # the same keys: paired
    out["difference"] = dict(
        mean=float(diff.mean()), ci=float(1.96 * diff.std(ddof=1) / np.sqrt(diff.size))
    )
    results["step_check"] = out
    save()


def lines_summary(results):
    """The crossing of `lambda = 0` (and of the spread rate) per curve of part B."""
    out = []
    rows = results.get("line", [])
    curves = sorted({(r["d"], r["noise"], r["activation"], r["beta"]) for r in rows})
    for d, noise, act, beta in curves:
        pts = sorted(
            (
                r
                for r in rows
                if (r["d"], r["noise"], r["activation"], r["beta"]) == (d, noise, act, beta)
            ),
            key=lambda r: r["strength"],
        )
        xs = [r["strength"] for r in pts]
        out.append(
            dict(
                d=d,
                noise=noise,
                activation=act,
                beta=beta,
                lyapunov_crossing=crossing(xs, [r["lyapunov"] for r in pts]),
                spread_crossing=crossing(xs, [r["spread_rate"] for r in pts]),
                verdicts=[verdict(r) for r in pts],
                strengths=xs,
            )
        )
    return out


def plot(results, path_prefix):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # A: the sign of lambda under pure noise
    rows = results.get("sign", [])
    if rows:
        dims = sorted({r["d"] for r in rows})
        fig, axes = plt.subplots(1, len(dims), figsize=(4.2 * len(dims), 3.6), sharey=True)
        axes = np.atleast_1d(axes)
        labels = [("attention", "-")] + [(nz, a) for nz in ("mlp", "both") for a in ACTIVATIONS]
        for ax, d in zip(axes, dims):
            for i, (nz, a) in enumerate(labels):
                r = next(
                    (r for r in rows if (r["d"], r["noise"], r["activation"]) == (d, nz, a)), None
                )
                if r is None:
                    continue
                color = {"attention": "C3", "mlp": "C0", "both": "C2"}[nz]
                ax.errorbar(i, r["lyapunov"], yerr=r["lyapunov_ci"], fmt="o", color=color)
            ax.axhline(0, color="k", lw=0.8)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(
                ["attn"] + [f"{nz[:4]} {a}" for nz, a in labels[1:]], rotation=60, fontsize=8
            )
            ax.set_title(f"d = {d}")
        axes[0].set_ylabel("top Lyapunov exponent (95% CI)")
        fig.suptitle("Pure common noise: which noises synchronise (lambda < 0)?")
        fig.tight_layout()
        fig.savefig(path_prefix + "_sign.png", dpi=120)
        plt.close(fig)

    # B: lambda against the noise strength, against the drift alpha = 1
    rows = results.get("line", [])
    if rows:
        dims = sorted({r["d"] for r in rows})
        betas = sorted({r["beta"] for r in rows})
        fig, axes = plt.subplots(
            len(dims), len(betas), figsize=(4.6 * len(betas), 3.4 * len(dims)), squeeze=False
        )
        for i, d in enumerate(dims):
            for j, beta in enumerate(betas):
                ax = axes[i, j]
                for k, (nz, a) in enumerate(
                    [("mlp", a) for a in ACTIVATIONS] + [("attention", "-")]
                ):
                    pts = sorted(
                        (
                            r
                            for r in rows
                            if (r["d"], r["noise"], r["activation"], r["beta"]) == (d, nz, a, beta)
                        ),
                        key=lambda r: r["strength"],
                    )
                    if not pts:
                        continue
                    x = [r["strength"] ** 2 if nz == "mlp" else r["strength"] for r in pts]
                    ax.errorbar(
                        x,
                        [r["lyapunov"] for r in pts],
                        yerr=[r["lyapunov_ci"] for r in pts],
                        marker="o",
                        ms=3,
                        capsize=2,
                        color=f"C{k}",
                        label=f"MLP {a}" if nz == "mlp" else "attention",
                    )
                ax.axhline(0, color="k", lw=0.8)
                ax.set_xscale("log")
                ax.set_title(f"d = {d}, beta = {beta}", fontsize=10)
                ax.set_xlabel("noise variance: s^2 (MLP) or 1/H (attention)")
                if j == 0:
                    ax.set_ylabel("top Lyapunov exponent")
        axes[0, 0].legend(fontsize=7)
        fig.suptitle("Common noise against the expanding drift alpha = 1: where lambda < 0")
        fig.tight_layout()
        fig.savefig(path_prefix + "_line.png", dpi=120)
        plt.close(fig)

    # C: propagation of chaos
    chaos = results.get("chaos")
    if chaos:
        rows = chaos["rows"]
        ns = [r["n"] for r in rows]
        fig, ax = plt.subplots(figsize=(5, 3.8))
        for k, lab, c in (
            ("mmd0", "MMD, t = 0", "C0"),
            ("mmdT", "MMD, t = T", "C1"),
            ("w2_0", "W2, t = 0", "C2"),
            ("w2_T", "W2, t = T", "C3"),
        ):
            ax.errorbar(
                ns,
                [r[k] for r in rows],
                yerr=[r[k + "_ci"] for r in rows],
                marker="o",
                capsize=2,
                color=c,
                label=f"{lab} (slope {chaos['slopes'][k]:+.2f})",
                alpha=0.9,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("n (tokens)")
        ax.set_ylabel("distance(mu^n, mu^2n)")
        ax.set_title(
            "Propagation of chaos under common noise (d = 2)\n"
            "clouds rescaled by the 2n-cloud's RMS radius",
            fontsize=10,
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path_prefix + "_chaos.png", dpi=120)
        plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small preset")
    parser.add_argument("--fresh", action="store_true", help="ignore saved results")
    args = parser.parse_args(argv)
    preset = "quick" if args.quick else "full"
    cfg = PRESETS[preset]
    os.makedirs(RESULTS, exist_ok=True)
    name = "synchronisation" + ("_quick" if args.quick else "")
    path = os.path.join(RESULTS, name + ".json")
    results = {}
    if os.path.exists(path) and not args.fresh:
        with open(path) as f:
            results = json.load(f)
        if results.get("config") != json.loads(json.dumps(cfg)):
            results = {}
    results["config"] = cfg
    results["preset"] = preset
    results["environment"] = dict(
        jax=jax.__version__, mfattn=mfattn.__version__, machine=platform.machine()
    )
    start = time.time()

    def save():
        results["summary"] = lines_summary(results)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)

    part_sign(cfg, results, save)
    part_line(cfg, results, save)
    part_chaos(cfg, results, save)
    part_step_check(cfg, results, save)
    results["seconds_this_run"] = time.time() - start
    results["seconds_total"] = results.get("seconds_total", 0.0) + results["seconds_this_run"]
    save()
    plot(results, os.path.join(RESULTS, name))
    print(f"wrote {path} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
