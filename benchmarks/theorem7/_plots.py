"""The study's figures: one question each."""

import pathlib

import numpy as np


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)


def _errorbar(ax, x, v, lo, hi, **kw):
    """`v` at `x` with the interval `[lo, hi]` as error bars (caps of 2)."""
    v = np.asarray(v)
    ax.errorbar(x, v, yerr=[v - np.asarray(lo), np.asarray(hi) - v], capsize=2, **kw)


def plot_fluctuation(data: dict, path: pathlib.Path, part: str = "state") -> None:
    """How does the spread of the state among initialisations fall with the
    depth, before and after training?"""
    import matplotlib.pyplot as plt

    recs = data["fluctuation"]
    if not recs:
        return
    K = data["config"]["steps"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    Hs = sorted({r["H"] for r in recs})
    cmap = plt.get_cmap("viridis")
    panels = ((axes[0], 0, "at initialisation (k = 0)"), (axes[1], K, f"after K = {K} steps"))
    for ax, k, title in panels:
        for i, H in enumerate(Hs):
            rs = sorted((r for r in recs if r["H"] == H and r["k"] == k), key=lambda r: r["L"])
            L = np.array([r["L"] for r in rs])
            v = np.array([r[part] for r in rs])
            ci = np.array([r[part + "_ci"] for r in rs])
            _errorbar(
                ax,
                L,
                v,
                ci[:, 0],
                ci[:, 1],
                marker="o",
                ms=3,
                color=cmap(i / max(1, len(Hs) - 1)),
                label=f"H = {H}",
            )
        rs = [r for r in recs if r["k"] == k]
        Ls = np.array(sorted({r["L"] for r in rs}), float)
        top = max(r[part] for r in rs if r["L"] == Ls[0])
        ax.plot(Ls, 1.3 * top * (Ls / Ls[0]) ** -0.5, "k--", lw=1, label="slope -1/2")
        ax.plot(Ls, 1.3 * top * (Ls / Ls[0]) ** (-1 / 3), "k:", lw=1, label="slope -1/3")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("depth L")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("spread of the state x among\ninitialisations (sup over points)")
    axes[1].legend(fontsize=7, loc="lower left", ncol=2)
    _save(fig, path)


def plot_bias(data: dict, path: pathlib.Path) -> None:
    """Does the bias of the mean fall like `1/L` at initialisation?"""
    import matplotlib.pyplot as plt

    recs = sorted(data["bias_init"], key=lambda r: r["L"])
    if not recs:
        return
    fig, ax = plt.subplots(figsize=(5, 3.8))
    L = np.array([r["L"] for r in recs], float)
    v = np.array([r["value"] for r in recs])
    lo = np.array([r["ci_low"] for r in recs])
    hi = np.array([r["ci_high"] for r in recs])
    _errorbar(ax, L, v, lo, hi, marker="o", label="bias (split-half)")
    ax.plot(
        L, [r["noise_of_mean"] for r in recs], "s", ms=3, color="gray", label="noise of the mean"
    )
    ax.axhline(
        recs[0]["reference_error"], color="r", lw=1, ls=":", label="reference error (M vs 4M)"
    )
    ax.plot(L, v[0] * (L / L[0]) ** -1.0, "k--", lw=1, label="slope -1")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("depth L")
    ax.set_ylabel("sup over points of the bias")
    ax.set_title(f"bias of the mean at k = 0 (H = {recs[0]['H']})", fontsize=10)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_uniform(data: dict, path: pathlib.Path) -> None:
    """Does the sup over token sets grow with the number of tokens?"""
    import matplotlib.pyplot as plt

    recs = data["uniform"]
    if not recs:
        return
    fig, ax = plt.subplots(figsize=(5, 3.8))
    for causal, marker in ((False, "o"), (True, "s")):
        rs = sorted((r for r in recs if r["causal"] == causal), key=lambda r: r["n"])
        if not rs:
            continue
        name = "causal" if causal else "unmasked"
        n = [r["n"] for r in rs]
        ax.plot(n, [r["value"] for r in rs], marker=marker, label=f"{name}: sup (ascent)")
        ax.plot(
            n,
            [r["start"] for r in rs],
            marker=marker,
            ls=":",
            alpha=0.6,
            label=f"{name}: task samples",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens n")
    ax.set_ylabel("spread of the tokens' states at depth 1")
    c = data["config"]
    ax.set_title(
        f"sup over token sets (L = {c['uniform_L']}, H = {c['uniform_H']}, k = 0)", fontsize=10
    )
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_global(data: dict, path: pathlib.Path) -> None:
    """Does the spread among initialisations stay bounded along training, and
    how much of it is the data's noise (independent streams, the control)?"""
    import matplotlib.pyplot as plt

    recs = data.get("global_in_K") or []
    if not recs:
        return
    names = {
        "state": "state x (tokens, test points)",
        "adjoint_tokens": "adjoint p at the tokens",
        "adjoint_far": "adjoint p at test points",
    }
    sizes = sorted({(r["L"], r["H"]) for r in recs}, key=lambda t: t[0] * t[1])
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.9))
    first = min(r["k"] for r in recs if r["k"] > 0)
    for ax, (q, title) in zip(axes, names.items()):
        for i, (L, H) in enumerate(sizes):
            color = cmap(0.8 * i / max(1, len(sizes) - 1))
            for stream, ls, marker in (("shared", "-", "o"), ("independent", "--", "s")):
                rs = sorted(
                    (
                        r
                        for r in recs
                        if (r["L"], r["H"]) == (L, H)
                        and r["stream"] == stream
                        and r["quantity"] == q
                    ),
                    key=lambda r: r["k"],
                )
                if not rs:
                    continue
                k = np.array([r["k"] for r in rs], float)
                v = np.array([r["value"] for r in rs])
                lo = np.array([r["ci_low"] for r in rs])
                hi = np.array([r["ci_high"] for r in rs])
                _errorbar(
                    ax,
                    k,
                    v,
                    lo,
                    hi,
                    ls=ls,
                    marker=marker,
                    ms=3,
                    color=color,
                    label=f"L = {L}, H = {H}, {stream}",
                )
        ax.set_xscale("symlog", linthresh=first)
        positive = sorted({r["k"] for r in recs if r["k"] > 0})
        ticks = [0, *sorted(positive[::-2])]  # every other checkpoint, the last one kept
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("training step k")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("spread among initialisations\n(sup over points)")
    axes[-1].legend(fontsize=7, loc="best")
    c = data["config"]
    fig.suptitle(
        f"spread along training: AdamW, step eta / sqrt(1 + k / {c['global_decay']:g}); "
        "solid: one shared data stream, dashed: independent streams",
        fontsize=10,
    )
    _save(fig, path)


