"""Clustering of normalised tokens (docs/theory.md, section 10): the equiangular
reduction, the time to one cluster against beta and n, metastable plateaus for
few tokens, and the number of clusters that emerge on the circle against the
fastest-growing Fourier mode of the linearised equation.

Every run is the self-attention dynamics on the unit sphere with one head,
`Q = K = V = O = I`, uniform weights (`mfattn.attention_flow(...,
geometry=mfattn.Sphere())`, Tsit5 with a PID controller), tokens drawn uniformly
on the sphere from an explicit key per repetition.

    python -m benchmarks.clustering [--quick] [--part equiangular|time|plateaus|circle] [--table]

Writes `benchmarks/results/clustering[_quick].json` and one PNG per question;
resumable (every finished run is stored at once and skipped on a rerun).
"""

import argparse
import json
import pathlib
import platform
import time

import jax

jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optimistix as optx  # noqa: E402

import mfattn  # noqa: E402

FULL = dict(
    equiangular=dict(ns=[2, 8, 32], betas=[1.0, 4.0, 16.0], rho0=0.0, tol=1e-12),
    time=dict(
        ns=[8, 32, 128],
        betas=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0],
        seeds=4,
        horizon=1e4,
        diameter=1e-2,
        tol=1e-7,
        method="event",
    ),
    plateaus=dict(n=32, dim=2, betas=[4.0, 9.0, 16.0], seeds=4, horizon=1e6, link=1e-3, tol=1e-7),
    circle=dict(
        n=256,
        betas=[2.0, 5.0, 10.0, 20.0, 40.0, 80.0],
        seeds=4,
        horizon=1e3,
        link=float(np.pi / 256),  # half the mean initial spacing
        min_mass=0.02,
        first_plateau="after formation (90 % of the mass in clusters)",
        tol=1e-6,
    ),
)
QUICK = dict(
    equiangular=dict(ns=[8], betas=[1.0, 4.0], rho0=0.0, tol=1e-12),
    time=dict(
        ns=[8, 32],
        betas=[1.0, 3.0, 5.0, 8.0],
        seeds=2,
        horizon=1e4,
        diameter=1e-2,
        tol=1e-7,
        method="event",
    ),
    plateaus=dict(n=16, dim=2, betas=[4.0, 9.0], seeds=2, horizon=1e5, link=1e-3, tol=1e-7),
    circle=dict(
        n=128,
        betas=[2.0, 5.0, 10.0, 20.0],
        seeds=2,
        horizon=1e3,
        link=float(np.pi / 128),
        min_mass=0.02,
        first_plateau="after formation (90 % of the mass in clusters)",
        tol=1e-6,
    ),
)
PARTS = ("equiangular", "time", "plateaus", "circle")


def uniform_sphere(key, n, dim):
    x = jax.random.normal(key, (n, dim))
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def seed_key(part, *ints):
    key = jax.random.key(20261123)
    for i in (PARTS.index(part),) + ints:
        key = jax.random.fold_in(key, int(i))
    return key


def flow(x0, beta, ts, tol):
    return mfattn.attention_flow(
        mfattn.identity_layer(x0.shape[1]),
        mfattn.EmpiricalMeasure(x0),
        jnp.asarray(beta, jnp.float64),
        ts,
        geometry=mfattn.Sphere(),
        rtol=tol,
        atol=tol,
        max_steps=1_000_000,
    )


