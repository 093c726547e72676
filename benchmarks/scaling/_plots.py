"""The study's PNGs, one per question (matplotlib is imported when they are
drawn, not with the study)."""

import pathlib

import numpy as np

from ._config import StudyConfig
from ._summary import _ci, _view


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

    cfg, pts, fits, marks = (
        StudyConfig.from_json(data["config"]),
        data["points"],
        data["fits"],
        data["marks"],
    )
    main = cfg.main_condition
    out = pathlib.Path(out)
    name = lambda suffix: out.with_name(out.stem + suffix)
    R = cfg.inits
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
                f"{main}, {what}: {R} initialisations, K = {cfg.steps} training steps; "
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
            _log_axes(ax, cfg.n_sweep)
            ax.legend(fontsize=8)
        axes[0].set_ylabel(f"error, mean over {R} inits")
        fig.suptitle(
            f"does the error grow with n? (L, H) = {tuple(cfg.sweep_LH)}; "
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
                f"error of the state at k = {cfg.sweep('steps')} (random z)",
            ),
        ]:
            for i, (opt, f) in enumerate(fits["lemma6"].items()):
                # distinct markers: optimisers that coincide stay visible
                sweep_panel(ax, f.get(q), opt, ["o-", "s--", "^:"][i % 3], f"C{i}")
            ax.set(xscale="log", yscale="log", xlabel="dimension d (RMS-normalised)", title=title)
            _log_axes(ax, cfg.d_sweep)
            ax.legend(fontsize=8)
        axes[0].set_ylabel(f"mean over {R} inits")
        fig.suptitle(
            f"does Lemma 6 (and the error) grow with d, per optimiser? (L, H) = "
            f"{tuple(cfg.sweep_LH)}; points the limit's own error disqualifies are left out",
            fontsize=10,
        )
        fig.tight_layout()
        fig.savefig(name("_d.png"), dpi=100)
        plt.close(fig)


def fluctuation_figure(data, out):
    """The README's figure for notebook 03, one question: how does the state's
    fluctuation (each initialisation's distance to the mean over
    initialisations, `mfattn.bias_fluctuation`) fall with `L` and `H`, at
    `k = 0` (untrained) and after the last training step? One panel each: the
    mean over initialisations against `L` at each `H` (dots: each
    initialisation), the slopes `L^-1/3` and `L^-1/2` through the first point,
    and the fitted exponents (jackknife 95 % intervals, `mfattn.power_law_fit`),
    with and without `L = 1`. The fluctuation involves no limit, so no point is
    excluded. Written by

        python -c "import json; from benchmarks.scaling._plots import fluctuation_figure; \\
            fluctuation_figure(json.load(open('benchmarks/results/scaling_full.json')), \\
            'docs/img/convergence.png')"
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import mfattn

    cfg, c = StudyConfig.from_json(data["config"]), data["points"]
    c = c[cfg.main_condition]
    P, steps = c["points"], c["steps"]
    Hs = sorted({p["H"] for p in P.values()})
    Ls = np.array(sorted({p["L"] for p in P.values()}), float)
    ci = lambda f, a: f"{f[a]:+.2f} [{f[a + '_ci'][0]:+.2f}, {f[a + '_ci'][1]:+.2f}]"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    for ax, step in zip(axes, (0, len(steps) - 1)):
        for i, H in enumerate(Hs):
            ks = sorted((k for k in P if P[k]["H"] == H), key=lambda k: P[k]["L"])
            per = [np.asarray(P[k]["state"]["fluctuation_per_step"][step]) for k in ks]
            x = np.array([P[k]["L"] for k in ks], float) * (0.96 if i == 0 else 1.04)
            ax.plot(x, [v.mean() for v in per], "o-", color=f"C{i}", label=f"H = {H}")
            for xx, v in zip(x, per):
                ax.plot([xx] * len(v), v, ".", color=f"C{i}", alpha=0.25)
        y0 = ax.get_lines()[0].get_ydata()[0]
        ax.plot(Ls, y0 * Ls ** (-1 / 3), "k--", lw=0.8, label="slope L^-1/3")
        ax.plot(Ls, y0 * Ls**-0.5, "k:", lw=0.8, label="slope L^-1/2")
        fits = []
        for keys in (list(P), [k for k in P if P[k]["L"] > 1]):
            cov = {"L": [P[k]["L"] for k in keys], "H": [P[k]["H"] for k in keys]}
            per_init = [P[k]["state"]["fluctuation_per_step"][step] for k in keys]
            fits.append(mfattn.power_law_fit(cov, per_init))
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="depth L",
            title=f"k = {steps[step]}"
            + (" (untrained)" if step == 0 else " (trained)")
            + f"\nfit: L {ci(fits[0], 'L')}, H {ci(fits[0], 'H')}"
            + f"\nwithout L = 1: L {ci(fits[1], 'L')}",
        )
        ax.title.set_fontsize(9)
        _log_axes(ax, Ls)
    axes[1].legend(fontsize=8, loc="upper right")  # the same entries; room there
    axes[0].set_ylabel(f"fluctuation of the state, mean over {cfg.inits} inits (dots: each)")
    fig.suptitle(
        f"{cfg.main_condition}: does the state's fluctuation fall like L^-1/3 H^-1/2? "
        f"H = {', '.join(map(str, Hs))}; 95 % jackknife intervals",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