def plot_lemma6(data: dict, path: pathlib.Path) -> None:
    """Does the spread after `K` steps grow with `d`, per optimiser and `eps`?"""
    import matplotlib.pyplot as plt

    recs = [r for r in data.get("lemma6_d") or [] if r["quantity"] == "state"]
    if not recs:
        return
    eps_values = sorted({r["eps"] for r in recs})
    fig, axes = plt.subplots(
        1, len(eps_values), figsize=(4.2 * len(eps_values) + 0.6, 3.9), sharey=True, squeeze=False
    )
    opts = sorted({r["optimizer"] for r in recs})
    colors = {o: plt.get_cmap("tab10")(i) for i, o in enumerate(opts)}
    for ax, eps in zip(axes[0], eps_values):
        init = {}
        for o in opts:
            rs = sorted(
                (r for r in recs if r["optimizer"] == o and r["eps"] == eps), key=lambda r: r["d"]
            )
            if not rs:
                continue
            d = np.array([r["d"] for r in rs], float)
            v = np.array([r["value"] for r in rs])
            lo = np.array([r["ci_low"] for r in rs])
            hi = np.array([r["ci_high"] for r in rs])
            _errorbar(ax, d, v, lo, hi, marker="o", ms=3, color=colors[o], label=o)
            init.update({r["d"]: r["k0_value"] for r in rs})
        ds = sorted(init)
        ax.plot(ds, [init[d] for d in ds], "k:", marker=".", lw=1, label="k = 0 (all)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("dimension d (RMS-normalised task)")
        ax.set_title(f"eps = {eps:g}", fontsize=10)
    axes[0][0].set_ylabel("spread of the state x among\ninitialisations after K steps")
    axes[0][-1].legend(fontsize=7, loc="best")
    c = data["config"]
    fig.suptitle(
        f"spread after K = {c['lemma6_steps']} steps against d\n(L = {c['lemma6_L']}, "
        f"H = {c['lemma6_H']}, k = {c['lemma6_head_dim']}, fixed per-entry step "
        f"{c['lemma6_eta_entry']:g})",
        fontsize=10,
    )
    _save(fig, path)


def plot_bias_trained(data: dict, path: pathlib.Path) -> None:
    """Does the bias of the mean fall like `1/L` after training? (The distance
    of the means at `L` and `2L` falls with the bias's exponent.)"""
    import matplotlib.pyplot as plt

    H = data["config"]["bias_H"]  # the other head counts are in the JSON
    recs = [r for r in data.get("bias_trained") or [] if r["H"] == H]
    succ = [r for r in recs if r["quantity"] == "successive"]
    if not succ:
        return
    fig, ax = plt.subplots(figsize=(5.5, 4))
    K = max(r["k"] for r in succ)
    styles = (
        ("successive", 0, "o", "C0", "means at L and 2L, k = 0"),
        ("successive", K, "o", "C1", f"means at L and 2L, after K = {K}"),
        ("exact", 0, "s", "C2", "bias against the exact limit, k = 0"),
    )
    for quantity, k, marker, color, label in styles:
        rs = sorted(
            (r for r in recs if r["quantity"] == quantity and r["k"] == k), key=lambda r: r["L"]
        )
        if not rs:
            continue
        L = np.array([r["L"] for r in rs], float)
        v = np.array([r["value"] for r in rs])
        lo = np.maximum(np.array([r["ci_low"] for r in rs]), v * 1e-2)
        hi = np.array([r["ci_high"] for r in rs])
        _errorbar(ax, L, v, lo, hi, marker=marker, ms=4, color=color, label=label)
    L = np.array(sorted({r["L"] for r in succ}), float)
    top = max(r["value"] for r in succ if r["L"] == L[0])
    ax.plot(L, 1.2 * top * (L / L[0]) ** -1.0, "k--", lw=1, label="slope -1")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("depth L")
    ax.set_ylabel("sup over points (state + token adjoint)")
    c = data["config"]
    ax.set_title(
        f"bias of the mean in L, H = {c['bias_H']}, {c['trained_bias_inits']} initialisations",
        fontsize=10,
    )
    ax.legend(fontsize=7, loc="lower left")
    _save(fig, path)


def plot_adjoint(data: dict, path: pathlib.Path) -> None:
    """Where does the adjoint's spread fall like `H^{-1/2}`? Its exponent in
    `H` against the distance of the test points from the tokens."""
    import matplotlib.pyplot as plt

    fits = data["fits"].get("adjoint_vs_H_by_distance") or []
    if not fits:
        return
    fig, ax = plt.subplots(figsize=(5.5, 4))
    K = max(f["k"] for f in fits)
    for k, color, shift, label in ((0, "C0", -0.02, "k = 0"), (K, "C1", 0.02, f"after K = {K}")):
        fs = sorted((f for f in fits if f["k"] == k), key=lambda f: f["distance"])
        x = np.arange(len(fs)) + shift
        v = np.array([f["p_spread"] for f in fs])
        ci = np.array([f["p_spread_ci"] for f in fs])
        _errorbar(ax, x, v, ci[:, 0], ci[:, 1], marker="o", color=color, label=label)
    ax.axhline(-0.5, color="k", ls="--", lw=1, label="-1/2 (theorem)")
    ax.axhline(0.0, color="gray", lw=0.5)
    ds = sorted({f["distance"] for f in fits})
    ax.set_xticks(range(len(ds)), [f"{d:g}" for d in ds])
    ax.set_xlabel("distance of the test points from a token (units of the task's radius)")
    ax.set_ylabel("exponent in H of the adjoint's spread")
    Hs = fits[0]["H"]
    ax.set_title(f"L = {data['config']['adjoint_L']}, H = {Hs[0]} ... {Hs[-1]}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    _save(fig, path)


def plot_adjoint_heads(data: dict, path: pathlib.Path) -> None:
    """How many heads carry the adjoint, by distance from the tokens? The
    participation ratio of the heads' increments times `L H` (an effective
    number of heads), after training."""
    import matplotlib.pyplot as plt

    recs = data.get("adjoint_distance") or []
    if not recs:
        return
    K = max(r["k"] for r in recs)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    Hs = sorted({r["H"] for r in recs})
    cmap = plt.get_cmap("viridis")
    for i, H in enumerate(Hs):
        rs = sorted((r for r in recs if r["H"] == H and r["k"] == K), key=lambda r: r["distance"])
        n = rs[0]["L"] * H
        v = np.array([r["participation"] * n for r in rs])
        ci = np.array([r["participation_ci"] for r in rs]) * n
        x = np.arange(len(rs))
        _errorbar(
            ax,
            x,
            v,
            ci[:, 0],
            ci[:, 1],
            marker="o",
            ms=3,
            color=cmap(i / max(1, len(Hs) - 1)),
            label=f"H = {H} ({n} heads)",
        )
    ds = sorted({r["distance"] for r in recs})
    ax.set_xticks(range(len(ds)), [f"{d:g}" for d in ds])
    ax.set_yscale("log", base=2)
    ax.set_xlabel("distance of the test points from a token (units of the task's radius)")
    ax.set_ylabel("effective number of heads carrying\nthe adjoint (participation x L H)")
    ax.set_title(f"after K = {K} steps, L = {data['config']['adjoint_L']}", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    _save(fig, path)


def plot_all(data: dict, out: pathlib.Path) -> list[pathlib.Path]:
    stem = out.with_suffix("")
    paths = []
    for name, f in (
        ("fluctuation", plot_fluctuation),
        ("bias", plot_bias),
        ("bias_trained", plot_bias_trained),
        ("uniform", plot_uniform),
        ("global", plot_global),
        ("lemma6", plot_lemma6),
        ("adjoint", plot_adjoint),
        ("adjoint_heads", plot_adjoint_heads),
    ):
        p = pathlib.Path(f"{stem}_{name}.png")
        f(data, p)
        paths.append(p)
    return paths