# ----------------------------------------------------------------- parts
def run_equiangular(cfg, key_args):
    n, beta = key_args
    # a horizon over which rho travels most of the way to 1
    probe = np.concatenate([[0.0], np.logspace(-2, 5, 400)])
    rho = mfattn.equiangular_rho(probe, cfg["rho0"], beta, n)
    T = float(probe[np.argmax(rho > 0.99)]) if np.any(rho > 0.99) else float(probe[-1])
    ts = np.linspace(0.0, T, 21)
    x0 = mfattn.equiangular_points(n, n + 1, cfg["rho0"], key=seed_key("equiangular", n))
    xs = np.asarray(flow(x0, beta, jnp.asarray(ts), cfg["tol"]))
    gram = np.einsum("tnd,tmd->tnm", xs, xs)
    off = gram[:, ~np.eye(n, dtype=bool)]
    ref = mfattn.equiangular_rho(ts, cfg["rho0"], beta, n)
    return dict(
        n=n,
        beta=beta,
        horizon=T,
        rho_end=float(ref[-1]),
        max_error=float(np.max(np.abs(off.mean(-1) - ref))),
        max_spread=float(np.max(off.max(-1) - off.min(-1))),
        max_norm_error=float(np.max(np.abs(np.linalg.norm(xs, axis=-1) - 1))),
    )


def equiangular_time(n, beta, diameter, horizon):
    """Time for n equiangular tokens from rho = 0 to reach angle `diameter`:
    `T = int_0^{cos(diameter)} d rho / rho'(rho)` (rho' > 0 there), by quadrature."""
    from scipy.integrate import quad

    target = np.cos(diameter)
    T, _ = quad(
        lambda r: 1.0 / mfattn.equiangular_velocity(r, beta, n),
        0.0,
        target,
        limit=500,
        epsrel=1e-10,
    )
    return float(T) if T <= horizon else float("inf")


def run_time(cfg, key_args):
    n, beta, seed = key_args
    x0 = uniform_sphere(seed_key("time", n, seed), n, n)
    t1 = float(
        _time_to_one(
            x0, jnp.asarray(beta, jnp.float64), cfg["horizon"], cfg["diameter"], cfg["tol"]
        )
    )
    return dict(n=n, dim=n, beta=beta, seed=seed, time=t1)


@eqx.filter_jit
def _time_to_one(x0, beta, horizon, diameter, tol):
    """The first time at which the largest angle between two tokens is
    `diameter`: the flow stops there (a Diffrax event, the crossing located by
    a root finder on the dense output), so that fast runs do not integrate a
    collapsed cluster up to the horizon."""
    n = x0.shape[0]
    vf = mfattn.TokenFlowField(
        mfattn.AttentionField(beta),
        mfattn.identity_layer(x0.shape[1]),
        mfattn.EmpiricalMeasure(x0),
        mfattn.Sphere(),
    )
    off = ~jnp.eye(n, dtype=bool)

    def cond(t, y, args, **kwargs):
        u = y / jnp.linalg.norm(y, axis=-1, keepdims=True)
        # smallest inner product between two tokens, minus that at angle `diameter`
        return jnp.min(jnp.where(off, u @ u.T, 1.0)) - jnp.cos(diameter)

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vf),
        diffrax.Tsit5(),
        0.0,
        horizon,
        None,
        x0,
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
        event=diffrax.Event(cond, root_finder=optx.Newton(rtol=1e-10, atol=1e-10)),
        max_steps=1_000_000,
    )
    return jnp.where(sol.event_mask, sol.ts[-1], jnp.inf)


def run_plateaus(cfg, key_args):
    beta, seed = key_args
    n, dim = cfg["n"], cfg["dim"]
    ts = jnp.concatenate([jnp.zeros(1), jnp.logspace(-2, np.log10(cfg["horizon"]), 321)])
    x0 = uniform_sphere(seed_key("plateaus", int(beta * 100), seed), n, dim)
    xs = flow(x0, beta, ts, cfg["tol"])
    counts = np.asarray(jax.vmap(lambda x: mfattn.count_clusters(x, tol=cfg["link"]))(xs))
    plateaus = mfattn.metastable_plateaus(
        np.asarray(ts[1:]), counts[1:], min_duration=float(np.log(3)), log_time=True
    )
    return dict(
        beta=beta,
        seed=seed,
        ts=np.asarray(ts).tolist(),
        counts=counts.tolist(),
        plateaus=[p._asdict() for p in plateaus],
    )


