"""Does post-normalisation help the convergence theorem? The discrete-to-limit
error of the transformer with and without post-normalisation onto the sphere,
at equal `(L, H)`, as the horizon grows (docs/theory.md, sections 7 and 10).

**Models.** The law `nu_0` ties `O = V` (`Q, K, V` Xavier-uniform, i.i.d. over
layers and heads; `d = k = 4`), so `E[O V^T] = (k a^2 / 3) I = I`: the limit
moves at initialisation and, without normalisation, the tokens grow like
`e^t` along their mean. The horizon `T` is reached on the depth interval
`[0, 1]` by scaling every `O` by `T` (the field is linear in `O`), so that
`L` layers are `L` steps of size `T / L`. For each geometry
(`mfattn.Euclidean()`, the model of docs/theory.md section 3;
`mfattn.Sphere()`, section 10):

- the limit: `mfattn.solve_limit` with `M` parameter particles drawn from
  `nu_0`, constant in depth (a second, independent draw of `M` particles
  measures the reference's own Monte-Carlo error);
- `R` discrete models (`L` layers of `H` heads, independent draws from
  `nu_0`), each solved with `mfattn.solve_discrete`;

on the same token set (a sample of `mfattn.DenoisingTask` projected onto the
unit sphere, labels too, so both models start from the same state) and `m`
test particles near the tokens, `z = N(x_j + sigma xi)` with a random token
`j` and its label (far from every token the test particles' adjoint carries
the Lions term at `z`, `exp(beta (s(x, z) - max_y s(x, y)))`, heavy-tailed over
the heads, which no affordable `M` resolves).

**Measured.** Per initialisation `r`, the theorem's error
`e_r = max_{l, z} |z_r^l - z(l/L)| + |p_r^l - p(l/L)|` (test particles' states
and adjoints; on the sphere both adjoints are tangent), its relative version
`e_r / max_{l, z} (|z(l/L)| + |p(l/L)|)` (the unnormalised states grow), the
states' error alone (absolute and relative to `max |z(l/L)|`), and
`mfattn.bias_fluctuation`'s split. A comparison is flagged as not resolved
when the reference's own error exceeds a fifth of the median discrete error. The paired ratio
`e_r(Euclidean) / e_r(Sphere)` (same parameters, same tokens) is summarised by
its geometric mean over the `R` initialisations with a 95 % t-interval on
`log` ratio.

    python -m benchmarks.sphere_scaling [--quick] [--table]

Writes `benchmarks/results/sphere_scaling[_quick].json` (resumable: finished
`(beta, T, L, H)` rows are kept when the configuration is unchanged) and
`sphere_scaling[_quick].png`.
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

import mfattn  # noqa: E402

FULL = dict(
    seed=14,
    dim=4,
    head_dim=4,
    tokens=8,
    test_points=16,
    test_spread=0.3,
    clusters=3,
    particles=2048,
    inits=8,
    betas=[1.0, 4.0],
    horizons=[0.25, 0.5, 1.0, 2.0],
    grid=[[4, 4], [8, 8]],
    rtol=1e-9,
    atol=1e-9,
    max_steps=200_000,
)
QUICK = dict(
    FULL,
    particles=1024,
    betas=[1.0],
    horizons=[0.5, 2.0],
    grid=[[4, 4]],
)
# the key of each geometry's results in the rows
GEOMETRIES = {"none": mfattn.Euclidean(), "sphere": mfattn.Sphere()}


def _unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def tied_init(key, depth, heads, dim, head_dim):
    """`nu_0` with `O = V`: `Q, K, V` Xavier-uniform, i.i.d. over depth and heads."""
    p = mfattn.AttentionParams.xavier_uniform(key, depth, heads, dim, head_dim)
    return mfattn.AttentionParams(p.Q, p.K, p.V, p.V)


def _horizon(params, T):
    """The model over `[0, T]`: every `O` scaled by `T`."""
    return mfattn.AttentionParams(params.Q, params.K, params.V, T * params.O)


def problem(cfg):
    """The token set, its loss and the test particles (shared by every row)."""
    key = jax.random.key(cfg["seed"])
    kt, kz, kl = jax.random.split(key, 3)
    task = mfattn.DenoisingTask(
        dim=cfg["dim"], num_tokens=cfg["tokens"], num_clusters=cfg["clusters"]
    )
    measure, loss = task.sample(kt)
    measure = measure.with_points(_unit(measure.points))
    loss = mfattn.DenoisingLoss(_unit(loss.targets))
    # test particles near the tokens: z = N(x_j + sigma xi) with the label of
    # x_j (far from every token, the Lions term at z carries exp(beta (s(x, z)
    # - max_y s(x, y))), heavy-tailed over heads: no M resolves it)
    m, d = cfg["test_points"], cfg["dim"]
    j = jax.random.randint(kl, (m,), 0, cfg["tokens"])
    z = _unit(measure.points[j] + cfg["test_spread"] * jax.random.normal(kz, (m, d)))
    return measure, loss, z, loss.targets[j]


@eqx.filter_jit
def limit_states(grid, measure, loss, z, zl, beta, L, geometry, rtol, atol, max_steps):
    sol = mfattn.solve_limit(
        grid,
        measure,
        loss,
        beta,
        z,
        test_labels=zl,
        saveat=diffrax.SaveAt(ts=jnp.arange(L + 1) / L),
        interpolation=mfattn.PiecewiseConstant(),
        geometry=geometry,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
    )
    return sol.test_xs, sol.test_ps


@eqx.filter_jit
def discrete_states(params, measure, loss, z, zl, beta, geometry):
    """`(R, L+1, m, d)` states and adjoints of the test particles, one model per init."""

    def one(p):
        sol = mfattn.solve_discrete(p, measure, loss, beta, z, test_labels=zl, geometry=geometry)
        return sol.test_xs, sol.test_ps

    return jax.vmap(one)(params)


def _errors(samples, reference):
    """Per init: the error, and (bias, fluctuation, noise) of the split."""
    bf = mfattn.bias_fluctuation(samples, reference)
    return np.asarray(bf.total), float(bf.bias), np.asarray(bf.fluctuation), float(bf.noise)


def _log_ratio_summary(ratios):
    t = mfattn.t_interval(np.log(ratios))
    return dict(
        geometric_mean=float(np.exp(t["estimate"])),
        ci=[float(np.exp(c)) for c in t["ci"]],
        n=t["n"],
    )


def run_row(cfg, beta, T, L, H, measure, loss, z, zl):
    """Both geometries at one `(beta, T, L, H)`."""
    d, k, R, M = cfg["dim"], cfg["head_dim"], cfg["inits"], cfg["particles"]
    root = jax.random.key(cfg["seed"])
    ka, kb = jax.random.split(jax.random.fold_in(root, 1))
    grids = [_horizon(tied_init(kk, 1, M, d, k), T) for kk in (ka, kb)]  # one node
    kd = jax.random.fold_in(root, 2)
    keys = [jax.random.fold_in(kd, 1000 * L + H + 10**6 * r) for r in range(R)]
    params = jax.tree.map(
        lambda *a: jnp.stack(a), *[_horizon(tied_init(kk, L, H, d, k), T) for kk in keys]
    )
    beta_arr = jnp.asarray(beta)
    out = dict(beta=beta, T=T, L=L, H=H)
    start = time.perf_counter()
    for name, geometry in GEOMETRIES.items():
        tol = (cfg["rtol"], cfg["atol"], cfg["max_steps"])
        ref = limit_states(grids[0], measure, loss, z, zl, beta_arr, L, geometry, *tol)
        ref2 = limit_states(grids[1], measure, loss, z, zl, beta_arr, L, geometry, *tol)
        ref = tuple(np.asarray(a) for a in ref)
        ref_err = float(
            np.max(
                np.linalg.norm(ref[0] - np.asarray(ref2[0]), axis=-1)
                + np.linalg.norm(ref[1] - np.asarray(ref2[1]), axis=-1)
            )
        )
        ref_state_err = float(np.max(np.linalg.norm(ref[0] - np.asarray(ref2[0]), axis=-1)))
        xs, ps = discrete_states(params, measure, loss, z, zl, beta_arr, geometry)
        total, bias, fluct, noise = _errors((xs, ps), ref)
        state = _errors((xs,), ref[:1])[0]
        scale = float(np.max(np.linalg.norm(ref[0], axis=-1) + np.linalg.norm(ref[1], axis=-1)))
        state_scale = float(np.max(np.linalg.norm(ref[0], axis=-1)))
        out[name] = dict(
            error=total.tolist(),
            relative_error=(total / scale).tolist(),
            state_error=state.tolist(),
            relative_state_error=(state / state_scale).tolist(),
            bias=bias,
            fluctuation=fluct.tolist(),
            noise=noise,
            scale=scale,
            max_token_norm=state_scale,
            reference_error=ref_err,
            reference_state_error=ref_state_err,
            # the reference resolves the comparison when its own Monte-Carlo
            # error is below a fifth of the median discrete error
            resolved=bool(ref_err < 0.2 * float(np.median(total))),
            state_resolved=bool(ref_state_err < 0.2 * float(np.median(state))),
        )
    for key, field in [
        ("ratio", "error"),
        ("relative_ratio", "relative_error"),
        ("state_ratio", "state_error"),
        ("relative_state_ratio", "relative_state_error"),
    ]:
        out[key] = _log_ratio_summary(
            np.asarray(out["none"][field]) / np.asarray(out["sphere"][field])
        )
    out["seconds"] = time.perf_counter() - start
    return out


def _ci(r):
    return f"{r['geometric_mean']:.3g} [{r['ci'][0]:.3g}, {r['ci'][1]:.3g}]"


def table(rows):
    """Markdown: errors (mean over inits) and paired ratios; `*` marks a
    comparison that the limit reference does not resolve (its Monte-Carlo
    error above a fifth of the median discrete error)."""
    lines = [
        "| beta | T | L = H | max |x(t)|, None | error None / sphere (mean) | ratio [95 % CI] "
        "| relative ratio | state error None / sphere | state ratio | relative state ratio |",
        "| --: | --: | --: | --: | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(rows, key=lambda r: (r["beta"], r["L"], r["T"])):
        a, b = r["none"], r["sphere"]
        full = "" if a["resolved"] and b["resolved"] else " *"
        st = "" if a["state_resolved"] and b["state_resolved"] else " *"
        lines.append(
            f"| {r['beta']:g} | {r['T']:g} | {r['L']} | {a['max_token_norm']:.3g} "
            f"| {np.mean(a['error']):.3g} / {np.mean(b['error']):.3g}{full} "
            f"| {_ci(r['ratio'])} | {_ci(r['relative_ratio'])} "
            f"| {np.mean(a['state_error']):.3g} / {np.mean(b['state_error']):.3g}{st} "
            f"| {_ci(r['state_ratio'])} | {_ci(r['relative_state_ratio'])} |"
        )
    return "\n".join(lines)


def plot(rows, cfg, path):
    """One question: how much larger is the unnormalised model's error, as the
    horizon grows? Left the theorem's error, middle the same relative to the
    size of the limit's states and adjoints, right the states' error alone
    relative to their size; hollow markers: not resolved by the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharex=True)
    groups = {}
    for r in sorted(rows, key=lambda r: (r["beta"], r["L"], r["T"])):
        groups.setdefault((r["beta"], r["L"]), []).append(r)
    for ax, key, ylabel in [
        (axes[0], "ratio", "theorem's error (state + adjoint): None / sphere"),
        (axes[1], "relative_ratio", "the same relative to the limit's size"),
        (axes[2], "relative_state_ratio", "state error alone, relative: None / sphere"),
    ]:
        for i, ((beta, L), rs) in enumerate(groups.items()):
            Ts = np.array([r["T"] for r in rs]) * (1 + 0.04 * (i - len(groups) / 2))
            g = np.array([r[key]["geometric_mean"] for r in rs])
            lo = np.array([r[key]["ci"][0] for r in rs])
            hi = np.array([r[key]["ci"][1] for r in rs])
            flag = "state_resolved" if "state" in key else "resolved"
            ok = np.array([r["none"][flag] and r["sphere"][flag] for r in rs])
            label = f"β = {beta:g}, L = H = {L}"
            line = ax.errorbar(Ts, g, yerr=[g - lo, hi - g], capsize=3, label=label)
            color = line[0].get_color()
            ax.scatter(Ts[ok], g[ok], color=color, zorder=3)
            ax.scatter(Ts[~ok], g[~ok], facecolor="white", edgecolor=color, zorder=3)
        ax.axhline(1.0, color="k", lw=0.8, ls=":")
        ax.set(xscale="log", yscale="log", xlabel="horizon T", ylabel=ylabel)
        ax.set_xticks(cfg["horizons"])
        ax.set_xticklabels([f"{t:g}" for t in cfg["horizons"]])
        ax.xaxis.set_minor_locator(NullLocator())
        lo_y, hi_y = ax.get_ylim()
        decades = np.log10(hi_y / lo_y)
        if decades < 1:  # a narrow range: ticks at round values
            ticks = [0.5, 0.6, 0.7, 0.8, 0.9, 1, 1.2, 1.5, 2, 3, 4, 5, 7, 10]
            ax.set_yticks([t for t in ticks if lo_y <= t <= hi_y])
        else:  # decades only when wide, else 1-2-5
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0,) if decades > 2 else (1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"Discrete-to-limit error without / with post-normalisation "
        f"({cfg['inits']} inits, 95 % CI; hollow: reference not resolving)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _matches(row, cfg):
    return (
        row["beta"] in cfg["betas"]
        and row["T"] in cfg["horizons"]
        and [
            row["L"],
            row["H"],
        ]
        in cfg["grid"]
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--table", action="store_true", help="print the table from the JSON")
    args = ap.parse_args(argv)
    name = "sphere_scaling_quick" if args.quick else "sphere_scaling"
    out = pathlib.Path("benchmarks/results") / f"{name}.json"
    cfg = QUICK if args.quick else FULL
    data = json.loads(out.read_text()) if out.exists() else {}
    if args.table:
        print(table(data["rows"]))
        return
    sweeps = ("betas", "horizons", "grid")
    same = {k: v for k, v in data.get("config", {}).items() if k not in sweeps}
    fixed = {k: v for k, v in cfg.items() if k not in sweeps}
    rows = [r for r in data.get("rows", []) if same == fixed and _matches(r, cfg)]
    data = dict(config=cfg, rows=rows, platform=platform.platform())
    done = {(r["beta"], r["T"], r["L"], r["H"]) for r in rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    measure, loss, z, zl = problem(cfg)
    start = time.perf_counter()
    for beta in cfg["betas"]:
        for L, H in cfg["grid"]:
            for T in cfg["horizons"]:
                if (beta, T, L, H) in done:
                    continue
                row = run_row(cfg, beta, T, L, H, measure, loss, z, zl)
                data["rows"].append(row)
                out.write_text(json.dumps(data, indent=1))
                rr = row["ratio"]
                print(
                    f"beta={beta:g} T={T:g} L=H={L}: ratio {rr['geometric_mean']:.3g} "
                    f"[{rr['ci'][0]:.3g}, {rr['ci'][1]:.3g}] ({row['seconds']:.1f} s)",
                    flush=True,
                )
    data["wall_seconds_last_run"] = time.perf_counter() - start
    out.write_text(json.dumps(data, indent=1))
    plot(data["rows"], cfg, out.with_suffix(".png"))
    print(table(data["rows"]))


if __name__ == "__main__":
    main()
