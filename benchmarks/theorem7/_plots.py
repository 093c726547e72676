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


def plot_all(data: dict, out: pathlib.Path) -> list[pathlib.Path]:
    stem = out.with_suffix("")
    paths = []
    for name, f in (
        ("fluctuation", plot_fluctuation),
        ("bias", plot_bias),
        ("uniform", plot_uniform),
    ):
        p = pathlib.Path(f"{stem}_{name}.png")
        f(data, p)
        paths.append(p)
    return paths