def run_circle(cfg, key_args):
    beta, seed = key_args
    n = cfg["n"]
    ts = jnp.concatenate([jnp.zeros(1), jnp.logspace(-1, np.log10(cfg["horizon"]), 121)])
    x0 = uniform_sphere(seed_key("circle", int(beta * 100), seed), n, 2)
    xs = flow(x0, beta, ts, cfg["tol"])

    # clusters of mass > min_mass; formation: when they hold 90 % of the mass
    def count_and_mass(x):
        labels = mfattn.cluster_labels(x, tol=cfg["link"])
        mass = jax.ops.segment_sum(jnp.full((n,), 1.0 / n), labels, num_segments=n)
        big = mass > cfg["min_mass"]
        return jnp.sum(big), jnp.sum(jnp.where(big, mass, 0.0))

    counts, covered = map(np.asarray, jax.vmap(count_and_mass)(xs))
    formed = np.flatnonzero(covered >= 0.9)
    t_form = float(ts[formed[0]]) if formed.size else None
    plateaus = mfattn.metastable_plateaus(
        np.asarray(ts[1:]), counts[1:], min_duration=float(np.log(3)), log_time=True
    )
    # the first plateau that lasts past the formation time
    plateaus = [p for p in plateaus if t_form is not None and p.end >= t_form]
    return dict(
        beta=beta,
        seed=seed,
        predicted=mfattn.predicted_cluster_count(beta),
        formation_time=t_form,
        first_plateau=None if not plateaus else plateaus[0]._asdict(),
        final_count=int(counts[-1]),
        covered=covered.tolist(),
        ts=np.asarray(ts).tolist(),
        counts=counts.tolist(),
    )


def jobs(part, cfg):
    c = cfg[part]
    if part == "equiangular":
        return [(n, b) for n in c["ns"] for b in c["betas"]]
    if part == "time":
        return [(n, b, s) for n in c["ns"] for b in c["betas"] for s in range(c["seeds"])]
    return [(b, s) for b in c["betas"] for s in range(c["seeds"])]


RUNNERS = dict(equiangular=run_equiangular, time=run_time, plateaus=run_plateaus, circle=run_circle)


# ------------------------------------------------------------ summaries
def summarise(data, cfg):
    s = {}
    rows = data["rows"]
    if rows.get("equiangular"):
        r = rows["equiangular"]
        s["equiangular"] = dict(
            max_error=max(x["max_error"] for x in r),
            max_spread=max(x["max_spread"] for x in r),
            max_norm_error=max(x["max_norm_error"] for x in r),
            runs=len(r),
        )
    if rows.get("time"):
        c = cfg["time"]
        table = []
        for n in c["ns"]:
            for b in c["betas"]:
                ts = [x["time"] for x in rows["time"] if x["n"] == n and x["beta"] == b]
                if not ts:
                    continue
                ts = np.asarray(ts)
                fin = ts[np.isfinite(ts)]
                table.append(
                    dict(
                        n=n,
                        beta=b,
                        seeds=len(ts),
                        median=float(np.median(ts)),
                        min=float(ts.min()),
                        max=float(ts.max()),
                        censored=int(np.sum(~np.isfinite(ts))),
                        mean_finite=float(fin.mean()) if fin.size else None,
                        equiangular=equiangular_time(n, b, c["diameter"], c["horizon"]),
                    )
                )
        s["time"] = table
    if rows.get("plateaus"):
        table = []
        for b in cfg["plateaus"]["betas"]:
            r = [x for x in rows["plateaus"] if x["beta"] == b]
            table.append(
                dict(
                    beta=b,
                    runs=[
                        [
                            (p["num_clusters"], p["start"], p["end"], p["final"])
                            for p in x["plateaus"]
                        ]
                        for x in r
                    ],
                )
            )
        s["plateaus"] = table
    if rows.get("circle"):
        table = []
        for b in cfg["circle"]["betas"]:
            r = [x for x in rows["circle"] if x["beta"] == b]
            if not r:
                continue
            first = [x["first_plateau"]["num_clusters"] for x in r if x["first_plateau"]]
            table.append(
                dict(
                    beta=b,
                    predicted=r[0]["predicted"],
                    seeds=len(r),
                    first_plateau=first,
                    first_plateau_mean=float(np.mean(first)) if first else None,
                    first_plateau_sd=float(np.std(first, ddof=1)) if len(first) > 1 else None,
                    first_plateau_span=[
                        (x["first_plateau"]["start"], x["first_plateau"]["end"])
                        for x in r
                        if x["first_plateau"]
                    ],
                    final=[x["final_count"] for x in r],
                )
            )
        s["circle"] = table
    return s


