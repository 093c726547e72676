"""The study's figures: one question each."""

import pathlib

import numpy as np


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)


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
            ax.errorbar(
                L,
                v,
                yerr=[v - ci[:, 0], ci[:, 1] - v],
                marker="o",
                ms=3,
                capsize=2,
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
    ax.errorbar(L, v, yerr=[v - lo, hi - v], marker="o", capsize=2, label="bias (split-half)")
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
                ax.errorbar(
                    k,
                    v,
                    yerr=[v - lo, hi - v],
                    ls=ls,
                    marker=marker,
                    ms=3,
                    capsize=2,
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
            ax.errorbar(
                d, v, yerr=[v - lo, hi - v], marker="o", ms=3, capsize=2, color=colors[o], label=o
            )
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


def plot_all(data: dict, out: pathlib.Path) -> list[pathlib.Path]:
    stem = out.with_suffix("")
    paths = []
    for name, f in (
        ("fluctuation", plot_fluctuation),
        ("bias", plot_bias),
        ("uniform", plot_uniform),
        ("global", plot_global),
        ("lemma6", plot_lemma6),
    ):
        p = pathlib.Path(f"{stem}_{name}.png")
        f(data, p)
        paths.append(p)
    return paths
