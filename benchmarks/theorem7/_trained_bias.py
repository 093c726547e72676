"""Part 2, after training (docs/theory.md, section 7): the rate of the bias of
the mean in `L` without the trained limit.

The mean over initialisations of `L`-layer models trained on one data stream
converges, as `L` grows, to the trained limit of that stream; if its bias
falls like `c L^a`, the difference of the means at `L` and `2L` falls like
`c (1 - 2^a) L^a`, with the same exponent. The difference needs no
reference: its rate is the bias's rate. Each depth's initialisations are
split into `G` groups; the squared distance is estimated per point by the
U-statistic over pairs of distinct groups,

    D^2(q) = 1 / (G (G - 1)) sum_{g != g'} <a_g(q) - b_g(q), a_g'(q) - b_g'(q)>,

(`a_g`, `b_g` the means of group `g` at `L` and `2L`), unbiased for the
squared distance of the means whatever the Monte-Carlo noise of each group,
like part 2's split-half estimate; the interval is the jackknife over groups.
At `k = 0` the same groups give the bias against part 2's exact limit, which
checks the method: the two exponents must agree."""

import numpy as np

import mfattn

from ._config import Theorem7Config
from ._parts import _stack_points, inits_of, keys_of, probe_outputs, probes_of, train_inits


def trained_bias_point(cfg: Theorem7Config, L: int, H: int | None = None) -> dict:
    """`cfg.trained_bias_inits` initialisations at depth `L` (`H` heads, default
    `cfg.bias_H`)
    trained `cfg.steps` steps on one data stream (the same for every `L`): the
    means over `cfg.trained_bias_groups` groups of the state at depth 1 of the
    tokens and test points and of the adjoint at depth 0 of the tokens, at
    part 2's token sets, at `k = 0` and after the steps; and the noise of the
    mean (sup over points of `sqrt(trace Cov / R)`)."""
    data_key, _, init_key = keys_of(cfg, "trained_bias")
    _, probe_key, _ = keys_of(cfg, "bias")  # part 2's points: its exact limit holds at k = 0
    probes = probes_of(cfg, probe_key)
    R, G = cfg.trained_bias_inits, cfg.trained_bias_groups
    if R % G or R // G < 2:
        raise ValueError(
            f"`trained_bias_inits` ({R}) must be a multiple of `trained_bias_groups` ({G}), "
            "with at least 2 initialisations per group"
        )
    H = cfg.bias_H if H is None else H
    params = inits_of(cfg, init_key, L, H, R)
    trained, losses = train_inits(cfg, params, data_key, cfg.steps)
    rec = {"L": L, "H": H, "inits": R, "groups": G, "steps": cfg.steps}
    for name, p in (("k0", params), ("kK", trained)):
        x, pt = _stack_points(probe_outputs(p, probes, cfg.beta))
        group = lambda a: a.reshape(G, R // G, *a.shape[1:]).mean(axis=1)
        noise = lambda a: float(np.sqrt(a.var(0, ddof=1).sum(-1) / R).max())
        rec[name] = {
            "x": group(x).tolist(),
            "p": group(pt).tolist(),
            "noise_of_mean": noise(x) + noise(pt),
        }
    losses = np.asarray(losses)  # (steps, R)
    rec["train_loss_first"] = float(losses[0].mean())
    rec["train_loss_last"] = float(losses[-max(1, cfg.steps // 10) :].mean())
    return rec


def _sup_root(u) -> float:
    """`sup_q sqrt(max(u(q), 0))` of per-point squared-distance estimates."""
    return float(np.sqrt(np.maximum(np.asarray(u), 0.0)).max())


def _cross(a, b=None):
    """Per point, the U-statistic `1 / (G (G-1)) sum_{g != g'} <a_g - b_g,
    a_g' - b_g'>` of group means `a` `(G, points, d)` against `b`: another
    depth's group means `(G, points, d)`, a reference `(points, d)` (the
    same for every group), or absent (zero)."""
    e = a if b is None else a - b
    G = e.shape[0]
    s = e.sum(axis=0)
    return (np.sum(s * s, axis=-1) - np.sum(e * e, axis=(0, -1))) / (G * (G - 1))


def distance(a: dict, b: dict | None, groups=None, signs=None) -> float:
    """`sup_points D_x + sup_tokens D_p` between the means of two depths'
    records `a[k]`, `b[k]` (dicts with group means `x`, `p`) or against a
    reference (`b` with `x`, `p` of shape `(points, d)`), from the groups
    `groups` (default all). With `signs` (`+-1` per group), the groups'
    differences are centred on their mean (and rescaled by `sqrt(G / (G-1))`
    to keep their variance) and multiplied by the signs: what is left is
    their noise with the cross terms' mean zero, and the value is a draw of
    the estimate where the means do not differ."""
    idx = slice(None) if groups is None else np.asarray(groups)
    out = 0.0
    for part in ("x", "p"):
        ga = np.asarray(a[part])[idx]
        gb = np.asarray(b[part]) if b is not None else None
        if gb is not None and gb.ndim == 3:  # another depth's groups
            if gb.shape[0] != np.asarray(a[part]).shape[0]:
                raise ValueError(
                    f"the two depths have {np.asarray(a[part]).shape[0]} and {gb.shape[0]} "
                    "groups: their distance needs the same number"
                )
            gb = gb[idx]
        e = ga if gb is None else ga - gb
        if signs is not None:  # the noise alone: centred, rescaled, sign-flipped
            G = e.shape[0]
            e = (e - e.mean(axis=0)) * np.sqrt(G / (G - 1))
            e = e * np.asarray(signs, float)[:, None, None]
        out += _sup_root(_cross(e))
    return out


def noise_floor(
    a: dict, b: dict | None, draws: int = 200, seed: int = 0, level: float = 0.95
) -> float:
    """The `level` quantile of `distance` over random sign flips of the
    groups' centred differences: what the estimate gives where the means do
    not differ (the sup over points of the positive part of the noise), so
    that a distance at or below it is not resolved."""
    G = np.asarray(a["x"]).shape[0]
    rng = np.random.default_rng(seed)
    vals = [distance(a, b, signs=rng.choice([-1.0, 1.0], G)) for _ in range(draws)]
    return float(np.quantile(vals, level))


def _jackknife(stat, G: int) -> dict:
    jk = mfattn.jackknife(stat, G, min_samples=4)
    return {"value": jk["estimate"], "ci": jk["ci"]}


def trained_bias_records(points: list[dict], reference: dict | None) -> list[dict]:
    """Per `k` (`0` and `K`) and successive depths `L, 2L` of the grid: the
    distance of the means with its jackknife interval over groups and its
    noise floor (`noise_floor`); at `k = 0` also each depth's bias against
    the exact limit of part 2 (`reference`, when given). Points of several
    `H` are taken one `H` at a time."""
    Hs = sorted({p["H"] for p in points})
    if len(Hs) > 1:
        return [
            r
            for H in Hs
            for r in trained_bias_records([p for p in points if p["H"] == H], reference)
        ]
    pts = sorted(points, key=lambda p: p["L"])
    out = [
        _record(a, k_name, b[k_name], L_next=b["L"])
        for k_name in ("k0", "kK")
        for a, b in zip(pts, pts[1:])
    ]
    if reference is not None:
        ref = {"x": np.asarray(reference["x"]), "p": np.asarray(reference["p"])}
        out += [_record(a, "k0", ref) for a in pts]
    return out


def _record(a: dict, k_name: str, b: dict, **extra) -> dict:
    """The distance of `a[k_name]`'s means to `b` (another depth's record at
    the same `k`, quantity `successive`, or a reference, `exact`), with its
    jackknife interval over groups, the noise of the means and the noise
    floor."""
    d = _jackknife(lambda idx: distance(a[k_name], b, idx), a["groups"])
    noise = [a[k_name]["noise_of_mean"]] + ([b["noise_of_mean"]] if "noise_of_mean" in b else [])
    return {
        "k": 0 if k_name == "k0" else a["steps"],
        "quantity": "successive" if "noise_of_mean" in b else "exact",
        "L": a["L"],
        **extra,
        "H": a["H"],
        "inits": a["inits"],
        "value": d["value"],
        "ci_low": d["ci"][0],
        "ci_high": d["ci"][1],
        "noise_of_mean": max(noise),
        "noise_floor": noise_floor(a[k_name], b),
    }


def trained_bias_fits(points: list[dict], reference: dict | None, min_L: int) -> dict:
    """The exponent in `L` of the successive distance at `k = 0` and after `K`
    steps, and of the bias against the exact limit at `k = 0`, over the depths
    `L >= min_L`, each with its jackknife interval over groups (the groups of
    every depth are independent, so deleting group `g` everywhere is a
    delete-one jackknife of independent blocks). Where a distance is at or
    below its noise floor (`noise_floor`), the fit has no slope, and says
    why; a leave-one-group-out replicate in which a distance is 0 makes the
    interval `nan` (every replicate fits the same depths)."""
    pts = sorted((p for p in points if p["L"] >= min_L), key=lambda p: p["L"])
    fits = {}
    if not pts:
        return fits
    G = min(p["groups"] for p in pts)

    def slope(values_of, floors):
        ls, vs = values_of(np.arange(G))
        low = [L for L, v, f in zip(ls, vs, floors) if v <= f]
        if low:  # a distance within the noise of the means: no exponent
            return {
                "slope": None,
                "ci": None,
                "min_L": min_L,
                "why": "a distance at or below its noise floor, at L = "
                + ", ".join(str(L) for L in low),
            }

        def stat(idx):
            ls, vs = values_of(idx)
            if min(vs) <= 0:
                return np.nan
            return np.polyfit(np.log(ls), np.log(vs), 1)[0]

        jk = mfattn.jackknife(stat, G, min_samples=4)
        return {"slope": jk["estimate"], "ci": jk["ci"], "min_L": min_L}

    pairs = list(zip(pts, pts[1:]))
    for k_name, key in (("k0", "bias_successive_k0_vs_L"), ("kK", "bias_trained_vs_L")):
        if len(pairs) >= 2:
            f = slope(
                lambda idx, k_name=k_name: (
                    [a["L"] for a, _ in pairs],
                    [distance(a[k_name], b[k_name], idx) for a, b in pairs],
                ),
                [noise_floor(a[k_name], b[k_name]) for a, b in pairs],
            )
            f["points"] = len(pairs)
            fits[key] = f
    if reference is not None and len(pts) >= 2:
        ref = {"x": np.asarray(reference["x"]), "p": np.asarray(reference["p"])}
        f = slope(
            lambda idx: ([a["L"] for a in pts], [distance(a["k0"], ref, idx) for a in pts]),
            [noise_floor(a["k0"], ref) for a in pts],
        )
        f["points"] = len(pts)
        fits["bias_exact_k0_vs_L_same_inits"] = f
    return fits


def reference_of(bias_reference: dict | None):
    """Part 2's reference at its points, or `None`."""
    if not bias_reference or "x" not in bias_reference:
        return None
    return {"x": bias_reference["x"], "p": bias_reference["p"]}