def tables(summary, cfg):
    out = []
    if "equiangular" in summary:
        e = summary["equiangular"]
        out.append(
            f"Equiangular ({e['runs']} runs, n in {cfg['equiangular']['ns']}, beta in "
            f"{cfg['equiangular']['betas']}): max |rho - ODE| = {e['max_error']:.1e}, max spread "
            f"of the inner products = {e['max_spread']:.1e}, max ||x| - 1| = "
            f"{e['max_norm_error']:.1e}\n"
        )
    if "time" in summary:
        out.append(
            "| n = d | beta | time to one cluster: median [min, max] | censored | equiangular ODE |"
        )
        out.append("| --: | --: | --- | --: | --: |")
        for r in summary["time"]:
            out.append(
                f"| {r['n']} | {r['beta']:g} | {_t(r['median'])} [{_t(r['min'])}, {_t(r['max'])}]"
                f" | {r['censored']}/{r['seeds']} | {_t(r['equiangular'])} |"
            )
        out.append("")
    if "plateaus" in summary:
        out.append("| beta | plateaus per seed: clusters (from t, to t) |")
        out.append("| --: | --- |")
        for r in summary["plateaus"]:
            runs = "<br>".join(
                " → ".join(f"{k} ({a:.3g}, {b:.3g}{'+' if f else ''})" for k, a, b, f in run)
                for run in r["runs"]
            )
            out.append(f"| {r['beta']:g} | {runs} |")
        out.append("")
    if "circle" in summary:
        out.append(
            "| beta | k* (fastest-growing mode) | clusters on the first plateau (per seed) "
            "| mean ± sd | at the horizon |"
        )
        out.append("| --: | --: | --- | --- | --- |")
        for r in summary["circle"]:
            sd = "" if r["first_plateau_sd"] is None else f" ± {r['first_plateau_sd']:.1f}"
            out.append(
                f"| {r['beta']:g} | {r['predicted']} | {r['first_plateau']}"
                f" | {r['first_plateau_mean']:.1f}{sd} | {r['final']} |"
            )
    return "\n".join(out)


def _t(x):
    return "inf" if x is None or not np.isfinite(x) else f"{x:.3g}"


# ----------------------------------------------------------------- plots
def plots(data, cfg, stem):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    s = summarise(data, cfg)
    if "time" in s:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        c = cfg["time"]
        for i, n in enumerate(c["ns"]):
            rows = [x for x in data["rows"]["time"] if x["n"] == n]
            b = np.array([x["beta"] for x in rows])
            t = np.array([x["time"] for x in rows])
            fin = np.isfinite(t)
            ax.scatter(b[fin], t[fin], s=12, color=f"C{i}", alpha=0.6)
            ax.scatter(b[~fin], np.full((~fin).sum(), c["horizon"]), marker="^", color=f"C{i}")
            grid = np.linspace(min(c["betas"]), max(c["betas"]), 60)
            eq = [equiangular_time(n, g, c["diameter"], 1e12) for g in grid]
            ax.plot(grid, eq, "-", color=f"C{i}", label=f"n = d = {n} (line: equiangular ODE)")
            ax.axvline(np.log(n), color=f"C{i}", ls=":", lw=1)
        ax.set(
            yscale="log",
            ylim=(None, 3 * c["horizon"]),
            xlabel="β (dotted: β = log n)",
            ylabel=f"time to one cluster (diameter ≤ {c['diameter']:g} rad)",
            title="Time to one cluster (dots: seeds; ▲: not by the horizon)",
        )
        ax.legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        fig.savefig(f"{stem}_time.png", dpi=120)
        plt.close(fig)
    if "plateaus" in s:
        c = cfg["plateaus"]
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for i, b in enumerate(c["betas"]):
            for j, x in enumerate([x for x in data["rows"]["plateaus"] if x["beta"] == b]):
                ax.step(
                    x["ts"][1:],
                    x["counts"][1:],
                    where="post",
                    color=f"C{i}",
                    alpha=0.8,
                    lw=1.2,
                    label=f"β = {b:g}" if j == 0 else None,
                )
        ax.set(
            xscale="log",
            yscale="log",
            ylim=(0.8, c["n"] * 1.3),
            xlabel="t",
            ylabel=f"clusters (link {c['link']:g} rad)",
            title=f"Metastability: n = {c['n']} tokens on the circle, one line per seed",
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{stem}_plateaus.png", dpi=120)
        plt.close(fig)
    if "circle" in s:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        r = s["circle"]
        b = np.array([x["beta"] for x in r])
        grid = np.geomspace(b.min(), b.max(), 200)
        ax.plot(
            grid,
            [mfattn.predicted_cluster_count(g) for g in grid],
            "k-",
            label="fastest-growing Fourier mode k*(β)",
        )
        ax.plot(grid, np.sqrt(2 * grid), "k:", lw=1, label="sqrt(2β)")
        for x in r:
            ax.scatter(
                np.full(len(x["first_plateau"]), x["beta"]), x["first_plateau"], color="C0", s=18
            )
        ax.scatter(
            [], [], color="C0", s=18, label="clusters on the first plateau (one dot per seed)"
        )
        ax.set(
            xscale="log",
            xlabel="β",
            ylabel="number of clusters",
            title=f"Emerging clusters on the circle, n = {cfg['circle']['n']}",
        )
        ax.set_xticks(b, [f"{v:g}" for v in b])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{stem}_circle.png", dpi=120)
        plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--part", choices=PARTS, action="append")
    ap.add_argument("--table", action="store_true", help="print the tables from the JSON")
    args = ap.parse_args(argv)
    name = "clustering_quick" if args.quick else "clustering"
    out = pathlib.Path("benchmarks/results") / f"{name}.json"
    cfg = QUICK if args.quick else FULL
    data = json.loads(out.read_text()) if out.exists() else {}
    if args.table:
        print(tables(summarise(data, cfg), cfg))
        return
    # resume: keep the runs of every part whose configuration is unchanged
    old = data.get("config", {})
    rows = {p: r for p, r in data.get("rows", {}).items() if old.get(p) == cfg.get(p)}
    data = dict(data, config=cfg, rows=rows)
    data["platform"] = platform.platform()
    out.parent.mkdir(parents=True, exist_ok=True)
    for part in args.part or PARTS:
        rows = data["rows"].setdefault(part, [])
        done = {tuple(r["key"]) for r in rows}
        start = time.perf_counter()
        for key_args in jobs(part, cfg):
            if tuple(key_args) in done:
                continue
            t0 = time.perf_counter()
            row = RUNNERS[part](cfg[part], key_args)
            row["key"] = list(key_args)
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            data["summary"] = summarise(data, cfg)
            out.write_text(json.dumps(data, indent=1))
            print(f"{part} {key_args}: {row['seconds']:.1f} s", flush=True)
        data.setdefault("wall_seconds", {})[part] = time.perf_counter() - start
    data["summary"] = summarise(data, cfg)
    out.write_text(json.dumps(data, indent=1))
    plots(data, cfg, str(out.with_suffix("")))
    print(tables(data["summary"], cfg))


if __name__ == "__main__":
    main()
